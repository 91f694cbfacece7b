"""RoadLayer: a linear layer (nn.Linear or GPT-2's Conv1D) whose output is rotated by one or more adapters.

Parameter names and shapes are peft's (`base_layer`, `road_theta.<adapter>`, `road_alpha.<adapter>`), so state
dicts and adapter files map one to one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from road_export.core import rotation
from road_export.core.config import RoadConfig
from road_export.core.errors import RoadError
from road_export.core.names import BASE_NAME


def conv1d_class() -> type | None:
    """transformers' GPT-2 `Conv1D` class (weight [in, out]), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return None
    return Conv1D


def is_supported_base(module: nn.Module) -> bool:
    """Whether a RoadLayer can wrap `module`: nn.Linear (peft's only RoAd target) or transformers' Conv1D."""
    conv1d = conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def output_axis(module: nn.Module) -> int:
    """Axis of a linear layer's weight that indexes outputs: 0 for nn.Linear [out, in], 1 for Conv1D [in, out]."""
    return 0 if isinstance(module, nn.Linear) else 1


class RoadLayer(nn.Module):
    """Wraps a linear layer; `forward` returns base(x) rotated by the active adapter (or per row)."""

    def __init__(self, base_layer: nn.Module, name: str = "") -> None:
        super().__init__()
        if not is_supported_base(base_layer):
            raise RoadError(
                f"module {name or type(base_layer).__name__}: RoAd wraps nn.Linear or Conv1D, "
                f"not {type(base_layer).__name__}; remove it from target_modules"
            )
        self.base_layer = base_layer
        self.road_theta = nn.ParameterDict()
        self.road_alpha = nn.ParameterDict()
        self.variant: dict[str, str] = {}
        self.group_size: dict[str, int] = {}
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: Sequence[str] | None = None  # set by model.mixed_batch()
        self.row_ids: torch.Tensor | None = None  # int64 [batch], set by model.adapter_ids(); 0 = no adapter
        self.bank_order: list[str] = []  # adapter of id k is bank_order[k - 1]
        self.module_name = name

    # --- shapes -------------------------------------------------------------------------------------------
    @property
    def is_conv1d(self) -> bool:
        """True when the base layer is a Conv1D (weight [in, out]) rather than an nn.Linear."""
        return not isinstance(self.base_layer, nn.Linear)

    @property
    def weight_axis(self) -> int:
        """Axis of the weight that indexes outputs: 0 for nn.Linear [out, in], 1 for Conv1D [in, out]."""
        return output_axis(self.base_layer)

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight, as peft's `BaseTunerLayer.weight` gives it: model code that reads
        `module.weight` (transformers' T5 feed-forward checks `self.wo.weight.dtype`) sees the base layer's."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The wrapped layer's bias (None when it has none), as peft's `BaseTunerLayer.bias`."""
        return getattr(self.base_layer, "bias", None)

    @property
    def out_features(self) -> int:
        """The width d the rotation acts on (the base layer's outputs)."""
        return int(self.base_layer.weight.shape[self.weight_axis])

    @property
    def in_features(self) -> int:
        """The base layer's input width."""
        return int(self.base_layer.weight.shape[1 - self.weight_axis])

    @property
    def adapters(self) -> list[str]:
        """Names of the adapters this layer holds, in insertion order."""
        return list(self.road_theta.keys())

    @property
    def merged(self) -> bool:
        """Whether any adapter is merged into the base weights (peft's `BaseTunerLayer.merged`)."""
        return bool(self.merged_adapters)

    # --- adapters -----------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: RoadConfig) -> None:
        """Create road_theta/road_alpha for `adapter_name`, initialised as peft does."""
        d, g = self.out_features, config.group_size
        if d % g:
            raise RoadError(
                f"module {self.module_name}: out_features {d} is not divisible by group_size {g}; "
                f"choose a group_size that divides {d}"
            )
        size = config.params_per_layer(d)
        weight = self.base_layer.weight
        theta = torch.empty(size, device=weight.device, dtype=torch.float32)
        alpha = torch.empty(size, device=weight.device, dtype=torch.float32)
        if config.init_weights is False:
            nn.init.normal_(theta, mean=0.0, std=0.5)
            nn.init.normal_(alpha, mean=1.0, std=0.5)
        else:
            nn.init.zeros_(theta)
            nn.init.ones_(alpha)
        self.road_theta[adapter_name] = nn.Parameter(theta)
        self.road_alpha[adapter_name] = nn.Parameter(alpha)
        self.variant[adapter_name] = config.variant
        self.group_size[adapter_name] = g
        if self.active_adapter is None:
            self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop one adapter's parameters (peft's `delete_adapter`); RoadError if it is merged."""
        if adapter_name in self.merged_adapters:
            raise RoadError(f"module {self.module_name}: adapter {adapter_name!r} is merged; unmerge it first")
        del self.road_theta[adapter_name]
        del self.road_alpha[adapter_name]
        del self.variant[adapter_name]
        del self.group_size[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.road_theta.keys()), None)

    def coefficients(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(c1, c2) of one adapter, each of length out_features, in the parameters' dtype."""
        return rotation.coefficients(
            self.variant[adapter_name],
            self.group_size[adapter_name],
            self.road_theta[adapter_name],
            self.road_alpha[adapter_name],
        )

    # --- forward ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The base layer's output [..., d], rotated by the active adapter (or per row in a mixed batch), as peft's
        `RoadLayer.forward` (`_apply_road`): y = base(x) * c1 + rot(base(x)) * c2, in the output's dtype."""
        if self.disabled and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled or self.merged:
            return result
        if self.row_ids is not None:
            return self._bank_forward(result, self.row_ids)
        if self.row_adapters is not None:
            return self._mixed_batch_forward(result, self.row_adapters)
        name = self.active_adapter
        if name is None or name not in self.road_theta:
            return result
        return self._rotate_output(result, name)

    def rotate(self, x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, group_size: int) -> torch.Tensor:
        """y = x * c1 + rot(x) * c2 over the last axis of x [..., d] (rotation.rotate; c1/c2 [d] or broadcasting
        against x). The export traces a stand-in layer whose `rotate` is the torch custom op instead
        (road_export/export/prepare.py, CaptureLayer); this layer itself is never changed by an export."""
        return rotation.rotate(x, c1, c2, group_size)

    def _rotate_output(self, result: torch.Tensor, name: str) -> torch.Tensor:
        dtype = result.dtype
        c1, c2 = self.coefficients(name)
        out = self.rotate(result.to(c1.dtype), c1, c2, self.group_size[name])
        return out.to(dtype)

    def _mixed_batch_forward(self, result: torch.Tensor, row_adapters: Sequence[str]) -> torch.Tensor:
        """Each row of the batch gets its own adapter (peft's `adapter_names`); "__base__" rows stay as is."""
        if len(row_adapters) != result.shape[0]:
            raise RoadError(
                f"module {self.module_name}: {len(row_adapters)} adapter names for a batch of {result.shape[0]}"
            )
        out = result.clone()
        for name in dict.fromkeys(row_adapters):
            if name == BASE_NAME or name not in self.road_theta:
                continue
            rows = [i for i, n in enumerate(row_adapters) if n == name]
            out[rows] = self._rotate_output(result[rows], name)
        return out

    def banks(self, order: Sequence[str]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per group size g: coefficient banks [len(order) + 1, d]; row 0 and adapters of other g are identity.

        Exported models gather one row per batch element from these (RoAd's efficient batching); adapters with
        different group sizes on one layer become one rotation per group size, each identity for the others.
        """
        d = self.out_features
        out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for g in sorted({self.group_size[a] for a in order if a in self.road_theta}):
            ones = torch.ones(d, dtype=torch.float32, device=self.base_layer.weight.device)
            rows1, rows2 = [ones], [torch.zeros_like(ones)]
            for name in order:
                if name in self.road_theta and self.group_size[name] == g:
                    c1, c2 = self.coefficients(name)
                    rows1.append(c1.float())
                    rows2.append(c2.float())
                else:
                    rows1.append(ones)
                    rows2.append(torch.zeros_like(ones))
            out[g] = (torch.stack(rows1), torch.stack(rows2))
        return out

    def _bank_forward(self, result: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        dtype = result.dtype
        out = result
        view = (ids.shape[0],) + (1,) * (result.dim() - 2) + (self.out_features,)
        for g, (bank1, bank2) in self.banks(self.bank_order).items():
            c1, c2 = bank1[ids].reshape(view), bank2[ids].reshape(view)
            out = self.rotate(out.to(c1.dtype), c1, c2, g)
        return out.to(dtype)

    # --- merge --------------------------------------------------------------------------------------------
    def merge(self, adapter_names: Sequence[str] | None = None) -> None:
        """Fold adapters into the base weight and bias row by row (no dense R is built)."""
        names = list(adapter_names) if adapter_names is not None else [self.active_adapter]
        for name in names:
            if name is None or name not in self.road_theta or name in self.merged_adapters:
                continue
            self._fold(*self.coefficients(name), self.group_size[name])
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo merges in reverse order by inverting each 2x2 block exactly."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            g = self.group_size[name]
            c1, c2 = self.coefficients(name)
            self._fold(*rotation.invert(c1.double(), c2.double(), g), g)

    @torch.no_grad()
    def _fold(self, c1: torch.Tensor, c2: torch.Tensor, group_size: int) -> None:
        """weight <- R weight, bias <- R bias, computed in float32 (in place when the weight is float32)."""
        c1, c2 = c1.detach().to(torch.float32), c2.detach().to(torch.float32)
        for tensor, axis in ((self.base_layer.weight, self.weight_axis), (self.base_layer.bias, 0)):
            if tensor is None:
                continue
            data = tensor.data
            if data.dtype == torch.float32 and data.is_contiguous():
                rotation.merge_(data, c1, c2, group_size, axis=axis)
            else:
                tensor.data = rotation.merge_(data.to(torch.float32).contiguous(), c1, c2, group_size, axis=axis).to(
                    data.dtype
                )

    def extra_repr(self) -> str:
        """Adapters with variant and group size, and the active one, for `print(model)`."""
        parts = [f"{n}: {self.variant[n]}, g={self.group_size[n]}" for n in self.road_theta]
        return f"adapters=[{'; '.join(parts)}], active={self.active_adapter!r}"
