"""road-export: RoAd-adapted models to ONNX Runtime, merged or as swappable rotations.

The names below are imported on first use (PEP 562), so `import road_export.cli` or `road_export.errors` does
not pull in torch: `road-export --help` answers before any heavy import.
"""

from __future__ import annotations

import importlib
import sys
import types

_LAZY = {
    "from_peft": "road_export.adapters", "load_adapter": "road_export.adapters",
    "read_adapter": "road_export.adapters", "save_adapter": "road_export.adapters",
    "RoadConfig": "road_export.config", "RoadVariant": "road_export.config",
    "RoadError": "road_export.errors",
    "ExportResult": "road_export.export.exporter", "export": "road_export.export.exporter",
    "RoadLayer": "road_export.layers",
    **{name: "road_export.model" for name in (
        "adapter_ids", "disable_adapters", "get_road_model", "merge_adapter", "merge_and_unload", "mixed_batch",
        "road_layers", "set_adapter", "unload", "unmerge_adapter")},
}

__all__ = sorted(_LAZY)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'road_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """`road_export.export` stays the export function when the subpackage of the same name is imported."""

    def __setattr__(self, name: str, value) -> None:
        if name == "export" and isinstance(value, types.ModuleType):
            return  # the import system binds a loaded subpackage on its parent; the function keeps the name
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
