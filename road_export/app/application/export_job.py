"""The export job: `ExportOptions` -> `ExportJob` (check, then load -> export -> verify -> report -> commit) ->
`VerifiedExport`; `export_verified` runs it from Python."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from road_export.app.application.checks import (
    SEQ2SEQ_QUANTIZE,
    check_atol_float,
    check_implicit_outputs,
    check_outputs,
    check_report,
    input_paths,
    normalized,
    parity,
    quantized,
    quiet_libraries,
    write_report,
    writing,
)
from road_export.app.application.interruptions import Interruptions, Step, Steps, job_interruptions, ours
from road_export.core.errors import (
    ParityFailure,
    RoadError,
    onnxruntime_blame,
)

# ---- export ----

@dataclass(frozen=True)
class ExportOptions:
    """What `road-export [export]` takes, field by field (the CLI option of the same name, `--no-verify` being
    `verify=False`, `--no-native` `native=False`, `--adapter` `adapters`, `--builder-option` `builder_options`).

    output: a `.onnx` file, or (any other path) a model directory for optimum, onnxruntime-genai and
    transformers.js. base: a transformers directory or a models/ name (None: the embedded default model).
    adapters: peft RoAd adapter directories, `[NAME=]PATH`. mode: "merge" (into the weights) or "rotate" (road
    nodes). graph: "road" (road-export's exporter), "builder" (onnxruntime-genai's model builder graph with RoAd
    attached; a directory output) or "auto". quantize: "int4" | "int8" | None. verify: the parity check against
    peft's forward (atol: its tolerance, default per dtype; report: where its JSON goes). Everything is checked by
    `ExportJob.check` (RoadError, one line) before anything is loaded."""

    output: str | Path
    base: str | None = None
    adapters: tuple[str, ...] = ()
    seed: int = 0
    task: str | None = None
    no_adapter: bool = False
    mode: str = "merge"
    opset: int | None = None
    dtype: str = "float32"
    graph: str = "road"
    device: str | None = None
    builder_options: tuple[str, ...] = ()
    external_data: bool = False
    target: str | None = None
    fixed: bool = False
    quantize: str | None = None
    verify: bool = True
    atol: float | None = None
    report: str | None = None
    native: bool = True

    def __post_init__(self) -> None:
        normalized(self, "base", "report")
        options = self.builder_options
        object.__setattr__(self, "builder_options", (options,) if isinstance(options, str) else tuple(options))


@dataclass
class VerifiedExport:
    """What an export job wrote and how it verified.

    output: the file or directory. kind: "file", "directory" or "builder" (a model builder graph directory). route:
    why that graph was chosen (`--graph auto|builder`), else None. summary: the one line the CLI prints ("wrote ...").
    report: the parity report (verify.ParityReport; None without verification or on the builder graph, whose prefill
    rows are `rows`: dicts with case, ok, max_abs, cosine). passed: parity passed, or was not checked."""

    output: Path
    kind: str
    summary: str
    report: Any = None
    rows: list[dict] = field(default_factory=list)
    passed: bool = True
    files: list[str] = field(default_factory=list)
    route: str | None = None
    exported: Any = None  # the exporter's ExportResult, or genai_builder.BuilderResult


class ExportJob:
    """One export: `check()` (every option and path, nothing loaded), then `run()`: load -> export -> verify ->
    report -> commit. `on_step(name)` is told each long step. Raises RoadError for bad input, OnnxRuntimeFailure
    when onnxruntime cannot run the written file, ExportBug (naming the model and the step) when export fails on a
    model road-export takes; a parity failure is `result.passed` False (`export_verified` raises ParityFailure)."""

    def __init__(self, options: ExportOptions, *, on_step: Step | None = None) -> None:
        self.options = options
        self.on_step = on_step
        self.kind: str | None = None  # "file" | "directory" | "builder", once checked
        self.route: str | None = None  # why that graph (`--graph auto|builder`)
        self.output: Path | None = None

    # -- checks --

    def check(self) -> None:
        """Every option and path, before any long step; RoadError (one line) for the first problem."""
        from road_export.graph.checks import check_option_values
        from road_export.graph.model_dir import is_dir_output

        o = self.options
        check_option_values(o)
        if is_dir_output(o.output):
            self._check_directory()
            return
        if o.graph == "builder":
            raise RoadError(f"{o.output}: --graph builder writes a model directory; give a directory, not a .onnx "
                            "path")
        from road_export.graph.checks import check_output_model

        self._check_road_graph()
        output = check_output_model(o.output)
        data = output.with_name(output.name + ".data")
        swap = {f"swap file {p.name}": p for p in self._swap_files(output)}
        self._check_common(output, {"external data file": data, **swap}, report_others=(data,), implicit=swap)
        quiet_libraries()
        from road_export.export.tasks import SEQ2SEQ, normalize_task

        if o.task is not None and normalize_task(o.task) in SEQ2SEQ:  # known before the model is loaded
            raise RoadError(f"{output}: task {normalize_task(o.task)} writes an encoder and decoder files; give a "
                            "directory as the output, not a .onnx path")
        self.kind, self.output = "file", output

    def _check_directory(self) -> None:
        from road_export.app import genai_builder
        from road_export.graph.checks import check_output_dir

        o = self.options
        output = check_output_dir(o.output, what="model directory")
        if output.exists() and output.is_symlink():
            raise RoadError(f"{output}: is a symbolic link; give a new directory")
        blockers = [flag for flag, used in (("--opset", o.opset), ("--external-data", o.external_data),
                                            ("--target", o.target), ("--report", o.report),
                                            ("--no-native", not o.native)) if used]
        graph, why = genai_builder.choose_graph(o.graph, o.base, directory=True, task=o.task, blockers=blockers)
        self.output = output
        if graph == "builder":
            self._check_common(output, {}, builder=True)
            from road_export.export.source import parse_adapter

            specs = [parse_adapter(text, i) for i, text in enumerate(o.adapters)]
            if len({s.name for s in specs}) != len(specs):
                raise RoadError(f"--adapter: names {', '.join(s.name for s in specs)} repeat; give each NAME=PATH its "
                                "own")
            for option in o.builder_options:
                if "=" not in option or option.startswith("="):
                    raise RoadError(f"--builder-option {option!r}: expected KEY=VALUE (one of the builder's "
                                    "extra_options)")
            self.kind, self.route = "builder", why
            return
        self._check_road_graph(why)
        self._check_common(output, {})
        self.kind, self.route = "directory", why if o.graph == "auto" else None
        quiet_libraries()

    def _check_road_graph(self, why: str = "") -> None:
        """Refuse options of the model builder path on road-export's own exporter."""
        o = self.options
        used = ("--dtype bfloat16" if o.dtype == "bfloat16" else "--device" if o.device else
                "--builder-option" if o.builder_options else None)
        if used:
            reason = f" ({why})" if why else ""
            raise RoadError(f"{used} applies to the model builder's graph (--graph builder, a model directory), not "
                            f"to road-export's own exporter{reason}")

    def _check_common(self, output: Path, others: dict[str, Path], *, report_others: Sequence[Path] = (),
                      implicit: dict[str, Path] | None = None, builder: bool = False) -> None:
        """The checks every export path shares: --no-adapter, rotate-only options, options that need the parity
        check, --atol on a quantized file, --report, outputs that would overwrite inputs, several adapters."""
        o = self.options
        if o.no_adapter and o.adapters:
            raise RoadError("--no-adapter with --adapter: drop one (--no-adapter exports the base model alone)")
        if o.no_adapter and o.mode == "rotate":
            raise RoadError("--no-adapter with --mode rotate: the base alone has no rotations; drop --mode rotate "
                            "(attach adds road nodes to the base later: road-export attach BASE.onnx --adapter DIR "
                            "...)")
        if o.mode != "rotate" and (o.fixed or o.target):
            raise RoadError(f"--{'fixed' if o.fixed else 'target'} applies to --mode rotate only")
        if not o.verify and (o.report or o.atol is not None or not o.native):
            used = "--report" if o.report else "--atol" if o.atol is not None else "--no-native"
            raise RoadError(f"{used} needs the parity check; drop --no-verify or {used}")
        if not builder:
            check_atol_float(o.atol, output, o.quantize)
        check_report(o.report, output, *report_others)
        if implicit:
            check_implicit_outputs(implicit)
        check_outputs({"output": output, **{k: v for k, v in others.items() if k not in (implicit or {})},
                       "--report": o.report, **(implicit or {})},
                      input_paths(base=o.base, adapters=o.adapters))
        if len(o.adapters) > 1 and o.mode != "rotate":
            raise RoadError(f"{len(o.adapters)} adapters cannot be merged into one set of weights; add --mode "
                            "rotate for one graph that serves them all (input adapter_ids)")

    def _swap_files(self, output: Path) -> list[Path]:
        """The `.onnx_adapter` swap file an export of one adapter in rotate mode writes beside `output` (none for
        --fixed, several adapters, or merge mode): `OUTPUT_STEM.NAME.onnx_adapter`."""
        o = self.options
        if o.mode != "rotate" or o.fixed or len(o.adapters) > 1:
            return []
        name = "default"
        if o.adapters:
            from road_export.export.source import parse_adapter

            name = parse_adapter(o.adapters[0], 0).name
        return [output.with_name(f"{output.stem}.{name}.onnx_adapter")]

    # -- run --

    def run(self) -> VerifiedExport:
        """Load, export, verify, write the report, commit; `check()` first when not done yet."""
        if self.kind is None:
            self.check()
        with job_interruptions() as guard:
            steps = Steps(self.on_step, guard)
            if self.kind == "builder":
                return self._run_builder(guard, steps)
            return self._run_road(guard, steps)

    def _run_road(self, guard: Interruptions, steps: Steps) -> VerifiedExport:
        import road_export as rx
        from road_export.export.source import load_source

        o, output = self.options, self.output
        assert output is not None
        directory = self.kind == "directory"
        kept = guard.kept(output, o.report) if directory else guard.kept(
            output, output.with_name(output.name + ".data"), o.report,
            patterns=[(output.parent, f"{output.stem}.*.onnx_adapter")])
        source, library = None, None
        with writing(output), kept:
            steps("loading")
            import torch

            # float16 without verification: no float32 copy (a directory keeps its float32 load for its configs)
            load_dtype = torch.float16 if not directory and not o.verify and o.dtype == "float16" else torch.float32
            source = load_source(o.base, list(o.adapters), seed=o.seed, task=o.task, reference=o.verify,
                                 dtype=load_dtype, defer_reference=not directory, no_adapter=o.no_adapter)
            float_rows: list = []
            check_float = self._float_check(source, steps, output, float_rows)
            options: dict[str, Any] = dict(mode=o.mode, opset=o.opset, dtype=o.dtype, quantize=o.quantize,
                                           external_data=o.external_data or None, target=o.target or "onnxruntime",
                                           swappable=not o.fixed, on_step=steps, require_adapter=not o.no_adapter,
                                           on_float_saved=check_float)
            with ours(steps, lambda: f"exporting {_model_name(source, o)}"):
                if directory:
                    written, seq2seq, library = self._write_directory(source, output, options)
                    exported, files, onnx_file = written.result, written.files, output / model_file_name()
                else:
                    # road_export.export is the subpackage, callable as the export function (mypy sees a module)
                    exported = rx.export(source.model, output, task=o.task,  # type: ignore[operator]
                                         on_weights_read=lambda: source.release_model(unverified=not o.verify),
                                         **options)
                    seq2seq, files, onnx_file = False, [], output
            report = None
            if o.verify:
                if not directory:
                    source.release_model()  # with peft's reference: one torch model beside onnxruntime, not two
                report = parity(output if seq2seq else onnx_file, source, steps, task=exported.task, atol=o.atol,
                                native=o.native, seq2seq=seq2seq, blame=output if seq2seq else onnx_file)
                report.rows[:0] = float_rows  # with --quantize: the float model the quantizer read, by max abs
                write_report(report, o.report)
            weights = o.dtype + (f", {quantized(onnx_file)}" if o.quantize else "")
        if directory:
            summary = self._directory_summary(source, exported, weights, files, library)
        else:
            nodes = f", {exported.road_nodes} road nodes" if o.mode == "rotate" else ""
            nodes += "".join(f", swap file {f.name}" for f in exported.adapter_files)
            adapters = f"adapters: {', '.join(source.adapters)}" if source.adapters else "the base alone, no adapter"
            summary = (f"wrote {output} ({o.mode}, {weights}, {adapters}"
                       f"{' from the embedded config' if source.embedded else ''}{nodes})")
        return VerifiedExport(output, self.kind or "file", summary, report=report,
                            passed=report is None or report.passed, files=list(files), route=self.route,
                            exported=exported)

    def _write_directory(self, source, output: Path, options: dict[str, Any]):
        """The model directory (model_dir.write_model_dir) around rx.export: configs, tokenizer, genai_config."""
        import road_export as rx
        from road_export.export.tasks import SEQ2SEQ, infer_task, normalize_task
        from road_export.graph import model_dir

        o = self.options
        task = normalize_task(o.task) if o.task else infer_task(source.model)
        if task in ("text-generation", "text2text-generation") and not o.task:
            task += "-with-past"  # optimum's default for a decoder; what the clients generate with
        config, generation, tokenizer_dir, fields = _directory_configs(source, o.base)
        library = kernels_library() if o.mode == "rotate" else None
        seq2seq = task in SEQ2SEQ  # onnx/encoder_model.onnx, onnx/decoder_model.onnx, ... (export/seq2seq.py)
        if seq2seq and o.quantize:
            raise RoadError(SEQ2SEQ_QUANTIZE.format(option=f"--quantize {o.quantize}", model=source.base))
        written = model_dir.write_model_dir(
            output, lambda path: rx.export(  # type: ignore[operator]
                source.model, path.parent if seq2seq else path, task=task, **options),  # the callable subpackage
            config=config, generation=generation, tokenizer_dir=tokenizer_dir, custom_ops_library=library,
            fields=fields)
        return written, seq2seq, library

    def _directory_summary(self, source, exported, weights: str, files: list[str], library: str | None) -> str:
        from road_export.graph import model_dir

        o = self.options
        notes = [f"{exported.task}", f"{o.mode}", weights,
                 f"adapters: {', '.join(source.adapters)}" if source.adapters else "no adapter"]
        if o.mode == "rotate":
            notes.append(f"{exported.road_nodes} road nodes")
        if not any(Path(f).name in model_dir.TOKENIZER_FILES for f in files):
            notes.append("no tokenizer files in the base (add them: tokenizer.save_pretrained(OUT_DIR))")
        if model_dir.GENAI_CONFIG in files and library is None and o.mode == "rotate":
            notes.append("genai_config without the native kernels (add them: road-export kernels --genai-config DIR)")
        return f"wrote {self.output}/ ({'; '.join(notes)}): {', '.join(files)}"

    def _float_check(self, source, steps: Steps, output: Path, rows: list):
        """`on_float_saved` for an export with --quantize and the check on (else None): the float model written for
        the quantizer is verified against the reference by max abs (the tolerance of its dtype), so everything but
        the quantizer's rounding is held to the float bar; its rows go to `rows`, marked "float, before
        quantizing", to lead the report."""
        o = self.options
        if not o.verify or not o.quantize:
            return None

        def check(path: Path) -> None:
            steps("verifying the float model")
            with onnxruntime_blame(output, "run"):
                from road_export.app import verify as checker

                checked = checker.verify(path, source.reference_model, task=o.task,
                                         native=None if o.native else False, reference=source.reference_name)
            for row in checked.rows:
                row.case = f"float, before quantizing (max abs <= {checked.atol:g}): {row.case}"
            rows.extend(checked.rows)

        return check

    def _run_builder(self, guard: Interruptions, steps: Steps) -> VerifiedExport:
        """onnxruntime-genai's model builder graph with RoAd attached (road_export.app.genai_builder)."""
        from road_export.app import genai_builder
        from road_export.export.source import parse_adapter

        o, output = self.options, self.output
        assert output is not None
        specs = [parse_adapter(text, i) for i, text in enumerate(o.adapters)]
        library = kernels_library() if o.mode == "rotate" and specs else None
        with writing(output), guard.kept(output), ours(steps, lambda: "attaching RoAd to the model builder "
                                                                            f"graph of {o.base}"):
            built = genai_builder.build(str(o.base), [(s.name, s.path) for s in specs], output, mode=o.mode,
                                        dtype=o.dtype, quantize=o.quantize, provider=o.device or "cpu",
                                        swappable=not o.fixed, custom_ops_library=library, verify=o.verify,
                                        atol=o.atol, on_step=steps,
                                        builder_options=["--extra_options", *o.builder_options]
                                        if o.builder_options else [])
        prec = genai_builder.precision(o.dtype, o.quantize)
        notes = [f"model builder graph -p {prec} -e {o.device or 'cpu'}", o.mode if specs else "no adapter"]
        if specs:
            notes.append(f"adapters: {', '.join(s.name for s in specs)}"
                         + (" (mixed batch: input adapter_ids)" if len(specs) > 1 else ""))
            notes.append(f"{built.placed} module(s) placed, {built.road_nodes} road nodes"
                         + (f", {built.fused} fused into their products for CUDA" if built.fused else ""))
        if o.mode == "rotate" and specs and library is None:
            notes.append("genai_config without the native kernels (add them: road-export kernels --genai-config DIR)")
        if o.verify and not built.rows:
            notes.append("parity not checked: onnxruntime's CPU provider does not run a -e cuda or bfloat16 graph")
        return VerifiedExport(output, "builder", f"wrote {output}/ ({'; '.join(notes)}): {', '.join(built.files)}",
                            rows=list(built.rows), passed=not built.rows or built.ok, files=list(built.files),
                            route=self.route, exported=built)


def model_file_name() -> str:
    from road_export.graph.model_dir import MODEL_FILE

    return MODEL_FILE


def _model_name(source, options: ExportOptions) -> str:
    """The model class (once loaded) and where it came from, for ExportBug."""
    where = options.base or "the embedded default model"
    if source is None:
        return where
    inner = source.model.get_base_model() if hasattr(source.model, "get_base_model") else source.model
    return f"{type(inner).__name__} from {where}"


def _directory_configs(source, base: str | None) -> tuple[dict, dict, Path | None, dict]:
    """(config.json, generation_config.json, tokenizer directory, genai's config values) for a model directory, from
    the loaded base: transformers' own serialisations (`to_diff_dict`, as `save_pretrained` writes them); the base
    directory's generation_config.json when it has one; the values genai_config.json needs read through the config
    object (`model_dir.config_fields`: attribute_map aliases and class defaults)."""
    import transformers

    from road_export.export import zoo
    from road_export.graph import model_dir

    inner = source.model.get_base_model() if hasattr(source.model, "get_base_model") else source.model
    config = inner.config
    path = zoo.resolve(base or zoo.DEFAULT_MODEL)
    if (path / "generation_config.json").is_file():
        generation = transformers.GenerationConfig.from_pretrained(path)
    else:
        generation = transformers.GenerationConfig.from_model_config(config)
    config_dict = config.to_diff_dict()
    config_dict.setdefault("model_type", config.model_type)
    tokenizer_dir = None if zoo.is_named(base or zoo.DEFAULT_MODEL) else path
    fields = model_dir.config_fields(lambda key: getattr(config, key, None))
    return config_dict, generation.to_diff_dict(), tokenizer_dir, fields


def kernels_library() -> str | None:
    """The native road kernels' path for genai_config.json, or None where they do not build here."""
    from road_export.graph import native

    try:
        return str(native.library_path())
    except RoadError:
        return None


def export_verified(options: ExportOptions, *, on_step: Step | None = None, strict: bool = True) -> VerifiedExport:
    """Export a RoAd-adapted model as `road-export export` does: check every option and path, load the base and its
    adapters, export, verify on onnxruntime against peft's forward, write the report, commit the files atomically.

    options: ExportOptions (the CLI's options by name). on_step: told the name of each long step ("loading",
    "verifying", ...). strict: raise ParityFailure when parity fails (the files stay written, as the CLI leaves
    them; `error.report` says where), else return the result with `passed` False.
    Returns VerifiedExport (`summary` the line the CLI prints, `report` the parity report). Raises RoadError for bad
    input (nothing written), OnnxRuntimeFailure when onnxruntime cannot run the written file, ExportBug (a bug of
    ours: the model, the part traced or the step) when export fails on a model road-export takes;
    KeyboardInterrupt/Terminated on SIGINT/SIGTERM before the commit (the targets left as they were)."""
    result = ExportJob(options, on_step=on_step).run()
    if strict and not result.passed:
        raise ParityFailure(result.output, result.report if result.report is not None else result.rows)
    return result


