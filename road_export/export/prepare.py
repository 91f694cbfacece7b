"""Preparing the model for capture: adopt a live peft model, check and order its adapters, then swap in for the
trace plain layers holding merged weights (merge mode) or `CaptureLayer`s holding the coefficients as buffers
(rotate mode). What one export sets up for its trace lives in an `ExportContext`, never on the RoadLayers.

Everything here is undone when its context exits: the user's model is left as it was. Follows peft's RoAd layer
(`src/peft/tuners/road/layer.py`): the merge is peft's `merge` (R W, R b) computed row-wise, without the dense R.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
from collections.abc import Iterator

import torch
from torch import nn

from road_export.export import model as road_model
from road_export.core import rotation
from road_export.core.errors import RoadError
from road_export.export import op as torch_op
from road_export.export.layers import RoadLayer

__all__ = [
    "MODES", "CaptureLayer", "ExportContext", "Merge", "adopted", "buffer_names", "describe_adapters", "merge_plan",
    "merged_copy", "parse_dtype", "plan_adapters", "prepared",
]

MODES = ("merge", "rotate")


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None, torch.float32/float16, or their names ("float32", "fp32", "float16", "fp16") -> a torch dtype or None.

    Raises RoadError for any other dtype or name."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, torch.float32, torch.float16):
            raise RoadError(f"unsupported dtype {dtype}; choose float32 or float16")
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise RoadError(f"unknown dtype {dtype!r}; choose float32 or float16")
    return table[dtype]


# transformers' float16 overflow clamp, which branches on the values (`if hidden_states.dtype == torch.float16 and
# not torch.isfinite(hidden_states).all(): clamp`): torch.export cannot trace a branch on data ("Could not guard on
# data-dependent expression"); BART, Marian, PLBart, LED, BlenderbotSmall, ... carry it in their layers
_VALUE_BRANCH = re.compile(r"float16.*\n?.*isfinite\([^)]*\)\.all\(\)|isfinite\([^)]*\)\.all\(\).*float16")


def check_traceable(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Refuse, before any tracing, a model road-export cannot export in `dtype`: in float16, a layer whose forward
    branches on its values in float16 (transformers' overflow clamp, found in the layer class's own source, see
    _VALUE_BRANCH). One line naming the model, the layer class and the way out (float32). Raises RoadError."""
    import inspect

    if dtype != torch.float16:
        return
    seen: set[type] = set()
    for module in model.modules():
        cls = type(module)
        if cls in seen or not cls.__module__.startswith("transformers."):
            continue
        seen.add(cls)
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            continue
        if _VALUE_BRANCH.search(source):
            name = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
            raise RoadError(f"{name}: {cls.__name__} branches on its values in float16 (transformers' overflow clamp "
                            "`if ... torch.float16 and not torch.isfinite(hidden_states).all()`), which torch.export "
                            "cannot trace; export it in float32 (without --dtype float16)")


def describe_adapters(model: nn.Module) -> list[dict]:
    """Name, variant, group size and adapted layers of every adapter on the model (the `road_export.adapters`
    metadata record: {"name", "variant", "group_size", "layers"})."""
    layers = road_model.road_layers(model)
    out = []
    for name, config in (getattr(model, "road_config", None) or {}).items():
        adapted = [path for path, layer in layers.items() if name in layer.road_theta]
        if adapted:
            out.append({"name": name, "variant": config.variant, "group_size": config.group_size,
                        "layers": adapted})
    return out


def plan_adapters(model: nn.Module, mode: str, *, require_adapter: bool = True,
                  name: str | None = None) -> tuple[list[dict], tuple[str, ...]]:
    """(adapter records, mixed-batch order) for exporting `model` in `mode`.

    Several adapters in rotate mode make a mixed-adapter graph: each record gets its `adapter_ids` row ("id", from
    1; 0 is the base model) and the order is their names; otherwise the order is empty. Raises RoadError for an
    unknown mode, no adapter (unless `require_adapter=False` in merge mode), or several adapters in merge mode.
    """
    if mode not in MODES:
        raise RoadError(f"unknown mode {mode!r}; choose merge or rotate")
    adapters = describe_adapters(model)
    if not adapters and (require_adapter or mode == "rotate"):
        raise RoadError(f"{name or type(model).__name__} has no RoAd adapter; load one with road_export.load_adapter "
                        "first")
    if mode == "merge" and len(adapters) > 1:
        raise RoadError(f"merge mode takes one adapter, the model has {len(adapters)} "
                        f"({', '.join(a['name'] for a in adapters)}); use mode='rotate' for a mixed-adapter graph")
    if mode != "rotate" or len(adapters) < 2:
        return adapters, ()
    for i, adapter in enumerate(adapters):
        adapter["id"] = i + 1
    return adapters, tuple(a["name"] for a in adapters)


@contextlib.contextmanager
def adopted(model: nn.Module) -> Iterator[nn.Module]:
    """Our model as is; a live peft model's RoAd layers adopted (`adapters.from_peft`) for the duration, then put
    back, so the peft model is unchanged afterwards. Needs peft for a peft model."""
    if not hasattr(model, "peft_config"):
        yield model
        return
    from peft.tuners.road.layer import RoadLayer as PeftRoadLayer
    from peft.utils.other import ModulesToSaveWrapper

    from road_export.export.adapters import from_peft

    base = model.get_base_model()
    originals = {name: m for name, m in base.named_modules() if name}
    replaced = {n: m for n, m in originals.items() if isinstance(m, PeftRoadLayer | ModulesToSaveWrapper)}
    adopted_model = from_peft(model)
    try:
        yield adopted_model
    finally:
        for name, module in replaced.items():
            road_model._replace(base, name, module)
        if hasattr(base, "road_config"):
            del base.road_config


@dataclasses.dataclass
class ExportContext:
    """One export's state for the trace, held here and not on the model's layers: the mode, the dtype, the
    mixed-batch order (adapter names by `adapter_ids` row, empty for a single adapter); for a streaming merge
    export the lazy merges (`merges`, layer path -> `Merge`, filled by `prepared` and read by
    export/stream.LazyWeightsPass); while `prepared` is active in rotate mode, the `CaptureLayer` standing in for
    each RoadLayer (`captured`, by layer path). The pipeline (export/pipeline.py) reads it; the RoadLayers
    themselves are never changed by an export."""

    mode: str
    dtype: torch.dtype | None = None
    order: tuple[str, ...] = ()
    merges: dict[str, Merge] | None = None  # a dict to fill: weights merged as they are written (streaming)
    captured: dict[str, CaptureLayer] = dataclasses.field(default_factory=dict)

    @contextlib.contextmanager
    def prepared(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model as it will be traced (eval mode; a float16 copy for dtype float16 unless it is float16
        already); undone on exit.

        merge: each RoadLayer is replaced by `merged_copy(layer)`; with `merges` (a dict), by its own base layer
        instead (no copy) and `merges[layer path] = merge_plan(layer)`, for the exporter to merge each weight when
        it is written (export/stream.py). A layer whose weight is shared with another module (tied) is always
        merged eagerly. rotate: each RoadLayer is replaced by a `CaptureLayer` (its coefficients as buffers, the
        rotation as `torch.ops.road.rotate`). Raises RoadError in rotate mode for a layer with merged adapters."""
        mode, lazy_merges = self.mode, self.merges
        target = model
        if self.dtype is not None and self.dtype != torch.float32 and any(  # the adapters' theta/alpha may stay fp32
                p.is_floating_point() and p.dtype != self.dtype for n, p in model.named_parameters()
                if ".road_" not in n):
            target = copy.deepcopy(model).to(self.dtype)
        layers = road_model.road_layers(target)
        was_training = target.training
        target.eval()
        undo: list = []
        try:
            if mode == "merge":
                shared = _shared_parameters(target) if lazy_merges is not None else set()
                for name, layer in layers.items():
                    lazy = lazy_merges is not None and id(layer.base_layer.weight) not in shared
                    plan = merge_plan(layer) if lazy else None
                    if plan is not None:
                        lazy_merges[name] = plan
                    road_model._replace(target, name, layer.base_layer if lazy else merged_copy(layer))
                    undo.append(lambda name=name, layer=layer: road_model._replace(target, name, layer))
            else:
                for name, layer in layers.items():
                    if layer.merged:
                        raise RoadError(f"module {layer.module_name} has merged adapters; unmerge before rotate "
                                        "export")
                    self.captured[name] = CaptureLayer(layer, self.dtype, self.order)
                    road_model._replace(target, name, self.captured[name])
                    undo.append(lambda name=name, layer=layer: road_model._replace(target, name, layer))
            yield target
        finally:
            for fn in reversed(undo):
                fn()
            self.captured.clear()
            target.train(was_training)


def prepared(model: nn.Module, mode: str, dtype: torch.dtype | None, order: tuple[str, ...] = (),
             lazy_merges: dict[str, Merge] | None = None):
    """`ExportContext(mode, dtype, order, merges=lazy_merges).prepared(model)`: the model as it will be traced, as a
    context manager (see ExportContext.prepared)."""
    return ExportContext(mode, dtype, order, merges=lazy_merges).prepared(model)


class Merge:
    """One layer's merge, W' = R W and b' = R b (row-wise in float32, then the tensor's dtype), as functions of the
    base tensors: `weight(W)`, `bias(b)` (torch tensors in, new tensors out; the inputs are not touched)."""

    def __init__(self, c1: torch.Tensor, c2: torch.Tensor, group_size: int, axis: int) -> None:
        self.c1, self.c2, self.group_size, self.axis = c1, c2, group_size, axis

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            merged = rotation.merge_(w.detach().float().clone().contiguous(), self.c1, self.c2, self.group_size,
                                     axis=self.axis)
            return merged.to(w.dtype)

    def bias(self, b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return rotation.merge_(b.detach().float().clone(), self.c1, self.c2, self.group_size).to(b.dtype)


def merge_plan(layer: RoadLayer) -> Merge | None:
    """The layer's active adapter as a `Merge`; None when there is nothing to merge (no active adapter, merged
    already, or disabled)."""
    name = layer.active_adapter
    if name is None or layer.merged or layer.disabled:
        return None
    with torch.no_grad():
        c1, c2 = layer.coefficients(name)
        return Merge(c1.detach().float(), c2.detach().float(), layer.group_size[name], layer.weight_axis)


def _shared_parameters(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


def merged_copy(layer: RoadLayer) -> nn.Module:
    """A new plain layer with the active adapter merged (`merge_plan`: W' = R W, b' = R b); the original layer's
    tensors are not touched. No active adapter, merged or disabled: the base layer."""
    base = layer.base_layer
    plain = copy.copy(base)
    plain._parameters = dict(base._parameters)
    plan = merge_plan(layer)
    if plan is None:
        return plain
    plain.weight = nn.Parameter(plan.weight(base.weight), requires_grad=False)
    if base.bias is not None:
        plain.bias = nn.Parameter(plan.bias(base.bias), requires_grad=False)
    return plain


def buffer_names(adapter: str) -> tuple[str, str]:
    """Names of the coefficient buffers (and so of the ONNX initializers, after the layer path):
    `road_c1_<adapter>`, `road_c2_<adapter>` with non-word characters replaced by `_`."""
    safe = re.sub(r"\W", "_", adapter)
    return f"road_c1_{safe}", f"road_c2_{safe}"


class CaptureLayer(RoadLayer):
    """Stands in for one RoadLayer while a rotate-mode export traces the model (ExportContext.prepared): the same
    base layer, adapter parameters and routing (active adapter, per-row ids), with the coefficients as buffers so
    the exporter writes them as named initializers, and `torch.ops.road.rotate` as the rotation (one `road.Rotate`
    node per layer). Registered at the RoadLayer's path, so initializer names are those of the layer:
    `<path>.base_layer.weight`, `<path>.road_c1_<adapter>` (`buffer_names`).

    One adapter per layer: c1/c2 [d] per adapter. A mixed-batch `order`: per group size g, banks
    [len(order) + 1, d] (`road_bank_c1_g<g>`, row 0 identity) gathered by `adapter_ids`. Buffers are cast to
    `dtype` (None: the coefficients' own). The RoadLayer it is made from is not changed."""

    def __init__(self, layer: RoadLayer, dtype: torch.dtype | None, order: tuple[str, ...] = ()) -> None:
        super().__init__(layer.base_layer, layer.module_name)
        self.road_theta, self.road_alpha = layer.road_theta, layer.road_alpha  # the same parameters
        self.variant, self.group_size = dict(layer.variant), dict(layer.group_size)
        self.active_adapter, self.merged_adapters = layer.active_adapter, list(layer.merged_adapters)
        self.disabled, self.row_adapters = layer.disabled, layer.row_adapters
        self.row_ids, self.bank_order = layer.row_ids, list(layer.bank_order)
        self.coefficient_buffers: dict[str, tuple[str, str]] = {}  # adapter -> (c1, c2) buffer names
        self.bank_buffers: dict[int, tuple[str, str]] = {}  # group size -> (c1, c2) bank buffer names
        if order:
            for g, (bank1, bank2) in layer.banks(order).items():
                self.bank_buffers[g] = self._register(f"road_bank_c1_g{g}", f"road_bank_c2_g{g}", bank1, bank2, dtype)
        else:
            for adapter in layer.adapters:
                self.coefficient_buffers[adapter] = self._register(*buffer_names(adapter),
                                                                   *layer.coefficients(adapter), dtype)

    def _register(self, n1: str, n2: str, c1: torch.Tensor, c2: torch.Tensor, dtype) -> tuple[str, str]:
        for name, value in ((n1, c1), (n2, c2)):
            self.register_buffer(name, value.detach().to(dtype or value.dtype).clone(), persistent=False)
        return n1, n2

    def rotate(self, x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, group_size: int) -> torch.Tensor:
        """The torch custom op (export/op.py), which the exporter translates to one `road.Rotate` node."""
        return torch_op.ROTATE(x, c1, c2, group_size)

    def coefficients(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's coefficient buffers (c1, c2 [d])."""
        if adapter_name not in self.coefficient_buffers:
            return super().coefficients(adapter_name)
        n1, n2 = self.coefficient_buffers[adapter_name]
        return getattr(self, n1), getattr(self, n2)

    def banks(self, order) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """The bank buffers of a mixed export ({g: (bank c1, bank c2) [len(order) + 1, d]})."""
        if not self.bank_buffers:
            return super().banks(order)
        return {g: (getattr(self, n1), getattr(self, n2)) for g, (n1, n2) in self.bank_buffers.items()}
