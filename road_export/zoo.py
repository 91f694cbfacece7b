"""Models from `models/`: small architecture configs whose weights come from a fixed seed, never a download.

A name (`default`, `tiny-llama`, ...) is looked up under the models directory; a path to a transformers model
directory is loaded with `from_pretrained` when it holds weights, or built from its `config.json` otherwise.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import torch
from torch import nn

from road_export.errors import RoadError

DEFAULT_MODEL = "default"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def models_dir() -> Path:
    """`$ROAD_EXPORT_MODELS`, else the installed package data `road_export.models` (importlib.resources), else the
    repository's `models/` beside the package (a checkout on PYTHONPATH, not installed)."""
    env = os.environ.get("ROAD_EXPORT_MODELS")
    if env:
        return Path(env)
    try:
        root = importlib.resources.files("road_export.models")
    except ModuleNotFoundError:
        root = None
    if isinstance(root, Path) and root.is_dir():
        return root
    return Path(__file__).resolve().parent.parent / "models"


def list_models() -> list[str]:
    """Names of the model directories under `models_dir()` (those holding a config.json), sorted."""
    root = models_dir()
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []


def resolve(name_or_path: str | Path) -> Path:
    """The model directory for a name under models/ or a path."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RoadError(f"{path}: not a transformers model directory (no config.json)")
        return path
    if path.exists():
        raise RoadError(f"{path}: expected a model directory, got a file")
    named = models_dir() / str(name_or_path)
    if (named / "config.json").is_file():
        return named
    raise RoadError(
        f"{name_or_path}: no such model directory, and not a model under {models_dir()} "
        f"(known: {', '.join(list_models()) or 'none'})"
    )


def has_weights(path: Path) -> bool:
    """Whether a model directory holds weights (safetensors, sharded or not, or a torch pickle)."""
    return any((path / f).is_file() for f in WEIGHT_FILES) or any(path.glob("model-*.safetensors"))


def load_model(name_or_path: str | Path = DEFAULT_MODEL, *, seed: int = 0) -> nn.Module:
    """Load (or build from config with `seed`) a transformers model, in eval mode, float32."""
    import transformers

    path = resolve(name_or_path)
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise RoadError(f"{path / 'config.json'}: cannot read the model config ({e})") from e
    cls = model_class(config)
    try:
        if has_weights(path):
            model = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = cls._from_config(config, dtype=torch.float32)
    except RoadError:
        raise
    except Exception as e:
        raise RoadError(f"{path}: cannot load the model ({type(e).__name__}: {e})") from e
    model.config.name_or_path = str(name_or_path)
    return model.eval()


def model_class(config) -> type:
    """The transformers class named by `config.architectures`, or the base AutoModel for its type."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    try:
        return transformers.AutoModel._model_mapping[type(config)]
    except KeyError:
        raise RoadError(f"no transformers model class for model type {config.model_type!r}") from None
