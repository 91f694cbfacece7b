"""Imported first by the modules that need the `export` extra (torch and transformers): on a serving install
(`pip install road-export`, no torch) they fail with one RoadError line saying what to install, which the CLI prints
with exit code 2, instead of an ImportError deep inside a command."""

from __future__ import annotations

import importlib.util

from road_export.core.errors import RoadError

EXTRA_MODULES = ("torch", "transformers")


def missing() -> list[str]:
    """The export extra's modules that cannot be imported here."""
    absent = []
    for name in EXTRA_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            absent.append(name)
    return absent


if _absent := missing():
    raise RoadError(f"{' and '.join(_absent)} not installed: exporting, verify and merge-checkpoint need "
                    "pip install 'road-export[export]' (inspect, optimize, attach, adapter and RoadSession do not)")
