"""Injecting RoAd layers into a model, and the model-wide operations on them (peft's RoadModel, unwrapped).

The model is changed in place and stays a plain transformers model: `model.road_config` maps adapter names
to their RoadConfig, and every adapted linear layer is a `RoadLayer`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from road_export.core.config import RoadConfig
from road_export.core.errors import RoadError
from road_export.export.layers import RoadLayer, is_supported_base
from road_export.core.names import BASE_NAME, check_adapter_name

# peft's TRANSFORMERS_MODELS_TO_ROAD_TARGET_MODULES_MAPPING (used instead where peft is installed), plus
# architectures whose attention is fused.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
}
ALL_LINEAR = "all-linear"


def default_targets() -> dict[str, list[str] | str]:
    """Default target_modules per model type: peft's own table where peft is installed (it defines them), else
    the copy above; architectures peft leaves out (fused attention, e.g. phi3) keep ours."""
    try:
        from peft.utils import TRANSFORMERS_MODELS_TO_ROAD_TARGET_MODULES_MAPPING as peft_table
    except ImportError:
        return dict(DEFAULT_TARGETS)
    return {**DEFAULT_TARGETS, **peft_table}


def road_layers(model: nn.Module) -> dict[str, RoadLayer]:
    """Every RoadLayer of the model by module path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RoadLayer)}


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _output_head_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((name for name, m in model.named_modules() if m is head), None)


def _is_module_to_save(name: str, modules_to_save: Sequence[str] | None) -> bool:
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save)


def resolve_targets(model: nn.Module, config: RoadConfig) -> list[str]:
    """Module paths that `config` adapts in `model`, matched exactly as peft matches them."""
    targets = config.target_modules
    if targets is None:
        mtype = model_type(model)
        defaults = default_targets()
        if mtype not in defaults:
            raise RoadError(
                f"no default RoAd targets for model type {mtype!r}; set target_modules "
                f"(known types: {', '.join(sorted(defaults))})"
            )
        found = defaults[mtype]
        targets = found if isinstance(found, str) else set(found)
    names: list[str] = []
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        head = _output_head_name(model)
        for name, module in model.named_modules():
            if not name or name == head or _inside_road_layer(model, name):
                continue
            if is_supported_base(module) or isinstance(module, RoadLayer):
                names.append(name)
    else:
        for name, module in model.named_modules():
            if not name or _inside_road_layer(model, name):
                continue
            if isinstance(targets, str):
                found = re.fullmatch(targets, name) is not None
            else:
                found = name in targets or any(name.endswith(f".{t}") for t in targets)
            if found:
                names.append(name)
    names = [n for n in names if not _is_module_to_save(n, config.modules_to_save)]
    if not names:
        raise RoadError(
            f"target_modules {_show(config.target_modules)} match no module of this "
            f"{type(model).__name__}; is the adapter for another architecture? "
            f"Linear layers here include: {', '.join(_sample_linear_names(model))}"
        )
    return names


def _inside_road_layer(model: nn.Module, name: str) -> bool:
    return ".base_layer" in f".{name}"


def _sample_linear_names(model: nn.Module, limit: int = 6) -> list[str]:
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and is_supported_base(m)})
    return leaves[:limit] or ["(none)"]


def _show(targets: object) -> str:
    return repr(sorted(targets)) if isinstance(targets, set) else repr(targets)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def get_road_model(model: nn.Module, config: RoadConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter `adapter_name` to every layer that `config` targets; returns `model`, changed in place."""
    if adapter_name in adapter_names(model):
        raise RoadError(f"adapter {adapter_name!r} already exists on this model; pick another name")
    check_adapter_name(adapter_name)
    inject(model, resolve_targets(model, config), config, adapter_name)
    return model


def inject(model: nn.Module, names: Sequence[str], config: RoadConfig, adapter_name: str) -> None:
    """Wrap each module in `names` (if not yet wrapped) and add the adapter to it; record the config."""
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise RoadError(f"module {name} does not exist in this {type(model).__name__}") from None
        if not isinstance(module, RoadLayer):
            if not is_supported_base(module):
                raise RoadError(
                    f"module {name} ({type(module).__name__}) matches target_modules but RoAd only wraps "
                    "nn.Linear and Conv1D; narrow target_modules"
                )
            module = RoadLayer(module, name)
            _replace(model, name, module)
        module.add_adapter(adapter_name, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in road_layers(model).values():
        if adapter_name in layer.road_theta:
            layer.road_theta[adapter_name].requires_grad_(True)
            layer.road_alpha[adapter_name].requires_grad_(True)
    for name in module_to_save_names(model, config):
        model.get_submodule(name).requires_grad_(True)
    configs: dict[str, RoadConfig] = getattr(model, "road_config", None) or {}
    configs[adapter_name] = config
    model.road_config = configs


def module_to_save_names(model: nn.Module, config: RoadConfig) -> list[str]:
    """Paths of the modules that `config.modules_to_save` names (peft: exact name or dotted suffix)."""
    wanted = config.modules_to_save or []
    return [
        name
        for name, _ in model.named_modules()
        if name and any(name == m or name.endswith(f".{m}") for m in wanted)
    ]


def untie(model: nn.Module, names: Sequence[str], *, copy_modules: bool = False) -> list[str]:
    """Give each module in `names` tensors of its own where they are tied to parameters outside it; returns the
    parameter paths untied. `copy_modules` replaces the module by a deep copy (peft's ModulesToSaveWrapper), else
    only the tied parameters are cloned. Where input and output embeddings part, `config.tie_word_embeddings`
    becomes False (peft's merge_and_unload does the same), so a saved checkpoint reloads as it was written."""
    import copy

    shared: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), []).append(pname)
    untied: list[str] = []
    for name in names:
        module = model.get_submodule(name)
        inside = {f"{name}.{p}" for p, _ in module.named_parameters(remove_duplicate=False)}
        tied = [p for p, param in module.named_parameters(remove_duplicate=False)
                if any(other not in inside for other in shared[id(param)])]
        if not tied:
            continue
        if copy_modules:
            _replace(model, name, copy.deepcopy(module))
        else:
            for pname in tied:
                owner_name, _, attr = pname.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                param = getattr(owner, attr)
                setattr(owner, attr, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))
        untied += [f"{name}.{p}" for p in tied]
    config = getattr(model, "config", None)
    if untied and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    return untied


def adapter_names(model: nn.Module) -> list[str]:
    return list(getattr(model, "road_config", {}) or {})


def _require_adapter(model: nn.Module, name: str) -> None:
    if name not in adapter_names(model):
        raise RoadError(f"no adapter named {name!r}; this model has {adapter_names(model) or 'none'}")


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make `adapter_name` the one every layer applies."""
    _require_adapter(model, adapter_name)
    for layer in road_layers(model).values():
        if layer.merged:
            raise RoadError(f"module {layer.module_name} has merged adapters; unmerge before switching")
        layer.active_adapter = adapter_name if adapter_name in layer.road_theta else None


@contextmanager
def mixed_batch(model: nn.Module, row_adapters: Sequence[str]) -> Iterator[nn.Module]:
    """Within the block, row i of every batch goes through adapter `row_adapters[i]` ("__base__": none)."""
    unknown = sorted({n for n in row_adapters if n != BASE_NAME} - set(adapter_names(model)))
    if unknown:
        raise RoadError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
    layers = road_layers(model).values()
    for layer in layers:
        if layer.merged:
            raise RoadError(f"module {layer.module_name} has merged adapters; unmerge before a mixed batch")
        layer.row_adapters = list(row_adapters)
    try:
        yield model
    finally:
        for layer in layers:
            layer.row_adapters = None


@contextmanager
def adapter_ids(model: nn.Module, ids, order: Sequence[str] | None = None) -> Iterator[nn.Module]:
    """Within the block, row i goes through adapter `order[ids[i] - 1]` (id 0: the base model).

    The id form of `mixed_batch`, as exported graphs take it: `ids` is an int64 tensor [batch], `order` the
    adapters in id order (default: the order they were added).
    """
    import torch

    order = list(order) if order is not None else adapter_names(model)
    unknown = sorted(set(order) - set(adapter_names(model)))
    if unknown:
        raise RoadError(f"no adapter named {', '.join(unknown)}; this model has {adapter_names(model)}")
    ids = torch.as_tensor(ids, dtype=torch.int64)
    layers = road_layers(model).values()
    for layer in layers:
        if layer.merged:
            raise RoadError(f"module {layer.module_name} has merged adapters; unmerge before a mixed batch")
        layer.row_ids, layer.bank_order = ids, order
    try:
        yield model
    finally:
        for layer in layers:
            layer.row_ids, layer.bank_order = None, []


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as its base (merged adapters are unmerged first)."""
    layers = road_layers(model).values()
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def merge_adapter(model: nn.Module, adapter_names: Sequence[str] | None = None) -> None:
    """Merge the given adapters (default: each layer's active one) into the base weights.

    A layer whose weight is tied to another parameter (RoAd on a tied lm_head) is untied first: the rotation
    changes the layer only, as its forward does."""
    layers = road_layers(model)
    untie(model, [f"{name}.base_layer" for name, layer in layers.items() if not layer.merged])
    for layer in layers.values():
        layer.merge(adapter_names)


def unmerge_adapter(model: nn.Module) -> None:
    for layer in road_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module, adapter_names: Sequence[str] | None = None) -> nn.Module:
    """Merge adapters into the weights and put the plain linear layers back: no RoadLayer is left."""
    for name in adapter_names or []:
        _require_adapter(model, name)
    untie(model, [f"{name}.base_layer" for name in road_layers(model)])
    for name, layer in road_layers(model).items():
        layer.merge(adapter_names)
        _replace(model, name, layer.base_layer)
    if hasattr(model, "road_config"):
        del model.road_config
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every RoadLayer without merging (merged adapters are unmerged first)."""
    for name, layer in road_layers(model).items():
        layer.unmerge()
        _replace(model, name, layer.base_layer)
    if hasattr(model, "road_config"):
        del model.road_config
    return model
