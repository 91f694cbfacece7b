"""Plumbing shared by the two command lines, `road-export` (road_export.cli) and `road-export serve`
(road_export.serving.cli): both import it, neither imports the other's module for it."""

from __future__ import annotations

import argparse

from road_export.errors import RoadError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2: RoadError("MESSAGE (see PROG --help)"), which
    the command lines print as one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise RoadError(f"{message} (see {self.prog} --help)")
