"""`road_export.export`: a RoAd-adapted model to ONNX, merged into the weights or with `road` rotation nodes.

merge:  every adapted layer is replaced, for the trace only, by a plain layer holding R W and R b, so the file
        is the base model's graph with other weights.
rotate: every adapted layer calls torch.ops.road.rotate with its coefficients registered as buffers
        (`<layer>.road_c1_<adapter>`), which the exporter turns into one `road.Rotate` node per layer whose
        C1/C2 are named initializers.
The user's model is left as it was in both modes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
import torch
from torch import nn

from road_export import model as road_model
from road_export import rotation
from road_export.errors import RoadError
from road_export.export import op as road_op
from road_export.export.tasks import TaskModule, dynamic_shapes, infer_task, nest, task_spec, trace_inputs
from road_export.layers import RoadLayer

logger = logging.getLogger(__name__)

MODES = ("merge", "rotate")
TWO_GB = 2**31
METADATA_PREFIX = "road_export."


@dataclass
class ExportResult:
    """What was written: the file(s), and what the graph holds."""

    path: Path
    mode: str
    task: str | None
    input_names: list[str]
    output_names: list[str]
    road_nodes: int
    adapters: list[dict] = field(default_factory=list)
    external_data: Path | None = None
    adapter_files: list[Path] = field(default_factory=list)  # one `.onnx_adapter` per adapter (swappable exports)


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
) -> ExportResult:
    """Export a RoAd-adapted model (ours, or a live peft model) to ONNX at `path`.

    `task` defaults to the one the transformers class implies; other modules need `example_inputs`.
    `external_data=None` writes `<path>.data` only for models over 2 GB. On failure no file is left behind.
    `require_adapter=False` lets a model without adapter through in merge mode (the base model's export).
    `swappable` (rotate mode, one adapter): coefficients as overridable initializers plus an `.onnx_adapter` file,
    so onnxruntime can swap adapters per Run; False keeps them constants, which onnxruntime folds further.
    `target` picks the road function bodies (passes/lower.py): "onnxruntime" (road_1 through RotaryEmbedding) or
    "portable" (standard ops only).
    `on_step` is called with the name of each long step as it starts (tracing, optimizing, writing).
    """
    step = on_step or (lambda _name: None)
    if mode not in MODES:
        raise RoadError(f"unknown mode {mode!r}; choose merge or rotate")
    dtype = _parse_dtype(dtype)
    path = Path(path)
    if path.suffix != ".onnx":
        raise RoadError(f"{path}: the output file name must end in .onnx")
    check_writable(path)
    with _adopted(model) as adapted:
        adapters = describe_adapters(adapted)
        if not adapters and (require_adapter or mode == "rotate"):
            raise RoadError(
                f"{type(model).__name__} has no RoAd adapter; load one with road_export.load_adapter first"
            )
        mixed = mode == "rotate" and len(adapters) > 1
        if mode == "merge" and len(adapters) > 1:
            raise RoadError(f"merge mode takes one adapter, the model has {len(adapters)} "
                            f"({', '.join(a['name'] for a in adapters)}); use mode='rotate' for a mixed-adapter graph")
        order = tuple(a["name"] for a in adapters) if mixed else ()
        if mixed:
            for i, adapter in enumerate(adapters):
                adapter["id"] = i + 1
        with _prepared(adapted, mode, dtype, order) as prepared:
            module, args, names, spec, dynamic = _trace_plan(prepared, task, example_inputs, dtype, order)
            step("tracing")
            ir_model = _torch_export(module, args, names, dynamic, opset)
    if mode == "rotate":
        road_op.attach_functions(ir_model)
    swappable = swappable and mode == "rotate" and not order and bool(adapters) and spec is not None
    if swappable:
        from road_export import swap

        prefix = "model."  # TaskModule registers the transformers model as `model`
        c1_name = buffer_names(adapters[0]["name"])[0]
        layer_of = {f"{prefix}{layer}.{c1_name}": layer for layer in adapters[0]["layers"]}
        swap.make_swappable(ir_model, layer_of)
    if optimize:
        step("optimizing")
        _optimize(ir_model)
    if mode == "rotate":
        from road_export.passes import pipeline

        pipeline.run(ir_model, target=target)
    outputs = [v.name for v in ir_model.graph.outputs]
    if spec is not None and len(outputs) == len(spec.output_names):
        for value, name in zip(ir_model.graph.outputs, spec.output_names, strict=True):
            value.name = name
        outputs = list(spec.output_names)
        if spec.cache:
            _name_cache_axes(ir_model)
    _set_metadata(ir_model, mode, spec.task if spec else None, adapters)
    road_nodes = sum(1 for node in ir_model.graph.all_nodes() if node.domain == road_op.DOMAIN)
    step("writing")
    # the swap file's values are read before saving: an external-data save re-points the tensors
    values = {v.name: v.const_value.numpy() for v in ir_model.graph.inputs if v.const_value is not None} \
        if swappable else {}
    data = _save_atomic(ir_model, path, external_data)
    files = []
    if swappable:
        files.append(swap.write_adapter_file(swap.adapter_file_path(path, adapters[0]["name"]), values))
    return ExportResult(path, mode, spec.task if spec else None, list(names), outputs, road_nodes, adapters, data,
                        files)


def _name_cache_axes(model: ir.Model) -> None:
    """Present keys/values grow to the attention mask's length: one axis name instead of `a + b` / `b + a`."""
    for value in model.graph.outputs:
        if value.name.startswith("present.") and value.shape is not None and len(value.shape) == 4:
            dims = list(value.shape)
            value.shape = ir.Shape([dims[0], dims[1], ir.SymbolicDim("total_sequence"), dims[3]])


def check_writable(path: Path) -> None:
    """Fail before the long work when `path` cannot be written."""
    if path.is_dir():
        raise RoadError(f"{path}: is a directory; give a file name ending in .onnx")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise RoadError(f"{path}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise RoadError(f"{path}: directory {parent} is not writable; choose another output path")


def _parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, torch.float32, torch.float16):
            raise RoadError(f"unsupported dtype {dtype}; choose float32 or float16")
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise RoadError(f"unknown dtype {dtype!r}; choose float32 or float16")
    return table[dtype]


def describe_adapters(model: nn.Module) -> list[dict]:
    """Name, variant, group size and adapted layers of every adapter on the model."""
    layers = road_model.road_layers(model)
    out = []
    for name, config in (getattr(model, "road_config", None) or {}).items():
        adapted = [path for path, layer in layers.items() if name in layer.road_theta]
        if adapted:
            out.append({"name": name, "variant": config.variant, "group_size": config.group_size,
                        "layers": adapted})
    return out


@contextlib.contextmanager
def _adopted(model: nn.Module) -> Iterator[nn.Module]:
    """Our model as is; a peft model's RoAd layers adopted for the duration, then put back."""
    if not hasattr(model, "peft_config"):
        yield model
        return
    from road_export.adapters import from_peft

    base = model.get_base_model()
    originals = {name: m for name, m in base.named_modules() if name}
    from peft.tuners.road.layer import RoadLayer as PeftRoadLayer
    from peft.utils.other import ModulesToSaveWrapper

    replaced = {n: m for n, m in originals.items() if isinstance(m, PeftRoadLayer | ModulesToSaveWrapper)}
    adopted = from_peft(model)
    try:
        yield adopted
    finally:
        for name, module in replaced.items():
            road_model._replace(base, name, module)
        if hasattr(base, "road_config"):
            del base.road_config


@contextlib.contextmanager
def _prepared(model: nn.Module, mode: str, dtype: torch.dtype | None, order: tuple[str, ...] = ()
              ) -> Iterator[nn.Module]:
    """The model as it will be traced; everything done here is undone on exit."""
    target = model
    if dtype is not None and dtype != torch.float32:
        target = copy.deepcopy(model).to(dtype)
    layers = road_model.road_layers(target)
    was_training = target.training
    target.eval()
    undo: list = []
    try:
        if mode == "merge":
            for name, layer in layers.items():
                plain = _merged_copy(layer)
                road_model._replace(target, name, plain)
                undo.append(lambda name=name, layer=layer: road_model._replace(target, name, layer))
        else:
            for layer in layers.values():
                if layer.merged:
                    raise RoadError(f"module {layer.module_name} has merged adapters; unmerge before rotate export")
                _freeze_coefficients(layer, dtype, order)
                undo.append(lambda layer=layer: _thaw_coefficients(layer))
        yield target
    finally:
        for fn in reversed(undo):
            fn()
        target.train(was_training)


def _merged_copy(layer: RoadLayer) -> nn.Module:
    """A new plain layer with the active adapter merged; the original layer's tensors are not touched."""
    base = layer.base_layer
    plain = copy.copy(base)
    plain._parameters = dict(base._parameters)
    name = layer.active_adapter
    if name is None or layer.merged or layer.disabled:
        return plain
    c1, c2 = layer.coefficients(name)
    g = layer.group_size[name]
    with torch.no_grad():
        c1, c2 = c1.detach().float(), c2.detach().float()
        w = rotation.merge_(base.weight.detach().float().clone().contiguous(), c1, c2, g, axis=layer.weight_axis)
        plain.weight = nn.Parameter(w.to(base.weight.dtype), requires_grad=False)
        if base.bias is not None:
            b = rotation.merge_(base.bias.detach().float().clone(), c1, c2, g)
            plain.bias = nn.Parameter(b.to(base.bias.dtype), requires_grad=False)
    return plain


def buffer_names(adapter: str) -> tuple[str, str]:
    """Names of the coefficient buffers (and so of the ONNX initializers, after the layer path)."""
    safe = re.sub(r"\W", "_", adapter)
    return f"road_c1_{safe}", f"road_c2_{safe}"


def _freeze_coefficients(layer: RoadLayer, dtype: torch.dtype | None, order: tuple[str, ...] = ()) -> None:
    """Coefficients become buffers, so the exporter writes them as named initializers."""
    if order:
        banks = layer.banks(order)
        layer.frozen_banks = {}
        for g, (bank1, bank2) in banks.items():
            n1, n2 = f"road_bank_c1_g{g}", f"road_bank_c2_g{g}"
            layer.register_buffer(n1, bank1.detach().to(dtype or bank1.dtype).clone(), persistent=False)
            layer.register_buffer(n2, bank2.detach().to(dtype or bank2.dtype).clone(), persistent=False)
            layer.frozen_banks[g] = (n1, n2)
        layer.rotate_fn = torch.ops.road.rotate
        return
    names = list(layer.road_theta.keys())
    for adapter in names:
        c1, c2 = layer.coefficients(adapter)
        n1, n2 = buffer_names(adapter)
        layer.register_buffer(n1, c1.detach().to(dtype or c1.dtype).clone(), persistent=False)
        layer.register_buffer(n2, c2.detach().to(dtype or c2.dtype).clone(), persistent=False)
    layer.frozen = {a: buffer_names(a) for a in names}
    layer.rotate_fn = torch.ops.road.rotate


def _thaw_coefficients(layer: RoadLayer) -> None:
    for n1, n2 in [*layer.frozen.values(), *layer.frozen_banks.values()]:
        delattr(layer, n1)
        delattr(layer, n2)
    layer.frozen, layer.frozen_banks = {}, {}
    layer.rotate_fn = rotation.rotate


def _trace_plan(model: nn.Module, task: str | None, example_inputs, dtype, order: tuple[str, ...] = ()):
    """(module to trace, args, input names, task spec or None, dynamic shapes)."""
    is_transformers = hasattr(model, "config") and hasattr(model.config, "vocab_size")
    if example_inputs is None and not is_transformers:
        raise RoadError(f"{type(model).__name__} is not a transformers model; pass example_inputs")
    if example_inputs is None or task is not None:
        spec = task_spec(model, task or infer_task(model), order)
        if isinstance(example_inputs, dict):
            if set(example_inputs) != set(spec.input_names):
                raise RoadError(f"example_inputs for task {spec.task} must be {list(spec.input_names)}")
            args = nest(spec, example_inputs)
        else:
            args = trace_inputs(model, spec)
        return TaskModule(model, spec), args, list(spec.input_names), spec, dynamic_shapes(spec)
    if isinstance(example_inputs, dict):
        names, args = list(example_inputs), tuple(example_inputs.values())
    else:
        args = tuple(example_inputs)
        names = [f"input_{i}" for i in range(len(args))]
    if dtype is not None:
        args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    return _Positional(model, names), args, names, None, None


class _Positional(nn.Module):
    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args):
        return self.model(*args)


def _torch_export(module: nn.Module, args: tuple, names: list[str], dynamic, opset: int | None) -> ir.Model:
    with warnings.catch_warnings(), _quiet_torch():
        warnings.simplefilter("ignore")
        try:
            kwargs = args if isinstance(args, dict) else None
            program = torch.onnx.export(
                module,
                () if kwargs is not None else args,
                kwargs=kwargs,
                dynamo=True,
                optimize=False,
                opset_version=opset,
                input_names=names,
                dynamic_shapes=dynamic,
                custom_translation_table=road_op.translation_table(),
                verbose=False,
            )
        except RoadError:
            raise
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RoadError(f"torch.onnx.export failed for {type(module.model).__name__}: {first}") from e
    return program.model


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """torch.export and the ONNX exporter log a lot at WARNING; keep the user's terminal readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx",
                                               "torch._export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _optimize(model: ir.Model) -> None:
    """onnxscript's optimizer without inlining, so the road nodes stay one per layer."""
    import onnxscript.optimizer

    with warnings.catch_warnings(), _quiet_torch():
        warnings.simplefilter("ignore")
        onnxscript.optimizer.optimize(model, inline=False)
    # The optimizer may drop the function's opset if it saw no node of it; keep the road domain declared.
    if any(n.domain == road_op.DOMAIN for n in model.graph.all_nodes()):
        model.opset_imports[road_op.DOMAIN] = road_op.VERSION


def _set_metadata(model: ir.Model, mode: str, task: str | None, adapters: list[dict]) -> None:
    from road_export import __version__

    props = model.metadata_props
    props[METADATA_PREFIX + "version"] = __version__
    props[METADATA_PREFIX + "mode"] = mode
    if task:
        props[METADATA_PREFIX + "task"] = task
    props[METADATA_PREFIX + "adapters"] = json.dumps(adapters)


def _save_atomic(model: ir.Model, path: Path, external_data: bool | None) -> Path | None:
    """Write into a temporary directory beside `path`, then rename: no half-written file is ever visible."""
    check_writable(path)
    parent = path.parent if str(path.parent) else Path(".")
    if external_data is None:
        external_data = _tensor_bytes(model) > TWO_GB - 64 * 2**20
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    data_name = path.name + ".data"
    try:
        if external_data:
            ir.save(model, tmp / path.name, external_data=data_name)
        else:
            ir.save(model, tmp / path.name)
        final_data = None
        from road_export.checks import deferred_signals

        with deferred_signals():  # an interruption leaves the old model and data file, or the new ones
            if external_data:
                final_data = path.with_name(data_name)
                os.replace(tmp / data_name, final_data)
            elif path.with_name(data_name).exists():
                path.with_name(data_name).unlink()  # a stale data file of an earlier export
            os.replace(tmp / path.name, path)
        return final_data
    except OSError as e:
        from road_export.checks import write_failure_reason

        raise RoadError(f"{path}: cannot write ({write_failure_reason(e, path)})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_for_rewrite(source: str | os.PathLike, target: str | os.PathLike) -> tuple[ir.Model, bool]:
    """Check both paths, load `source` (external data stays lazy) and say whether to write external data."""
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise RoadError(f"{source}: no such ONNX file")
    if target.suffix != ".onnx":
        raise RoadError(f"{target}: the output file name must end in .onnx")
    check_writable(target)
    try:
        model = ir.load(source)
    except Exception as e:
        raise RoadError(f"{source}: not a readable ONNX model ({str(e).splitlines()[0]})") from e
    external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    return model, external or _tensor_bytes(model) > TWO_GB - 64 * 2**20


def _tensor_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
