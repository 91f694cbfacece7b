"""Post-export steps on the captured onnx-ir model, each an onnx-ir pass, chained by `post_export_passes` as one
`ir.passes.Sequential`: the exact opset, the road function definitions, swappable coefficient inputs, onnxscript's
optimizer without inlining, the road pass pipeline (other modes: its attention pass alone), optimum's output and
axis names (a part's own axis names after them), and the metadata records.

Like torch's exporter, which runs its own passes on the captured program before saving, these touch the graph only:
no torch here. `check_loadable` is the last check before a file is moved into place.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir

from road_export.graph import ops as road_op
from road_export.core.errors import RoadError, first_line
from road_export.export.capture import quiet
from road_export.export.tasks import TaskSpec
from road_export.core.names import (
    BATCH,
    METADATA_ADAPTERS,
    METADATA_MODE,
    METADATA_TASK,
    METADATA_VERSION,
    PRESENT,
    SEQUENCE,
    TOTAL_SEQUENCE,
)
from road_export.passes import pipeline
from road_export.passes.attention import AttentionPass

__all__ = [
    "AttachFunctionsPass", "AxisNamesPass", "ConvertOpsetPass", "MetadataPass", "OptimizePass", "OutputNamesPass",
    "SwappableInputsPass", "PostExportPlan", "check_loadable", "post_export_passes",
]


class ConvertOpsetPass(ir.passes.InPlacePass):
    """Make the default-domain opset exactly `opset`: the torch exporter writes 18 to 25 and silently keeps 18 for
    others, so convert (onnxscript's version converter, falling back to onnx's). Raises RoadError when it cannot."""

    def __init__(self, opset: int) -> None:
        super().__init__()
        self.opset = opset

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset, written = self.opset, model.opset_imports.get("")
        if written == opset:
            return ir.passes.PassResult(model, modified=False)
        import onnxscript.version_converter

        try:
            with warnings.catch_warnings(), quiet():
                warnings.simplefilter("ignore")
                onnxscript.version_converter.convert_version(model, opset, fallback=True)
        except Exception as e:
            first = first_line(e)
            raise RoadError(f"--opset {opset}: the exporter wrote opset {written} and it cannot be converted "
                            f"({first}); choose --opset 18 (or leave it out)") from e
        if model.opset_imports.get("") != opset:
            raise RoadError(f"--opset {opset}: the exporter wrote opset {written} and the conversion left "
                            f"{model.opset_imports.get('')}; choose --opset 18 (or leave it out)")
        return ir.passes.PassResult(model, modified=True)


class AttachFunctionsPass(ir.passes.InPlacePass):
    """Add the definitions of the road ops the graph uses (ops.attach_functions); the exporter emits bare nodes."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = set(model.functions)
        road_op.attach_functions(model)
        return ir.passes.PassResult(model, modified=set(model.functions) != before)


class SwappableInputsPass(ir.passes.InPlacePass):
    """Road coefficients become overridable initializers (graph inputs with defaults) and the swap record is
    written (road_export.graph.swap.make_swappable); `layer_of` maps each C1 initializer name to its layer path."""

    def __init__(self, layer_of: dict[str, str]) -> None:
        super().__init__()
        self.layer_of = layer_of

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from road_export.graph import swap

        records = swap.make_swappable(model, self.layer_of)
        return ir.passes.PassResult(model, modified=bool(records))


class OptimizePass(ir.passes.InPlacePass):
    """onnxscript's optimizer without inlining, so the road nodes stay one per layer; the road domain stays
    declared (the optimizer may drop the opset of a function it saw no node of). `on_start` announces the step."""

    def __init__(self, on_start: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.on_start = on_start

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        import onnxscript.optimizer

        if self.on_start is not None:
            self.on_start("optimizing")
        with warnings.catch_warnings(), quiet():
            warnings.simplefilter("ignore")
            onnxscript.optimizer.optimize(model, inline=False)
        if any(n.domain == road_op.DOMAIN for n in model.graph.all_nodes()):
            model.opset_imports[road_op.DOMAIN] = road_op.VERSION
        return ir.passes.PassResult(model, modified=True)


class OutputNamesPass(ir.passes.InPlacePass):
    """The task's output names (optimum's: `logits`, `present.{i}.key`, ...) on the graph outputs, and optimum's
    axis names on the graph's I/O (road_export.core.names): under a cache the attention mask and the present
    keys/values span `past_sequence_length + sequence_length` (instead of the exporter's own symbol, `a + b` or
    `b + a`), outputs lead with `batch_size` (and `sequence_length` for logits / last_hidden_state). Left alone
    when the graph has another number of outputs than the task names."""

    def __init__(self, spec: TaskSpec) -> None:
        super().__init__()
        self.spec = spec

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        outputs = model.graph.outputs
        if len(outputs) != len(self.spec.output_names):
            return ir.passes.PassResult(model, modified=False)
        for value, name in zip(outputs, self.spec.output_names, strict=True):
            value.name = name
        for value in model.graph.inputs:
            if value.name == "attention_mask" and self.spec.cache:
                _rename_axes(value, {1: TOTAL_SEQUENCE})
        for value in outputs:
            if value.name.startswith(PRESENT):
                _rename_axes(value, {0: BATCH, 2: TOTAL_SEQUENCE})
            elif value.name in ("logits", "last_hidden_state"):
                _rename_axes(value, {0: BATCH, 1: SEQUENCE})
            else:
                _rename_axes(value, {0: BATCH})
        return ir.passes.PassResult(model, modified=True)


def _rename_axes(value: ir.Value, axes: dict[int, str]) -> None:
    """Give the symbolic axes `axes` ({axis: name}) of a graph input/output these names; fixed sizes stay."""
    if value.shape is None:
        return
    dims = list(value.shape)
    for axis, name in axes.items():
        if axis < len(dims) and not isinstance(dims[axis], int):
            dims[axis] = ir.SymbolicDim(name)
    value.shape = ir.Shape(dims)


class AxisNamesPass(ir.passes.InPlacePass):
    """Name the symbolic axes of graph inputs and outputs as `axes` says ({I/O name: {axis: name}}), e.g. an
    encoder-decoder's optimum names (`encoder_sequence_length`, `past_decoder_sequence_length + 1`); fixed sizes
    and I/O not named in `axes` stay."""

    def __init__(self, axes: dict[str, dict[int, str]]) -> None:
        super().__init__()
        self.axes = axes

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for value in [*model.graph.inputs, *model.graph.outputs]:
            axes = self.axes.get(value.name)
            if axes and value.shape is not None:
                _rename_axes(value, axes)
                modified = True
        return ir.passes.PassResult(model, modified=modified)


class MetadataPass(ir.passes.InPlacePass):
    """The `road_export.*` metadata props: version, mode (merge|rotate), task, adapters (a JSON list of
    {name, variant, group_size, layers[, id]}); then `extra` (records of the rope, of an encoder-decoder part)."""

    def __init__(self, mode: str, task: str | None, adapters: list[dict], extra: dict[str, str] | None = None) -> None:
        super().__init__()
        self.mode, self.task, self.adapters, self.extra = mode, task, adapters, dict(extra or {})

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from road_export.core.version import __version__

        props = model.metadata_props
        props[METADATA_VERSION] = __version__
        props[METADATA_MODE] = self.mode
        if self.task:
            props[METADATA_TASK] = self.task
        props[METADATA_ADAPTERS] = json.dumps(self.adapters)
        props.update(self.extra)
        return ir.passes.PassResult(model, modified=True)


@dataclasses.dataclass
class PostExportPlan:
    """What the post-export steps need to know about the capture."""

    mode: str
    spec: TaskSpec | None
    adapters: list[dict]
    opset: int | None = None
    swappable_layers: dict[str, str] | None = None  # C1 initializer -> layer path, for a swappable export
    optimize: bool = True
    target: str = "onnxruntime"
    axes: dict[str, dict[int, str]] | None = None  # I/O axis names set after the output names (AxisNamesPass)
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)  # more metadata props (MetadataPass)


def post_export_passes(plan: PostExportPlan, on_step: Callable[[str], None] | None = None) -> pipeline.Pipeline:
    """The post-export passes for `plan`, in order, as one `pipeline.Pipeline` (an `ir.passes.Sequential` whose
    errors propagate as raised, so a RoadError stays one line); the road pass pipeline is nested in it."""
    steps: list[ir.passes.PassBase] = []
    if plan.opset is not None:
        steps.append(ConvertOpsetPass(plan.opset))
    if plan.mode == "rotate":
        steps.append(AttachFunctionsPass())
    if plan.swappable_layers is not None:
        steps.append(SwappableInputsPass(plan.swappable_layers))
    if plan.optimize:
        steps.append(OptimizePass(on_step))
    if plan.mode == "rotate":
        steps.append(pipeline.passes(target=plan.target))  # ends with the attention pass
    elif plan.optimize:
        steps.append(AttentionPass())  # merged and base exports run the same attention as rotate ones
    if plan.spec is not None:
        steps.append(OutputNamesPass(plan.spec))
    if plan.axes:
        steps.append(AxisNamesPass(plan.axes))
    steps.append(MetadataPass(plan.mode, plan.spec.task if plan.spec else None, plan.adapters, plan.metadata))
    return pipeline.Pipeline(*steps)


def check_loadable(path: Path) -> None:
    """Raise RoadError unless onnxruntime loads the file (graph optimizations off: this checks, it does not run)."""
    import onnxruntime as ort

    from road_export.graph.ort_session import new_session

    # no weight prepacking: onnxruntime then maps aligned external data instead of copying it (files.DATA_ALIGNMENT),
    # so this check costs next to no memory beside the exporting model
    new_session(path, log_severity=3, optimize=False, session_config={"session.disable_prepacking": "1"},
                refusal=lambda line: f"onnxruntime {ort.__version__} cannot load the exported model ({line[:300]}); "
                "nothing was written (with --opset: choose one onnxruntime runs, e.g. 18)")
