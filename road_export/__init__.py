"""road-export: RoAd-adapted models to ONNX Runtime, merged or as swappable rotations.

Names are imported on first use (PEP 562), so `import road_export` costs nothing and the torch-free parts
(`road_export.core`, `.graph`, `.passes`, `.runtime`) never pull torch in. The
torch side (`export`, `load_adapter`, `get_road_model`, ...) needs `pip install 'road-export[export]'`.

`road_export.export` is the export subpackage, callable as the export function: `rx.export(model, "m.onnx")`;
`rx.export_model` is the same function under a plain name. `rx.export_verified(rx.ExportOptions(...))` is what
`road-export export` does (checks, export, parity against peft, report, atomic commit: road_export.app.application).
"""

from __future__ import annotations

import importlib

from road_export.core.version import __version__ as __version__  # re-exported: road_export.__version__

_LAZY = {
    "AdapterFile": "road_export.graph.adapter_files",
    "ExportOptions": "road_export.app.application",
    "VerifyOptions": "road_export.app.application",
    "export_verified": "road_export.app.application",
    "verify_model": "road_export.app.application",
    "read_adapter": "road_export.graph.adapter_files",
    "RoadConfig": "road_export.core.config",
    "RoadVariant": "road_export.core.config",
    "RoadError": "road_export.core.errors",
    "ExportBug": "road_export.core.errors",
    "OnnxRuntimeFailure": "road_export.core.errors",
    "ParityFailure": "road_export.core.errors",
    "from_peft": "road_export.export.adapters",
    "load_adapter": "road_export.export.adapters",
    "save_adapter": "road_export.export.adapters",
    "ExportResult": "road_export.export.exporter",
    "RoadLayer": "road_export.export.layers",
    "adapter_ids": "road_export.export.model",
    "disable_adapters": "road_export.export.model",
    "get_road_model": "road_export.export.model",
    "merge_adapter": "road_export.export.model",
    "merge_and_unload": "road_export.export.model",
    "mixed_batch": "road_export.export.model",
    "road_layers": "road_export.export.model",
    "set_adapter": "road_export.export.model",
    "unload": "road_export.export.model",
    "unmerge_adapter": "road_export.export.model",
    "RoadSession": "road_export.runtime.session",
    "open_session": "road_export.runtime.sessions",
}

__all__ = sorted([*_LAZY, "export", "export_model"])


def __getattr__(name: str):
    if name == "export":  # the subpackage (callable); after its first import the attribute is set directly
        return importlib.import_module("road_export.export")
    if name == "export_model":
        return importlib.import_module("road_export.export.exporter").export
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'road_export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
