"""Export as one pipeline over parts: every ONNX file an export writes goes through the same steps.

    capture        capture.torch_export (torch.onnx.export, dynamo, road::rotate -> road.Rotate)
    lazy weights   stream.LazyWeightsPass, for a streaming export (ExportContext.merges is a dict)
    post-export    post.post_export_passes: opset, road functions, swappable inputs, optimizer, road passes,
                   output and axis names, metadata
    save           result.save_and_swap: atomic, loaded by onnxruntime first, the `.onnx_adapter` swap file
                   (or the caller's `save`: the quantizing one of exporter.py)

A decoder-only (or encoder-only, or plain) model is one `Part`; an encoder-decoder model is three (encoder, decoder,
decoder with past: export/seq2seq.py builds them). The caller prepares the model once (`prepare.ExportContext`,
which holds the export's state for the trace) and hands `export_parts` the parts, built inside that block; the
parts may be a generator, so that only one part's trace is held at a time. Mirrors the shape of torch's own
exporter (`torch/onnx/_internal/exporter/_core.py`: capture, then passes on the onnx-ir model, then save).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir
from torch import nn

from road_export.export import capture, post, stream
from road_export.export.prepare import ExportContext
from road_export.export.result import ExportResult, road_nodes, save_and_swap, swappable_layers
from road_export.export.tasks import TaskSpec

__all__ = ["Part", "Save", "export_part", "export_parts"]

# (the post-processed model, its part) -> (the `.data` file or None, the `.onnx_adapter` files written)
Save = Callable[[ir.Model, "Part"], tuple[Path | None, list[Path]]]


@dataclass
class Part:
    """One ONNX file of an export: what is traced and how the file is named and described.

    `module(*args)` (or `module(**args)` for a dict) is traced with `input_names` and `dynamic` (torch.export's
    dynamic shapes); `spec` gives the output names (post.OutputNamesPass) and the task of the metadata record;
    `adapters` are the records written into this file ({name, variant, group_size, layers[, id]}: the layers that
    run in it); `swap_adapter` names the adapter whose coefficients become overridable inputs with its
    `.onnx_adapter` file beside the model (a swappable export), None for none; `axes` ({I/O name: {axis: name}})
    are set on the graph's I/O after the passes (an encoder-decoder's optimum axis names); `metadata` is added to
    the file's metadata props. `what` names the part in errors ("decoder_model.onnx", "task text-generation"),
    `label` in the steps announced ("tracing <label>"; "" for a single file); `user_inputs` says the caller gave the
    sample inputs (a torch failure is then bad input, else a bug of ours). `trace_context()` is entered around the
    capture (rope's traceable frequencies, frozen parameters)."""

    path: Path
    module: nn.Module
    args: tuple | dict
    input_names: list[str]
    dynamic: Any = None
    spec: TaskSpec | None = None
    adapters: list[dict] = field(default_factory=list)
    swap_adapter: str | None = None
    axes: dict[str, dict[int, str]] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    what: str = ""
    label: str = ""
    user_inputs: bool = False
    trace_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def export_part(part: Part, context: ExportContext, *, opset: int | None = None, optimize: bool = True,
                target: str = "onnxruntime", external_data: bool | None = None,
                on_step: Callable[[str], None] | None = None, on_weights_read: Callable[[], None] | None = None,
                save: Save | None = None) -> ExportResult:
    """Capture, post-process and save one part (see the module docstring); the model must be in `context`'s
    prepared form (`context.prepared(model)`) while this runs. `opset`, `optimize`, `target`, `external_data`,
    `on_step` and `on_weights_read` are `road_export.export`'s parameters; `save` replaces the default save
    (result.save_and_swap). Returns what was written. Raises RoadError (bad input, a file onnxruntime cannot load)
    or ExportBug (torch failing on inputs road-export built) from capture.torch_export and the save."""
    step = on_step or (lambda _name: None)
    label = f" {part.label}" if part.label else ""
    step(f"tracing{label}")
    with part.trace_context():
        ir_model = capture.torch_export(part.module, part.args, list(part.input_names), part.dynamic, opset,
                                        what=part.what, user_inputs=part.user_inputs)
    if context.merges is not None:
        stream.LazyWeightsPass(context.merges)(ir_model)
    layer_of = swappable_layers(next(a for a in part.adapters if a["name"] == part.swap_adapter)) \
        if part.swap_adapter is not None else None
    plan = post.PostExportPlan(context.mode, part.spec, part.adapters, opset=opset, swappable_layers=layer_of,
                               optimize=optimize, target=target, axes=part.axes, metadata=part.metadata)
    post.post_export_passes(plan, on_step=step)(ir_model)
    outputs = [str(v.name) for v in ir_model.graph.outputs]  # every graph output is named
    nodes = road_nodes(ir_model)
    step(f"writing{label}")
    if save is not None:
        data, files = save(ir_model, part)
    else:
        data, files = save_and_swap(ir_model, part.path, external_data, part.swap_adapter, on_weights_read)
    return ExportResult(part.path, context.mode, part.spec.task if part.spec else None, list(part.input_names),
                        outputs, nodes, part.adapters, data, files)


def export_parts(parts: Iterable[Part], context: ExportContext, **options) -> list[ExportResult]:
    """`export_part` on each part in order (the same options for all); the results in that order."""
    return [export_part(part, context, **options) for part in parts]
