"""peft RoAd adapter directories, read torch-free (numpy + safetensors) and checked before any model is touched.

On disk (peft's layout, `PeftModel.save_pretrained`): `adapter_config.json` and `adapter_model.safetensors`
with keys `base_model.model.<module>.road_theta` / `.road_alpha` (1-D, the adapter name stripped, as peft's
`get_peft_model_state_dict` writes them) and `base_model.model.<module>.<param>` for modules_to_save. numpy has
no bfloat16: such tensors are widened to float32 (exactly; narrowing back to bfloat16 gives the same bits).
A legacy `adapter_model.bin` needs torch (`road-export[export]`).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from road_export.core.config import CONFIG_NAME, RoadConfig
from road_export.core.errors import RoadError

__all__ = ["PREFIX", "ROAD_PARAMS", "WEIGHTS_NAME", "AdapterFile", "read_adapter"]

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
ROAD_PARAMS = ("road_theta", "road_alpha")


@dataclass
class AdapterFile:
    """A parsed adapter directory: its config, RoAd tensors per module, and modules_to_save tensors.

    `road[module]["road_theta" | "road_alpha"]` are 1-D numpy float arrays of `RoadConfig.params_per_layer(d)`
    elements (d/2 for road_1, d for road_2, 2d for road_4, d the layer's output width); `extra` maps a
    parameter path (no `base_model.model.` prefix) to its numpy array.
    """

    path: Path
    config: RoadConfig
    road: dict[str, dict[str, np.ndarray]]
    extra: dict[str, np.ndarray]


def read_adapter(path: str | Path) -> AdapterFile:
    """Read and check an adapter directory without touching any model.

    Raises RoadError for a missing directory or file, an unreadable config or truncated safetensors file, a module
    with only one of road_theta/road_alpha, NaN or Inf values, or a file holding no RoAd tensors at all.
    """
    path = Path(path)
    if not path.exists():
        raise RoadError(f"{path}: no such adapter directory")
    if not path.is_dir():
        raise RoadError(f"{path}: an adapter is a directory holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = RoadConfig.from_pretrained(path)
    tensors = _load_tensors(path)
    road: dict[str, dict[str, np.ndarray]] = {}
    extra: dict[str, np.ndarray] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        module, _, param = name.rpartition(".")
        if param not in ROAD_PARAMS and module.rpartition(".")[2] in ROAD_PARAMS:
            module, _, param = module.rpartition(".")  # `<module>.road_theta.<adapter name>`
        if param in ROAD_PARAMS:
            road.setdefault(module, {})[param] = tensor
        else:
            extra[name] = tensor
    for module, params in road.items():
        missing = [p for p in ROAD_PARAMS if p not in params]
        if missing:
            raise RoadError(f"{path / WEIGHTS_NAME}: module {module} has no {missing[0]} tensor")
    for key, tensor in [*((f"{m}.{p}", t) for m, ps in road.items() for p, t in ps.items()), *extra.items()]:
        if np.issubdtype(tensor.dtype, np.floating) and not np.isfinite(tensor).all():
            raise RoadError(f"{path / WEIGHTS_NAME}: tensor {key} holds NaN or Inf; the adapter is broken")
    if not road:
        raise RoadError(f"{path / WEIGHTS_NAME}: no road_theta/road_alpha tensors; is this a RoAd adapter?")
    return AdapterFile(path, config, road, extra)


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    file = path / WEIGHTS_NAME
    if file.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            tensors = {}
            with safe_open(str(file), framework="numpy") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if f.get_slice(key).get_dtype() == "BF16":
                        tensors[key] = _bfloat16(file, key)
                    else:
                        tensors[key] = f.get_tensor(key)
            return tensors
        except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as e:
            raise RoadError(f"{file}: cannot read safetensors ({e}); the file is truncated or corrupt") from e
    legacy = path / "adapter_model.bin"
    if legacy.is_file():
        try:
            import torch
        except ImportError:
            raise RoadError(f"{legacy}: a torch pickle; reading it needs torch (pip install 'road-export[export]'), "
                            f"or save the adapter as {WEIGHTS_NAME}") from None
        try:
            loaded = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RoadError(f"{legacy}: cannot read ({e})") from e
        return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in loaded.items()}
    raise RoadError(f"{file}: no such file; an adapter directory holds {WEIGHTS_NAME}")


def _bfloat16(file: Path, key: str) -> np.ndarray:
    """One BF16 tensor of a safetensors file as float32 (bfloat16 is the top half of a float32)."""
    with file.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(length))[key]
        begin, end = info["data_offsets"]
        f.seek(8 + length + begin)
        raw = f.read(end - begin)
    if len(raw) != end - begin:
        raise ValueError(f"tensor {key} is truncated")
    halves = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
    return halves.view(np.float32).reshape(info["shape"])
