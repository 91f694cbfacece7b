"""`road_export.export`: a RoAd-adapted model to ONNX, merged into the weights or with `road` rotation nodes.

merge:  every adapted layer is replaced, for the trace only, by a plain layer holding R W and R b, so the file
        is the base model's graph with other weights.
rotate: every adapted layer calls torch.ops.road.rotate with its coefficients registered as buffers
        (`<layer>.road_c1_<adapter>`), which the exporter turns into one `road.Rotate` node per layer whose
        C1/C2 are named initializers.
The user's model is left as it was in both modes.

`export` is the entry point: it checks the arguments, prepares the model (prepare.py: adopt peft, plan the adapters,
an `ExportContext` holding merged copies or coefficient stand-ins) and sends the parts through the one export
pipeline (pipeline.py: capture, post-export passes, one atomic save checked by onnxruntime and the `.onnx_adapter`
swap file). A decoder-only, encoder-only or plain model is one part, built here; an encoder-decoder model is three,
built by seq2seq.py. Only the quantizing save is this module's own.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from road_export.core.errors import RoadError
from road_export.export import capture, pipeline, post, prepare, rope, seq2seq, stream
from road_export.export.result import ExportResult, swap_values, write_swap_file
from road_export.graph.files import check_output, save_model, staging_dir

__all__ = ["ExportResult", "export"]


def export(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    mode: str = "merge",
    task: str | None = None,
    example_inputs: Sequence[torch.Tensor] | dict[str, torch.Tensor] | None = None,
    opset: int | None = None,
    dtype: torch.dtype | str | None = None,
    external_data: bool | None = None,
    optimize: bool = True,
    require_adapter: bool = True,
    target: str = "onnxruntime",
    swappable: bool = True,
    on_step: Callable[[str], None] | None = None,
    streaming: bool = True,
    quantize: str | None = None,
    on_weights_read: Callable[[], None] | None = None,
    on_float_saved: Callable[[Path], None] | None = None,
) -> ExportResult:
    """Export a RoAd-adapted model (ours, or a live peft model) to ONNX at `path`.

    `task` (optimum's names) defaults to the one the transformers class implies; other modules need
    `example_inputs` (tensors, a sequence or a dict by input name). `dtype` float32 (default) or float16.
    `external_data=None` writes `<path>.data` only when the initializers pass `files.EXTERNAL_DATA_THRESHOLD`
    (256 MiB). On failure no file is left behind.
    `require_adapter=False` lets a model without adapter through in merge mode (the base model's export; the CLI's
    `--no-adapter`).
    `swappable` (rotate mode, one adapter): coefficients as overridable initializers plus an `.onnx_adapter` file,
    so onnxruntime can swap adapters per Run; False keeps them constants, which onnxruntime folds further.
    `target` picks the road function bodies (passes/lower.py): "onnxruntime" (road_1 through RotaryEmbedding) or
    "portable" (standard ops only).
    `on_step` is called with the name of each long step as it starts (tracing, optimizing, writing).
    `streaming` (default) keeps weights out of memory until they are written: transposed and merged weights are
    lazy tensors over the torch model's own (export/stream.py), evaluated one at a time by the save (external data
    above `files.EXTERNAL_DATA_THRESHOLD`); False is the in-memory path (merged copies before the trace, transposes
    folded by the optimizer), kept as the reference the streaming path is tested against: the same weights byte
    for byte, the same nodes and metadata (the `.onnx` files differ in initializer order and value_info).
    `quantize` "int4" or "int8": the MatMul weights quantized by onnxruntime's MatMulNBitsQuantizer
    (road_export.graph.quantize: int4 in blocks of 16 with the first two layers and the output head at int8, int8 in
    blocks of 32) while road nodes and their coefficients stay float and swappable. The
    float model is streamed to a temporary file with external data first, and the quantizer reads it one weight at
    a time from there.
    `on_weights_read` is called once, as soon as every weight of `model` has been read into the written file (before
    quantizing, before onnxruntime's load check of the file): a caller that owns the model and needs it no further
    frees it there, so the quantizer's memory comes in place of the model's, not on top of it (the CLI does; an
    int4 export of a 7B model then peaks at the model's size, not 1.45 x it).
    `on_float_saved(path)` (with `quantize`) is called with the float model written for the quantizer, before it
    runs: the CLI verifies that file against the reference by max abs, which judges everything but the quantizer's
    rounding (the quantized file itself can only be judged by cosine). The file is removed after quantizing.
    `opset` is the default-domain opset the file is written with, exactly: when the exporter writes another one it
    is converted, and when that fails (or onnxruntime cannot load the result) RoadError is raised and nothing is
    written. Every file is loaded by onnxruntime before it is moved into place.

    An encoder-decoder model (T5, BART, Marian, ...; task `text2text-generation[-with-past]`) is written as optimum's
    files into the directory `path` (road_export.export.seq2seq; returns its `Seq2SeqResult`); a `.onnx` path is
    refused for it.

    Raises RoadError for bad arguments (mode, dtype, opset, path), a model without (or, in merge mode, with several)
    adapters, a model road-export does not export in `dtype` (`prepare.check_traceable`, before tracing), torch
    failing on `example_inputs` the caller gave, or a file onnxruntime cannot load; ExportBug when torch fails on
    inputs road-export built (a bug of ours).
    """
    prepare.check_traceable(model, prepare.parse_dtype(dtype))
    seq2seq_result = _seq2seq(model, path, task, example_inputs, quantize, {
        "mode": mode, "opset": opset, "dtype": dtype, "external_data": external_data, "optimize": optimize,
        "require_adapter": require_adapter, "target": target, "swappable": swappable, "on_step": on_step})
    if seq2seq_result is not None:
        return seq2seq_result
    if quantize is not None:
        from road_export.graph import quantize as quant

        quant.check_scheme(quantize)
    if mode not in prepare.MODES:
        raise RoadError(f"unknown mode {mode!r}; choose merge or rotate")
    capture.check_opset(opset)
    rope.check_rope(model)
    dtype = prepare.parse_dtype(dtype)
    path = check_output(path)
    options = {"opset": opset, "optimize": optimize, "target": target, "external_data": external_data,
               "on_step": on_step, "on_weights_read": on_weights_read}
    with prepare.adopted(model) as adapted:
        adapters, order = prepare.plan_adapters(adapted, mode, require_adapter=require_adapter,
                                                name=type(model).__name__)
        context = prepare.ExportContext(mode, dtype, order, merges={} if streaming else None)
        with context.prepared(adapted) as prepared:
            part = _single_part(prepared, path, task, example_inputs, context, adapters, swappable)
            save = None
            if quantize is not None:
                save = functools.partial(_save_quantized, quantize=quantize, external_data=external_data,
                                         on_step=on_step, on_weights_read=on_weights_read,
                                         on_float_saved=on_float_saved)
            [result] = pipeline.export_parts([part], context, save=save, **options)
    return result


def _single_part(prepared: nn.Module, path: Path, task: str | None, example_inputs, context: prepare.ExportContext,
                 adapters: list[dict], swappable: bool) -> pipeline.Part:
    """The one part of a decoder-only, encoder-only or plain model: its task's module and sample inputs
    (capture.trace_plan), the rope's traceable frequencies and metadata record, the swap file of a swappable
    rotate export with one adapter."""
    module, args, names, spec, dynamic = capture.trace_plan(prepared, task, example_inputs, context.dtype,
                                                            context.order)
    swappable = swappable and context.mode == "rotate" and not context.order and bool(adapters) and spec is not None
    return pipeline.Part(path, module, args, list(names), dynamic, spec, adapters,
                         swap_adapter=adapters[0]["name"] if swappable else None,
                         metadata=rope.metadata(prepared) if spec is not None else {},
                         what=f"task {spec.task}" if spec else "", user_inputs=example_inputs is not None,
                         trace_context=functools.partial(rope.traceable_rope, prepared))


def _save_quantized(ir_model, part: pipeline.Part, *, quantize: str, external_data: bool | None, on_step,
                    on_weights_read, on_float_saved) -> tuple[Path | None, list[Path]]:
    """The quantizing save (a `pipeline.Save`): the float model to a hidden staging directory beside the output
    (`_save_float_intermediate`), its weights released, `on_weights_read()`, `on_float_saved(float file)`, then
    road_export.graph.quantize writes the output from it, loaded by onnxruntime first; the swap file from the values
    read before the float save."""
    from road_export.graph import quantize as quant

    path = part.path
    values = swap_values(ir_model) if part.swap_adapter is not None else {}  # before saving: it re-points them
    with staging_dir(path, suffix=".float") as stage:
        _save_float_intermediate(ir_model, Path(stage) / path.name, path)
        stream.release_weights(ir_model)
        if on_weights_read is not None:
            on_weights_read()
        if on_float_saved is not None:
            on_float_saved(Path(stage) / path.name)
        if on_step is not None:
            on_step("quantizing")
        quant.quantize_file(Path(stage) / path.name, path, quantize, external_data=external_data,
                            check=post.check_loadable)
    data = path.with_name(path.name + ".data") if path.with_name(path.name + ".data").exists() else None
    files = write_swap_file(path, part.swap_adapter, values) if part.swap_adapter is not None else []
    return data, files


def _save_float_intermediate(ir_model, staged: Path, path: Path) -> None:
    """The float model that `quantize` reads, saved with external data in a hidden directory beside `path`; a
    write that fails (a full disk) is blamed on `path`, saying how much room the intermediate needs."""
    from road_export.graph.files import tensor_bytes, write_failure_reason

    try:
        save_model(ir_model, staged, external_data=True)
    except (OSError, RoadError) as e:
        cause = e if isinstance(e, OSError) else e.__cause__
        if not isinstance(cause, OSError):
            raise
        try:
            n = tensor_bytes(ir_model)
            size = f"about {n / 2**30:.1f} GiB" if n >= 2**30 else f"about {max(n / 2**20, 0.1):.1f} MiB"
        except Exception:  # a lazy tensor that cannot tell its size
            size = "about the float model's size"
        raise RoadError(f"{path}: cannot write the float intermediate that --quantize reads, in a hidden directory "
                        f"beside it ({write_failure_reason(cause, staged)}); it needs free space next to the output "
                        f"for the float model ({size}), on top of the quantized file") from e


def _seq2seq(model: nn.Module, path, task: str | None, example_inputs, quantize: str | None, options: dict):
    """An encoder-decoder export (road_export.export.seq2seq) when the task or the model asks for one, else None;
    RoadError for `quantize` there (not supported for encoder-decoder files yet)."""
    from road_export.export.tasks import SEQ2SEQ, normalize_task

    task = normalize_task(task) if task is not None else None
    if task not in SEQ2SEQ and (task is not None or example_inputs is not None or not seq2seq.is_seq2seq(model)):
        return None
    if str(path).endswith(".onnx"):
        raise RoadError(f"{path}: {type(model).__name__} is an encoder-decoder model, written as several ONNX files "
                        "(encoder_model.onnx, decoder_model.onnx, decoder_with_past_model.onnx); give a directory")
    if quantize is not None:
        raise RoadError(f"quantize={quantize!r}: {type(model).__name__} is an encoder-decoder model, and road-export "
                        "quantizes decoder-only and encoder-only models so far; export it without quantize")
    return seq2seq.export_seq2seq(model, path, task=task, **options)
