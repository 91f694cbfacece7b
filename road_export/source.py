"""The torch source of an export: a base model plus adapters, as the CLI's --base and --adapter name them.

With no --adapter, a base from models/ that carries an `adapter_config.json` (the embedded default does) gets
that adapter with parameters drawn from a fixed seed, so the same command always builds the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from road_export import zoo
from road_export.adapters import apply_adapter, read_adapter
from road_export.config import CONFIG_NAME, RoadConfig
from road_export.errors import RoadError
from road_export.model import get_road_model


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    path: Path


def parse_adapter(text: str, index: int) -> AdapterSpec:
    """`[NAME=]PATH`; without NAME the first adapter is "default" and later ones take their folder's name."""
    name, sep, path = text.partition("=")
    if not sep or Path(text).exists():
        name, path = ("default" if index == 0 else Path(text).name), text
    if not name or not path:
        raise RoadError(f"--adapter {text!r}: expected [NAME=]PATH")
    return AdapterSpec(name, Path(path))


@dataclass
class Source:
    model: nn.Module
    base: str
    adapters: list[str]
    embedded: bool  # adapter drawn from the embedded config and seed


def load_source(base: str | None, adapters: list[str], *, seed: int = 0) -> Source:
    """Load the base (a directory or a name under models/) and put the adapters on it."""
    base = base or zoo.DEFAULT_MODEL
    specs = [parse_adapter(a, i) for i, a in enumerate(adapters)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise RoadError(f"--adapter names must be unique, got {names}; use NAME=PATH")
    files = [read_adapter(s.path) for s in specs]  # check every adapter before loading the base
    model = zoo.load_model(base, seed=seed)
    if not specs:
        embedded = zoo.resolve(base) / CONFIG_NAME
        if not embedded.is_file():
            raise RoadError(f"{base}: no adapter given; pass --adapter PATH (a peft RoAd adapter directory)")
        config = RoadConfig.from_pretrained(embedded)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            get_road_model(model, config, "default")
        return Source(model.eval(), base, ["default"], embedded=True)
    for spec, file in zip(specs, files, strict=True):
        apply_adapter(model, file, spec.name)
    return Source(model.eval(), base, names, embedded=False)
