"""The verify job: `VerifyOptions` -> `verify_model` (against the torch source, or another ONNX file with `against`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from road_export.app.application.checks import (
    check_atol_float,
    check_outputs,
    check_report,
    input_paths,
    normalized,
    parity,
    quiet_libraries,
    write_report,
)
from road_export.app.application.interruptions import Step, Steps, job_interruptions
from road_export.core.errors import (
    RoadError,
    onnxruntime_blame,
)

# ---- verify ----

@dataclass(frozen=True)
class VerifyOptions:
    """What `road-export verify` takes: `model` (an ONNX file or model directory) against its torch source (`base`,
    `adapters`, `seed`, `task`, as it was exported) or, with `against`, another ONNX file (torch-free). atol:
    tolerance (default per dtype); report: where the JSON report goes; native: run road ops on the native kernels
    where they build."""

    model: str | Path
    against: str | None = None
    base: str | None = None
    adapters: tuple[str, ...] = ()
    seed: int = 0
    task: str | None = None
    atol: float | None = None
    report: str | None = None
    native: bool = True

    def __post_init__(self) -> None:
        normalized(self, "base", "report", "against")


def verify_model(options: VerifyOptions, *, on_step: Step | None = None):
    """Parity of an existing export (`road-export verify`): checks, load, verify, the report written atomically.
    Returns the parity report (`passed`, `table()`, `to_json()`). Raises RoadError for bad input,
    OnnxRuntimeFailure when onnxruntime cannot run the file."""
    from road_export.graph.checks import check_onnx_input, check_option_values
    from road_export.graph.model_dir import model_file
    from road_export.runtime.seq2seq import is_seq2seq_dir

    o = options
    check_option_values(o)
    inputs = input_paths(base=o.base, adapters=o.adapters)
    if is_seq2seq_dir(o.model):
        if o.base is None:  # the embedded default is a decoder-only model: it cannot be this export's source
            raise RoadError(f"{o.model}: an encoder-decoder export is checked against its source; pass --base (the "
                            "base model directory or models/ name it was exported from) and --adapter, as for export")
        check_report(o.report, Path(o.model))
        target, proto, seq2seq = Path(o.model), None, True
    else:
        target = model_file(o.model)
        proto = check_onnx_input(target)
        check_report(o.report, target)
        check_outputs({"--report": o.report}, [target, *inputs])
        seq2seq = False
        if o.against is not None:
            return _verify_against(o, target, o.against, on_step)
        from road_export.graph.inspection import read_facts

        check_atol_float(o.atol, target, read_facts(proto).quantization)
    quiet_libraries()
    from road_export.export.source import load_source

    bare = False
    if proto is not None:
        from road_export.export.tasks import normalize_task

        if o.task is not None:
            normalize_task(o.task)
        # a file without RoAd (a base export, an onnxruntime-genai builder graph) against --base alone: no --adapter
        records = {p.key: p.value for p in proto.metadata_props}.get("road_export.adapters", "[]")
        bare = not o.adapters and o.base is not None and records in ("", "[]") and \
            not any(n.domain == "road" for n in proto.graph.node)
    with job_interruptions() as guard:
        steps = Steps(on_step, guard)
        steps("loading")
        source = load_source(o.base, list(o.adapters), seed=o.seed, task=o.task, no_adapter=bare)
        if proto is not None:
            from road_export.graph.inspection import check_fits

            check_fits(proto, source.model.config, str(target), hint="pass the --base (and --adapter) it was exported "
                                                                       "from")
            del proto
        report = parity(target, source, steps, task=o.task, atol=o.atol, native=o.native, seq2seq=seq2seq)
        with guard.kept(o.report):
            write_report(report, o.report)
    return report


def _verify_against(o: VerifyOptions, target: Path, against: str, on_step: Step | None):
    """`verify MODEL --against REF.onnx`: onnxruntime against onnxruntime, torch-free."""
    from road_export.app.parity.file_reference import verify_against_file
    from road_export.graph.checks import check_onnx_input

    given = [flag for flag, value in (("--base", o.base), ("--adapter", o.adapters), ("--task", o.task)) if value]
    if given:
        raise RoadError(f"{', '.join(given)} with --against: the reference is the file {against}; "
                        "drop them, or drop --against to compare with the torch source")
    check_onnx_input(against)
    check_report(o.report, Path(against))
    with job_interruptions() as guard:
        Steps(on_step, guard)("verifying")
        with onnxruntime_blame(target, "run"):
            report = verify_against_file(target, against, atol=o.atol, native=None if o.native else False)
        with guard.kept(o.report):
            write_report(report, o.report)
    return report


