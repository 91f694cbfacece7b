"""The smaller commands as jobs: attach, optimize, adapter conversion, merge-checkpoint, kernels registration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from road_export.app.application.checks import (
    SEQ2SEQ_QUANTIZE,
    check_outputs,
    input_paths,
    normalized,
    quantized,
    writing,
)
from road_export.app.application.interruptions import job_interruptions, ours
from road_export.core.errors import (
    RoadError,
)

# ---- attach, optimize, adapter, merge-checkpoint ----

@dataclass(frozen=True)
class AttachOptions:
    """What `road-export attach` takes: `base` (an ONNX file, or an encoder-decoder export's directory), `adapters`
    (peft RoAd adapter directories, `[NAME=]DIR`; several only on a model builder graph), `output`, `mode` ("merge":
    folded into the weights, "rotate": road nodes), `fixed` (coefficients as constants on a builder graph),
    `quantize` ("int4" | "int8" | None)."""

    base: str | Path
    adapters: tuple[str, ...]
    output: str | Path
    mode: str = "rotate"
    fixed: bool = False
    quantize: str | None = None

    def __post_init__(self) -> None:
        normalized(self)


def attach_adapters(options: AttachOptions) -> str:
    """Attach peft RoAd adapters to an existing ONNX model, no torch (attach.attach, attach.attach_seq2seq); the
    files are committed atomically. Returns the line the CLI prints ("wrote ..."). Raises RoadError for bad input,
    ExportBug when the translation fails on a graph it takes."""
    from road_export.graph.checks import check_input_dir, check_onnx_input, check_option_values, check_output_model

    o = options
    check_option_values(o)
    if Path(o.base).is_dir():  # an encoder-decoder export: a directory of optimum's files
        return _attach_seq2seq(o)
    proto = check_onnx_input(o.base)
    from road_export.passes.attach import adapter_specs, attach, check_no_adapter

    specs = adapter_specs(o.adapters)
    for _, path in specs:
        check_input_dir(path, "adapter")
    output = check_output_model(o.output)
    swap_files = {f"swap file {output.stem}.{name}.onnx_adapter": output.with_name(f"{output.stem}.{name}.onnx_adapter")
                  for name, _ in specs} if len(specs) == 1 and o.mode == "rotate" and not o.fixed else {}
    check_outputs({"OUT.onnx": output, "external data file": output.with_name(output.name + ".data"), **swap_files},
                  input_paths(o.base, adapters=o.adapters))
    check_no_adapter({p.key: p.value for p in proto.metadata_props}, o.base)
    del proto
    swaps = [(output.parent, f"{output.stem}.*.onnx_adapter")]
    with job_interruptions() as guard, writing(output), guard.kept(output, output.with_name(output.name + ".data"),
                                                                patterns=swaps):
        with ours(None, lambda: f"attaching {', '.join(map(str, o.adapters))} to {o.base}"):
            report = attach(o.base, [p for _, p in specs], output, mode=o.mode, quantize=o.quantize,
                            names=[n for n, _ in specs], swappable=False if o.fixed else None)
        weights = quantized(output)
    what = f"{report.folded} folded into weights" if o.mode == "merge" else f"{report.road_nodes} road nodes"
    where = " on the model builder graph" if report.builder else ""
    extra = ""
    if report.builder and len(specs) > 1:
        extra = f"; mixed batch: input adapter_ids, rows 1..{len(specs)} = {', '.join(n for n, _ in specs)}"
    elif report.swap_values:
        extra = "; swappable: " + ", ".join(f"{output.stem}.{n}.onnx_adapter" for n in report.swap_values)
    return (f"wrote {output}: {len(report.placed)} module(s) placed{where}, {what}"
            + (f"; weights {weights}" if weights else "") + extra)


def _attach_seq2seq(o: AttachOptions) -> str:
    """`attach BASE_DIR --adapter A OUT_DIR` for an encoder-decoder export (attach.attach_seq2seq)."""
    from road_export.graph.checks import check_input_dir, check_output_dir
    from road_export.passes.attach import attach_seq2seq

    if len(o.adapters) != 1:
        raise RoadError("attach takes one --adapter; several adapters in one graph need a torch export "
                        "(road-export --adapter a=... --adapter b=... --mode rotate)")
    check_input_dir(o.adapters[0], "adapter")
    if o.quantize:
        raise RoadError(SEQ2SEQ_QUANTIZE.format(option=f"--quantize {o.quantize}", model=o.base))
    output = check_output_dir(o.output, what="model directory")
    with job_interruptions() as guard, writing(output), guard.kept(output):
        with ours(None, lambda: f"attaching {o.adapters[0]} to {o.base}"):
            report = attach_seq2seq(o.base, o.adapters[0], output, mode=o.mode)
    what = f"{report.folded} folded into weights" if o.mode == "merge" else f"{report.road_nodes} road nodes"
    return f"wrote {output}/: {len(report.placed)} module placement(s) over its files, {what}"


@dataclass(frozen=True)
class OptimizeOptions:
    """What `road-export optimize` takes: `source` and `output` ONNX files, `fold` (rotations into weights),
    `target` ("onnxruntime" | "portable"), `debug` (why near-matches were not fused), `quantize`."""

    source: str | Path
    output: str | Path
    fold: bool = False
    target: str = "onnxruntime"
    debug: bool = False
    quantize: str | None = None


def optimize(options: OptimizeOptions) -> tuple[Any, str]:
    """The graph passes on any ONNX file (passes.pipeline.optimize_file), committed atomically. Returns (the pass
    report, whose `text()` lists what each pass did; the line "wrote ..."). Raises RoadError for bad input."""
    from road_export.graph.checks import check_onnx_input, check_option_values, check_output_model

    o = options
    check_option_values(o)
    check_onnx_input(o.source)
    output = check_output_model(o.output)
    data = output.with_name(output.name + ".data")
    check_outputs({"OUT.onnx": output, "external data file": data}, input_paths(o.source))
    from road_export.passes.pipeline import optimize_file

    with job_interruptions() as guard, writing(output), guard.kept(output, data):
        report = optimize_file(o.source, output, fold=o.fold, target=o.target, debug=o.debug, quantize=o.quantize)
        weights = quantized(output)
    return report, f"wrote {output}" + (f" (quantized: {weights})" if weights else "")


def convert_adapter(adapter: str | Path, like: str | Path, output: str | Path) -> Path:
    """`road-export adapter`: a peft RoAd adapter as an .onnx_adapter swap file for the model (or model directory)
    `like` (swap.convert_adapter), committed atomically. Returns the file written. Raises RoadError for bad input."""
    from road_export.graph.checks import check_input_dir, check_onnx_input, check_output_file
    from road_export.graph.model_dir import model_file

    check_input_dir(adapter, "adapter")
    like = model_file(like)
    check_onnx_input(like)
    path = check_output_file(output, suffix=".onnx_adapter")
    check_outputs({"OUT.onnx_adapter": path}, input_paths(like, adapters=[str(adapter)]))
    from road_export.graph import swap

    with job_interruptions() as guard, writing(path), guard.kept(path):
        return swap.convert_adapter(adapter, like, path)


def merge_checkpoint(base: str | Path, adapter: str | Path, output: str | Path):
    """`road-export merge-checkpoint`: the adapter merged into the safetensors checkpoint shard by shard
    (checkpoint.merge_checkpoint) into a new directory, committed atomically. Returns its report (shards, merged,
    replaced, added). Raises RoadError for bad input."""
    from road_export.graph.checks import check_input_dir, check_output_dir

    check_input_dir(base, "base model")
    check_input_dir(adapter, "adapter")
    directory = check_output_dir(output)
    from road_export.export import checkpoint

    with job_interruptions() as guard, writing(directory), guard.kept(directory):
        return checkpoint.merge_checkpoint(base, adapter, output)


def register_kernels(directory: str | Path) -> tuple[Path, Path]:
    """`road-export kernels --genai-config DIR`: build the native road kernels (once per machine) and name them in
    DIR/genai_config.json (model_dir.set_custom_ops_library), committed atomically. Returns (the config written,
    the library). Raises RoadError when DIR is not a directory or the kernels do not build here."""
    from road_export.graph import native
    from road_export.graph.model_dir import GENAI_CONFIG, library_name, set_custom_ops_library

    directory = Path(directory)
    if not directory.is_dir():
        raise RoadError(f"--genai-config {directory}: no such model directory")
    library = native.library_path()
    with job_interruptions() as guard, guard.kept(directory / GENAI_CONFIG, directory / library_name(library)):
        return set_custom_ops_library(directory, library), library
