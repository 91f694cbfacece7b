"""Rotary position embeddings whose frequencies depend on the sequence length, as transformers computes them.

transformers (`modeling_rope_utils.py`: `ROPE_INIT_FUNCTIONS` and the `dynamic_rope_update` decorator on each
model's `*RotaryEmbedding.forward`) has three kinds of rope type:

- static ("default", "linear", "yarn", "llama3", "proportional"): `inv_freq` is fixed at init; the trace keeps it
  as a constant and nothing changes with the length.
- "longrope" (Phi-3): `longrope_frequency_update` picks the long factors for every position when
  `max(position_ids) + 1 > original_max_position_embeddings`, else the short ones, with a `torch.where` on that
  scalar; the trace keeps the `where`, so the file chooses from the positions it is fed, as transformers does.
  Phi-3's generation also drops its cache once, when the sequence first reaches the switch
  (`Phi3ForCausalLM.prepare_inputs_for_generation`), and re-runs the whole sequence with the long factors: the
  file's metadata record (`METADATA_ROPE`, `recompute_cache_at`) tells road-export's generation to do the same.
- "dynamic" (NTK): `dynamic_frequency_update` recomputes `inv_freq` in Python when `max(position_ids) + 1` grows
  past the cached length, an `if` on a tensor that torch.export cannot trace ("Could not guard on data-dependent
  expression"). `traceable_rope` replaces it, for the trace only, by the same formula computed in the graph:
  `ROPE_INIT_FUNCTIONS[rope_type](config, seq_len=max(position_ids) + 1)`, which is `inv_freq` for
  `max(seq_len, max_position_embeddings)` — what transformers holds after growing to that length from a fresh
  model (its growth-only cache of frequencies is state across calls; the file has none).

`check_rope` refuses, before any work, a rope type this module cannot follow, with one line naming it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from road_export.core.errors import RoadError
from road_export.core.names import METADATA_ROPE

__all__ = ["METADATA_ROPE", "STATIC", "check_rope", "recomputes_cache", "rope_record", "rope_types", "thresholds",
           "traceable_rope"]

# rope types whose inv_freq does not depend on the sequence length (transformers 5: ROPE_INIT_FUNCTIONS minus the
# two the `dynamic_rope_update` decorator updates)
STATIC = ("default", "linear", "yarn", "llama3", "proportional")


def _inner(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def rope_types(model: nn.Module) -> dict[str | None, dict]:
    """{layer type or None: rope parameters} of a transformers model's config (`rope_parameters`, which
    transformers 5 standardizes from `rope_scaling`); {} for a model without rotary embeddings."""
    config = getattr(_inner(model), "config", None)
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        return {}
    if "rope_type" in params or "type" in params or "rope_theta" in params:
        return {None: params}
    return {k: v for k, v in params.items() if isinstance(v, dict)}


def _kind(params: dict) -> str:
    return str(params.get("rope_type", params.get("type", "default")))


def check_rope(model: nn.Module) -> None:
    """Refuse (RoadError, one line) a rope type that neither stays constant nor is one of the two length-dependent
    kinds handled here ("longrope", and "dynamic" wherever transformers' decorator applies it: any type naming
    "dynamic"), or a dynamic rope whose rotary module is not wrapped by transformers' `dynamic_rope_update`."""
    for layer, params in rope_types(model).items():
        kind = _kind(params)
        where = f" (layer type {layer})" if layer else ""
        if kind not in STATIC and kind != "longrope" and "dynamic" not in kind:
            raise RoadError(f"rope_type {kind!r}{where}: road-export does not know how this rope type changes with "
                            f"the sequence length, so it cannot export it faithfully; export a model with one of "
                            f"{', '.join(STATIC)}, longrope or dynamic")
    for module in _rotary_modules(model):
        if any("dynamic" in kind for kind in _module_kinds(module).values()) and \
                getattr(type(module).forward, "__wrapped__", None) is None:
            raise RoadError(f"rope_type dynamic: {type(module).__name__}.forward is not transformers' "
                            "dynamic_rope_update, so its frequency update cannot be reproduced in the graph; load "
                            "the model with transformers' own class (not remote code) to export it")


def _rotary_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in _inner(model).modules() if hasattr(m, "rope_type") and hasattr(m, "config")
            and any(name.endswith("inv_freq") for name in m._buffers)]


def _module_kinds(module: nn.Module) -> dict[str | None, str]:
    kinds = module.rope_type
    return {None: kinds} if isinstance(kinds, str) else dict(kinds)


@contextlib.contextmanager
def traceable_rope(model: nn.Module) -> Iterator[None]:
    """For the duration: every rotary module with a dynamic rope type computes its `inv_freq` in the graph from
    `max(position_ids) + 1` (transformers' own `ROPE_INIT_FUNCTIONS[rope_type]` on a tensor length, as its
    `dynamic_frequency_update` calls it), then runs the undecorated forward with it. Other modules are untouched
    (longrope's `torch.where` traces as it is).

    Longrope modules get their long-factor frequencies (the plain attribute `[layer_]long_inv_freq` transformers'
    `longrope_frequency_update` computes in float32 on first use) in the dtype of their `inv_freq` buffer: in a
    float16 model transformers' `torch.where(.., long (float32), short (float16))` gives float32 and its in-place
    `copy_` into the float16 buffer rounds it, which eager torch does but torch.export refuses ("Tensor dtype
    mismatch"); rounding the long factors first gives the same float16 values. Undone on exit."""
    patched = []
    longs: list[tuple[nn.Module, str, object]] = []
    for module in _rotary_modules(model):
        for layer, kind in _module_kinds(module).items():
            if kind == "longrope":
                longs.append((module, *_long_frequencies(module, layer)))
        if not any("dynamic" in kind for kind in _module_kinds(module).values()):
            continue
        undecorated = getattr(type(module).forward, "__wrapped__", None)
        if undecorated is None:
            check_rope(model)  # raises
        module.forward = types.MethodType(functools.partial(_dynamic_forward, undecorated=undecorated), module)
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.__dict__["forward"]
        for module, name, previous in longs:
            if previous is _ABSENT:
                module.__dict__.pop(name, None)
            else:
                setattr(module, name, previous)


_ABSENT = object()


def _long_frequencies(module: Any, layer: str | None) -> tuple[str, object]:
    """Set `module`'s long-factor inverse frequencies (`[layer_]long_inv_freq`: the one it holds, else as
    transformers' `longrope_frequency_update` computes them: `ROPE_INIT_FUNCTIONS["longrope"](config, device,
    seq_len=original_max_position_embeddings + 1)`) in the dtype of its `[layer_]inv_freq` buffer; returns (the
    attribute name, its previous value or _ABSENT) for the undo."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    prefix = "" if layer is None else f"{layer}_"
    buffer = module._buffers[f"{prefix}inv_freq"]
    params = module.config.rope_parameters if layer is None else module.config.rope_parameters[layer]
    original = int(params["original_max_position_embeddings"])
    name = f"{prefix}long_inv_freq"
    previous = module.__dict__.get(name, _ABSENT)
    long_inv_freq = getattr(module, name, None)
    if long_inv_freq is None:  # as transformers: computed once, when unset
        kwargs = {"layer_type": layer} if layer is not None else {}
        long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](module.config, buffer.device, seq_len=original + 1,
                                                           **kwargs)
    setattr(module, name, long_inv_freq.to(buffer.dtype))
    return name, previous


def _dynamic_forward(self: nn.Module, x: torch.Tensor, position_ids: torch.Tensor, layer_type: str | None = None,
                     *, undecorated):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    kind = self.rope_type if layer_type is None else self.rope_type[layer_type]
    if "dynamic" not in kind:  # another layer type of a per-layer rope: transformers' own update
        return type(self).forward(self, x, position_ids, **kwargs)
    name = "inv_freq" if layer_type is None else f"{layer_type}_inv_freq"
    seq_len = torch.max(position_ids) + 1  # as dynamic_frequency_update
    inv_freq, _ = ROPE_INIT_FUNCTIONS[kind](self.config, x.device, seq_len=seq_len, layer_type=layer_type)
    saved = self._buffers[name]
    self._buffers[name] = inv_freq.to(saved.dtype)
    try:
        return undecorated(self, x, position_ids, **kwargs)
    finally:
        self._buffers[name] = saved


def recomputes_cache(model: nn.Module, length: int) -> bool:
    """Whether transformers' generation drops the cache and re-runs the whole sequence when it reaches `length` + 1
    tokens with `length` cached (Phi-3's `prepare_inputs_for_generation` does, at its longrope switch), found by
    asking the model's own `prepare_inputs_for_generation` rather than by a list of classes."""
    from transformers import DynamicCache

    inner = _inner(model)
    prepare = getattr(inner, "prepare_inputs_for_generation", None)
    if prepare is None:
        return False
    keys = torch.zeros(1, 1, length, 2)
    cache = DynamicCache(ddp_cache_data=[(keys, keys.clone())])
    ids = torch.ones(1, length + 1, dtype=torch.int64)
    try:
        inputs = prepare(ids, cache=cache, attention_mask=torch.ones_like(ids), use_cache=True,
                         next_sequence_length=1)
    except Exception:  # a signature of another generation: ask the class instead
        from transformers.generation.utils import GenerationMixin

        return type(inner).prepare_inputs_for_generation is not GenerationMixin.prepare_inputs_for_generation
    kept = inputs.get("cache", inputs.get("past_key_values"))
    return kept is None


def rope_record(model: nn.Module) -> dict | None:
    """The file's `road_export.rope` metadata record, None for a model whose rope does not change with the length:
    {"rope_type": type (or {layer type: type}), "original_max_position_embeddings": the longrope switch,
    "recompute_cache_at": the sequence length at which generation re-runs the whole sequence, or null,
    "max_position_embeddings": where dynamic NTK starts growing}."""
    kinds = {layer: _kind(params) for layer, params in rope_types(model).items()}
    moving = {layer: kind for layer, kind in kinds.items() if kind == "longrope" or "dynamic" in kind}
    if not moving:
        return None
    record: dict = {"rope_type": kinds[None] if list(kinds) == [None] else kinds}
    config = _inner(model).config
    for layer, kind in moving.items():
        params = rope_types(model)[layer]
        if kind == "longrope":
            switch = int(params.get("original_max_position_embeddings") or config.max_position_embeddings)
            record["original_max_position_embeddings"] = switch
            record["recompute_cache_at"] = switch + 1 if recomputes_cache(model, switch) else None
        else:
            record["max_position_embeddings"] = int(config.max_position_embeddings)
    return record


def metadata(model: nn.Module) -> dict[str, str]:
    """{METADATA_ROPE: JSON record} for a length-dependent rope, else {}."""
    record = rope_record(model)
    return {} if record is None else {METADATA_ROPE: json.dumps(record)}


def thresholds(model: nn.Module) -> list[tuple[int, str]]:
    """(length, why) of every sequence length past which the model computes differently, sorted: the longrope
    switch and the originally trained length of the other scaled ropes (`original_max_position_embeddings`), where
    dynamic NTK starts growing (`max_position_embeddings`), sliding attention windows (`sliding_window`; GPT-Neo's
    local layers: `window_size`)."""
    config = _inner(model).config
    found: dict[int, str] = {}
    for params in rope_types(model).values():
        kind = _kind(params)
        original = params.get("original_max_position_embeddings")
        if "dynamic" in kind:
            found.setdefault(int(config.max_position_embeddings), f"{kind} rope growth")
        elif kind != "default" and isinstance(original, int) and original > 0:
            found.setdefault(original, f"{kind} rope original_max_position_embeddings")
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and window > 0 and (getattr(config, "use_sliding_window", True) is not False):
        found.setdefault(window, "sliding_window")
    local = getattr(config, "window_size", None)  # GPT-Neo: layers of `attention_layers` "local" attend this far
    if isinstance(local, int) and local > 0 and "local" in (getattr(config, "attention_layers", None) or ()):
        found.setdefault(local, "local attention window_size")
    return sorted(found.items())
