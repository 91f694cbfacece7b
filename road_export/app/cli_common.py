"""Plumbing shared by the two command lines, `road-export` (road_export.app.cli) and `road-export serve`
(road_export.app.serving.cli): both import it, neither imports the other's module for it. The parser whose usage errors
are one line, the exit codes, and `failure`: the one mapping from an exception (road_export.core.errors' kinds) to the
line on stderr and the exit code."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from road_export.core.errors import (
    EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK, EXIT_PARITY, ParityFailure, RoadError, Terminated,
    is_onnxruntime_error, onnxruntime_line)

__all__ = ["EXIT_BAD_INPUT", "EXIT_BROKEN_PIPE", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PARITY",
           "EXIT_TERMINATED", "Parser", "failure", "number", "silence_stdout"]

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 128 + signal.SIGTERM
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a tool killed by SIGPIPE


def number(kind: type[int] | type[float], ok: Callable[[Any], bool],
           says: str | Callable[[Any], str]) -> Callable[[str], Any]:
    """An argparse `type=` for a number option, refusing a bad value while parsing, before anything is loaded.

    `kind` (int or float) parses the text: "'TEXT' is not an integer" / "is not a number" otherwise. The value is
    kept where `ok(value)` holds; otherwise the message is `says`: a `str.format` template given `text` (as typed)
    and `value` (as parsed), or a function of the value. Raises argparse.ArgumentTypeError, which argparse reports as
    "argument --NAME: MESSAGE" (and `Parser` as one line, exit 2)."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(says(value) if callable(says) else says.format(text=text, value=value))
        return value

    return parse


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2: RoadError("MESSAGE (see PROG --help)"), which
    the command lines print as one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise RoadError(f"{message} (see {self.prog} --help)")


def failure(error: BaseException) -> tuple[str, int]:
    """(the one line for stderr, after "road-export: "; the exit code) for an exception that ended a command:

        RoadError (OnnxRuntimeFailure too)   2  "error: LINE" (`cli_message`, where set: the command line's terms)
        OSError                              2  "error: LINE" (the file system refused: full, read-only, ...)
        onnxruntime's own exception          2  "error: onnxruntime refused the input: ITS FIRST LINE"
        ParityFailure                        1  "error: PATH: parity FAILED (...)"
        KeyboardInterrupt / Terminated     130 / 143, temporary files removed
        anything else (ExportBug included)   3  "internal error: TYPE: MESSAGE" (a bug of ours)

    With ROAD_EXPORT_DEBUG set, the traceback of an internal error is printed to stderr first (exit code
    unchanged)."""
    if isinstance(error, RoadError):
        return f"error: {error.cli_message or error}", EXIT_BAD_INPUT
    if isinstance(error, OSError):
        from road_export.graph.checks import os_error_line

        return f"error: {os_error_line(error)}", EXIT_BAD_INPUT
    if isinstance(error, ParityFailure):
        return f"error: {error}", EXIT_PARITY
    if isinstance(error, KeyboardInterrupt):
        return "interrupted; temporary files removed", EXIT_INTERRUPTED
    if isinstance(error, Terminated):
        return "terminated; temporary files removed", EXIT_TERMINATED
    if os.environ.get("ROAD_EXPORT_DEBUG"):  # the traceback on request, the exit code unchanged
        import traceback

        traceback.print_exception(error, file=sys.stderr)
    if is_onnxruntime_error(error):
        return f"error: onnxruntime refused the input: {onnxruntime_line(error)}", EXIT_BAD_INPUT
    return f"internal error: {type(error).__name__}: {error} (set ROAD_EXPORT_DEBUG=1 for the traceback)", EXIT_INTERNAL


def silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what is left does not fail again (after a
    BrokenPipeError: the reader went away)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)

