"""road-export's errors by kind, each with the exit code the command line gives it:

    RoadError           2  bad input: one line naming the file, module or tensor and how to fix it
    OnnxRuntimeFailure  2  onnxruntime refused to load or run the user's file (a RoadError, with onnxruntime's cause)
    ParityFailure       1  the written file does not match its reference (the files stay, the report says where)
    ExportBug           3  export or translation failed on a model road-export takes: a bug of ours, naming what was
                           being traced or translated
    Terminated        143  SIGTERM, raised in the main thread like KeyboardInterrupt (130) so every writer's cleanup
                           runs

They live here, below every module that raises them, so that `python -m road_export.app.cli` (the CLI module loaded
twice: as __main__ and as road_export.app.cli) catches the class the library raises. `onnxruntime_line` turns an
onnxruntime exception into one line; `onnxruntime_errors` recognises one by its class (onnxruntime's pybind11
exception types share no base class), not by its module's name."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

EXIT_OK, EXIT_PARITY, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3

# onnxruntime's Python exceptions: the classes its pybind11 module registers (onnxruntime/python/
# onnxruntime_pybind_exceptions.cc: Fail, InvalidArgument, NoSuchFile, NoModel, EngineError, RuntimeException,
# InvalidProtobuf, ModelLoaded, NotImplemented, InvalidGraph, EPFail, ...)
_ORT_STATE = "onnxruntime.capi.onnxruntime_pybind11_state"


class RoadError(ValueError):
    """Bad input: the message names the file, module or tensor, and says how to fix it. `cli_message`, where set,
    is the same line in the command line's terms (the CLI prints it instead: `--task`, not Python's `task=`)."""

    cli_message: str | None = None
    exit_code = EXIT_BAD_INPUT


class OnnxRuntimeFailure(RoadError):
    """onnxruntime could not load or run the user's file: "PATH: onnxruntime cannot load it (CAUSE)", CAUSE being
    onnxruntime's own first line (`onnxruntime_line`). A RoadError (exit 2): the file is the input."""

    def __init__(self, path: str | os.PathLike, doing: str, error: BaseException) -> None:
        super().__init__(f"{path}: onnxruntime cannot {doing} it ({onnxruntime_line(error)})")
        self.path = str(path)
        self.doing = doing


class ExportBug(RuntimeError):
    """Export or translation failed on a model road-export takes, on inputs road-export built for it: a bug of ours,
    not bad input (the CLI exits 3). The message names what was being done: the model class, the part being traced
    and where in the model's code the trace stopped (export.capture), or the step of the export or translation
    (application.ExportJob, attach) that failed."""

    exit_code = EXIT_INTERNAL


class ParityFailure(Exception):
    """The written model's outputs differ from the reference beyond the tolerance (exit 1). `report` is the parity
    report (its `table()` and `to_json()` say which case and output); the files were written and stay."""

    exit_code = EXIT_PARITY

    def __init__(self, path: str | os.PathLike, report) -> None:
        failed = [r.case for r in getattr(report, "rows", []) if not getattr(r, "ok", True)]
        super().__init__(f"{path}: parity FAILED" + (f" ({', '.join(failed[:3])})" if failed else ""))
        self.path = str(path)
        self.report = report


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt so every writer's cleanup runs."""


def onnxruntime_errors() -> tuple[type[BaseException], ...]:
    """The exception classes of the onnxruntime loaded in this process (none when it is not: then no exception can
    be one). onnxruntime raises these from session creation, `run` and adapter loading."""
    state = sys.modules.get(_ORT_STATE)
    if state is None:
        return ()
    return tuple(c for c in vars(state).values()
                 if isinstance(c, type) and issubclass(c, Exception) and c.__module__ == _ORT_STATE)


def is_onnxruntime_error(error: BaseException) -> bool:
    """Whether `error` is one of onnxruntime's own exceptions (`onnxruntime_errors`)."""
    return isinstance(error, onnxruntime_errors())


def first_line(error: BaseException) -> str:
    """An exception as one line for a message: the first non-empty line of its text, else its class name (an
    exception raised without a message)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def onnxruntime_line(error: BaseException) -> str:
    """onnxruntime's exception as one line: the first non-empty line of its message (onnxruntime appends the
    failing node's details and a stack on later lines), else the exception's class name (`first_line`)."""
    return first_line(error)


@contextlib.contextmanager
def onnxruntime_blame(path: str | os.PathLike, doing: str) -> Iterator[None]:
    """onnxruntime's failures inside the block become OnnxRuntimeFailure naming `path` ("PATH: onnxruntime cannot
    DOING it (CAUSE)"); everything else passes unchanged."""
    try:
        yield
    except Exception as e:
        if not is_onnxruntime_error(e):
            raise
        raise OnnxRuntimeFailure(path, doing, e) from e
