"""The onnxruntime side (layer 4, a sibling of export): sessions, generation, the KV cache, the GPU loop.

`road_export.runtime.RoadSession` (and every other name of `road_export.runtime.session`) is offered here on first
use (PEP 562), so importing one submodule (`road_export.runtime.kvcache`) loads no more than that submodule needs.
"""

from __future__ import annotations

from pathlib import Path


def __getattr__(name: str):
    here = Path(__file__).parent
    if name.startswith("__") or (here / f"{name}.py").is_file() or (here / name).is_dir():
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")  # submodules load as submodules
    import road_export.runtime.session as session

    try:
        value = getattr(session, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value
