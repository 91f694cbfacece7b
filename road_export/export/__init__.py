"""ONNX export from torch (needs `road-export[export]`: torch and transformers; peft for live peft models).

The subpackage is also callable: `road_export.export(model, path, ...)` is `road_export.export.export(model,
path, ...)` (see road_export/export/exporter.py for the parameters). The call form keeps the one-line API the README
shows, while `road_export.export` stays this subpackage (`road_export.export.tasks`, `.op`, `.exporter` are reachable
under it and nothing is rebound). Modules: `prepare` (peft adoption, the `ExportContext` with merged copies or
coefficient stand-ins), `capture` (trace plan, `torch.onnx.export`), `post` (post-export passes: swappable inputs,
I/O and axis names, metadata), `pipeline` (one path for every file: capture -> post-export passes -> save, over a
list of parts), `exporter` (the entry point: checks, the single part of a decoder-only model, the quantizing save),
`seq2seq` (an encoder-decoder's three parts and its merged decoder), `result` (ExportResult and the save +
swap-file tail), `tasks` (task specs and sample inputs), `op` (the torch custom op).
"""

from __future__ import annotations

import sys
import types

from road_export.core import requires_export  # noqa: F401  (one clear line without the export extra)

__all__ = ["ExportResult", "export"]


def __getattr__(name: str):
    if name in __all__:
        from road_export.export import exporter

        return getattr(exporter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallableModule(types.ModuleType):
    """This subpackage, callable as its `export` function."""

    def __call__(self, *args, **kwargs):
        from road_export.export.exporter import export

        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
