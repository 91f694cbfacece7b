"""peft RoAd adapters onto torch models and back out, and adopting a live peft model.

Reading and checking a directory is torch-free (road_export/graph/adapter_files.py: `read_adapter`, `AdapterFile`);
here its tensors are placed on a transformers model. Everything is checked before the model is touched, so a bad
adapter leaves it unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from road_export.export import model as road_model
from road_export.graph.adapter_files import PREFIX, ROAD_PARAMS, WEIGHTS_NAME, AdapterFile, read_adapter
from road_export.core.config import RoadConfig
from road_export.core.errors import RoadError
from road_export.graph.files import atomic_write
from road_export.core.names import check_adapter_name
from road_export.export.layers import RoadLayer, output_axis

__all__ = ["ROAD_PARAMS", "AdapterFile", "apply_adapter", "from_peft", "load_adapter", "read_adapter", "save_adapter"]


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> nn.Module:
    """Put the peft RoAd adapter at `path` onto `model` (a plain transformers model); returns it."""
    return apply_adapter(model, read_adapter(path), adapter_name)


def apply_adapter(model: nn.Module, adapter: AdapterFile, adapter_name: str = "default") -> nn.Module:
    """Put a read adapter onto `model` in place as `adapter_name`; returns the model.

    Mirrors `peft.PeftModel.from_pretrained` + `load_adapter`: the config's targets are wrapped in RoadLayers and
    road_theta / road_alpha copied in (float32 numpy -> the parameter's dtype), modules_to_save tensors replace the
    model's own. Raises RoadError, before touching the model, for a name already in use, modules the model lacks,
    widths not divisible by group_size, or tensors of the wrong shape.
    """
    check_adapter_name(adapter_name)
    if adapter_name in road_model.adapter_names(model):
        raise RoadError(f"adapter {adapter_name!r} already exists on this model; pick another name")
    where = adapter.path / WEIGHTS_NAME
    _check_placement(model, adapter)
    for module_name, params in adapter.road.items():
        module = model.get_submodule(module_name)
        base = module.base_layer if isinstance(module, RoadLayer) else module
        out = int(base.weight.shape[output_axis(base)])
        expected = adapter.config.params_per_layer(out)
        if out % adapter.config.group_size:
            raise RoadError(
                f"{adapter.path}: module {module_name} has {out} outputs, not divisible by group_size "
                f"{adapter.config.group_size}; this adapter was made for another model"
            )
        for pname, tensor in params.items():
            if tuple(tensor.shape) != (expected,):
                raise RoadError(
                    f"{where}: tensor {module_name}.{pname} has shape {tuple(tensor.shape)}, expected "
                    f"({expected},) for {adapter.config.variant} on a layer with {out} outputs"
                )
    for key, tensor in adapter.extra.items():
        placed = _unwrapped_key(key, adapter)
        try:
            target = _get_tensor(model, placed)
        except AttributeError:
            raise RoadError(f"{where}: tensor {key} has no place in this {type(model).__name__}") from None
        if target.shape != tensor.shape:
            raise RoadError(
                f"{where}: tensor {key} has shape {tuple(tensor.shape)}, the model's is {tuple(target.shape)}"
            )
    config = dataclasses.replace(adapter.config, init_weights=True, inference_mode=True)
    # peft's ModulesToSaveWrapper trains a deep copy of each module: a tied module's copy no longer shares its
    # tensor, so the trained values never reach the other side of the tie (the input embedding, the head).
    saved = {name for name in road_model.module_to_save_names(model, adapter.config)
             if any(k == name or k.startswith(name + ".") for k in adapter.extra)}
    road_model.untie(model, sorted(saved), copy_modules=True)
    road_model.inject(model, list(adapter.road), config, adapter_name)
    model.road_config[adapter_name] = adapter.config
    layers = road_model.road_layers(model)
    with torch.no_grad():
        for module_name, params in adapter.road.items():
            layer = layers[module_name]
            layer.road_theta[adapter_name].copy_(torch.from_numpy(params["road_theta"]))
            layer.road_alpha[adapter_name].copy_(torch.from_numpy(params["road_alpha"]))
        for key, tensor in adapter.extra.items():
            # `<module>.base_layer.weight` (peft saves the base of a targeted lm_head/embed_tokens) is copied into
            # the base layer's tensor as peft's load_state_dict does
            _get_tensor(model, key).copy_(torch.from_numpy(tensor))
    return model


def _unwrapped_key(key: str, adapter: AdapterFile) -> str:
    """Where `key` sits before RoAd layers are injected: `<m>.base_layer.<p>` of an adapted module is `<m>.<p>`."""
    module, sep, param = key.partition(".base_layer.")
    return f"{module}.{param}" if sep and module in adapter.road else key


def _get_tensor(model: nn.Module, key: str) -> torch.Tensor:
    try:
        return model.get_parameter(key)
    except AttributeError:
        return model.get_buffer(key)


def _head_mismatch(unplaced: list[str], present: set[str], model: nn.Module) -> str | None:
    """Where the modules would sit when the adapter was made on the same base with another head: on a model with
    a task head (`model.layers...` in a ...ForCausalLM, missing from a bare ...Model), or on the bare model. None
    when neither fits (another architecture)."""
    prefix = getattr(model, "base_model_prefix", "") or "model"
    if all(m.split(".", 1)[-1] in present for m in unplaced if "." in m):
        return f"under a task head's {unplaced[0].split('.', 1)[0]!r} (the model class with a head), not in this " \
               f"{type(model).__name__}"
    if all(f"{prefix}.{m}" in present for m in unplaced):
        return f"in the bare model, not under this {type(model).__name__}'s {prefix!r}"
    return None


def _check_placement(model: nn.Module, adapter: AdapterFile) -> None:
    """Every module of the file must exist and be one the config targets, and vice versa."""
    present = {name for name, _ in model.named_modules()}
    unplaced = sorted(m for m in adapter.road if m not in present)
    if unplaced:
        shown = ", ".join(unplaced[:5]) + (f" and {len(unplaced) - 5} more" if len(unplaced) > 5 else "")
        head = _head_mismatch(unplaced, present, model)
        if head:
            raise RoadError(f"{adapter.path}: the task does not fit the adapter: its modules ({unplaced[0]}, ...) "
                            f"sit {head}; pass the --task it was trained for (e.g. text-generation for a causal LM)")
        raise RoadError(
            f"{adapter.path}: {len(unplaced)} adapted module(s) do not exist in this {type(model).__name__}: "
            f"{shown}; the adapter was made for another architecture"
        )
    try:
        targeted = set(road_model.resolve_targets(model, adapter.config))
    except RoadError as e:
        raise RoadError(f"{adapter.path}: {e}") from None
    missing = sorted(targeted - set(adapter.road))
    if missing:
        raise RoadError(
            f"{adapter.path}: the config targets {len(missing)} module(s) that have no tensors in "
            f"{WEIGHTS_NAME}, e.g. {missing[0]}; the file is incomplete"
        )


def save_adapter(model: nn.Module, path: str | Path, adapter_name: str = "default") -> Path:
    """Write adapter `adapter_name` as a directory that `peft.PeftModel.from_pretrained` loads."""
    from safetensors.torch import save_file

    configs = getattr(model, "road_config", None) or {}
    if adapter_name not in configs:
        raise RoadError(f"no adapter named {adapter_name!r}; this model has {list(configs) or 'none'}")
    config: RoadConfig = configs[adapter_name]
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in road_model.road_layers(model).items():
        if adapter_name in layer.road_theta:
            tensors[f"{PREFIX}{name}.road_theta"] = layer.road_theta[adapter_name].detach().cpu().contiguous()
            tensors[f"{PREFIX}{name}.road_alpha"] = layer.road_alpha[adapter_name].detach().cpu().contiguous()
    for name in road_model.module_to_save_names(model, config):
        for key, tensor in model.get_submodule(name).state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = tensor.detach().cpu().contiguous().clone()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config.save_pretrained(tmp)
    return path


def from_peft(peft_model: nn.Module) -> nn.Module:
    """Adopt a live peft RoAd model: returns its transformers model with our RoadLayers, sharing tensors.

    The peft wrapper is taken apart in the process (its layers are replaced); use the returned model.
    """
    try:
        from peft.tuners.road.layer import RoadLayer as PeftRoadLayer
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError as e:
        raise RoadError("from_peft needs peft installed: pip install 'road-export[peft]'") from e
    peft_configs = getattr(peft_model, "peft_config", None)
    if not peft_configs:
        raise RoadError(f"{type(peft_model).__name__} is not a peft model (no peft_config)")
    configs: dict[str, RoadConfig] = {}
    for name, cfg in peft_configs.items():
        configs[name] = RoadConfig.from_dict(cfg.to_dict(), source=f"peft adapter {name!r}")
    base = peft_model.get_base_model()
    active = peft_model.active_adapter
    active = active[0] if isinstance(active, list | tuple) else active
    for name, module in list(base.named_modules()):
        if isinstance(module, PeftRoadLayer):
            layer = RoadLayer(module.get_base_layer(), name)
            for adapter in module.road_theta:
                layer.road_theta[adapter] = module.road_theta[adapter]
                layer.road_alpha[adapter] = module.road_alpha[adapter]
                layer.variant[adapter] = module.variant[adapter]
                layer.group_size[adapter] = module.group_size[adapter]
            layer.active_adapter = active if active in layer.road_theta else None
            layer.merged_adapters = list(module.merged_adapters)
            road_model._replace(base, name, layer)
        elif isinstance(module, ModulesToSaveWrapper):
            chosen = module.modules_to_save[active] if active in module.modules_to_save else module.original_module
            road_model._replace(base, name, chosen)
    base.road_config = configs
    if hasattr(base, "peft_config"):
        try:
            del base.peft_config
        except AttributeError:
            pass
    return base
