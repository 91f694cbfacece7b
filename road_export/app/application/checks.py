"""The checks and tails the jobs share: output and report paths, --atol on a quantized file, writing the report, the
verification of a written file against its source (`parity`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from road_export.app.application.interruptions import Step
from road_export.core.errors import (
    RoadError,
    onnxruntime_blame,
)

SEQ2SEQ_QUANTIZE = ("{option}: {model} is an encoder-decoder model, and road-export quantizes decoder-only and "
                    "encoder-only models so far; drop {option} (the files are written in float)")


# ---- checks shared by the jobs ----

_WRITE_ERRORS = ("ENOSPC", "EDQUOT", "EROFS", "EFBIG", "EIO")


@contextlib.contextmanager
def writing(output: str | Path) -> Iterator[None]:
    """A write that the file system refuses (full, read-only, too big) becomes one line naming `output`, also when
    the failing call was on a temporary file or gave no name."""
    import errno

    try:
        yield
    except OSError as e:
        if e.errno is not None and e.errno not in {getattr(errno, n) for n in _WRITE_ERRORS if hasattr(errno, n)}:
            raise
        from road_export.graph.checks import write_failure_reason

        raise RoadError(f"{output}: cannot write ({write_failure_reason(e, output)})") from e


def input_paths(*files: str | Path | None, base: str | None = None, adapters: Sequence[str] = ()) -> list[Path]:
    """A command's inputs: `files`, the `base` directory and the PATH of each adapter `[NAME=]PATH`."""
    paths = [Path(f) for f in files if f is not None]
    if base:
        paths.append(Path(base))
    for text in adapters:
        name, sep, path = text.partition("=")
        paths.append(Path(text) if not sep or Path(text).exists() else Path(path))
    return paths


def check_outputs(outputs: dict[str, Path | str | None], inputs: Sequence[Path]) -> None:
    """Every output (name in the message -> path; None: skipped) differs from every input."""
    from road_export.graph.checks import check_not_input

    for what, output in outputs.items():
        if output is not None:
            check_not_input(output, what, list(inputs))


def check_report(path: str | None, *others: Path) -> None:
    """--report: a writable file path, not one of the command's other outputs."""
    if path is None:
        return
    from road_export.graph.checks import check_output_file

    try:
        report = check_output_file(path, what="report path")
    except RoadError as e:
        raise RoadError(f"--report {e}") from None
    for other in others:
        if report.resolve() == other.resolve():
            raise RoadError(f"--report {path}: is also the command's {other.suffix or 'output'} file; choose another "
                            "path")


def check_atol_float(atol: float | None, path: str | Path, quantized: str | None) -> None:
    """--atol judges float files; a quantized one is judged by cosine (parity.COSINE_MIN), which --atol would not
    change: refused rather than silently ignored."""
    if atol is not None and quantized:
        from road_export.app.parity import COSINE_MIN

        raise RoadError(f"--atol {atol:g}: {path} is quantized ({quantized}), and a quantized file's parity is judged "
                        f"by cosine >= {COSINE_MIN:g}, not by a tolerance; drop --atol")


def check_implicit_outputs(outputs: dict[str, Path]) -> None:
    """Files a command writes without being named (`.data`, swap files): none may be a directory or other
    non-file, which the write would replace."""
    for what, path in outputs.items():
        if path.is_dir() and not path.is_symlink():
            raise RoadError(f"{path}: is a directory, where the {what} would be written; remove or rename it")
        if path.exists() and not path.is_file():
            raise RoadError(f"{path}: exists and is not a regular file, where the {what} would be written; remove "
                            "or rename it")


def quantized(path: Path) -> str | None:
    """A written file's quantization in one phrase (inspection.quantization_summary), None for float weights."""
    from road_export.graph.inspection import quantization_summary

    return quantization_summary(path)


def write_report(report, path: str | None) -> None:
    """The parity report as JSON at `path` (None: nothing), atomically."""
    if path:
        from road_export.graph.checks import os_error_line, write_text_atomic

        try:
            write_text_atomic(path, report.to_json() + "\n")
        except OSError as e:
            raise RoadError(f"--report {os_error_line(e, path)}") from e


def quiet_libraries() -> None:
    """transformers draws its own progress bars and warnings; the caller's `on_step` is the one progress display."""
    from road_export.core import requires_export  # noqa: F401, I001  (first: one clear line without the extra)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def parity(onnx_path: Path, source, step: Step, *, task: str | None, atol: float | None, native: bool,
           seq2seq: bool = False, blame: Path | None = None):
    """verify.verify (or verify_seq2seq for an encoder-decoder directory) of `onnx_path` against the source's
    reference (peft's forward, or the base alone); onnxruntime's failures become one line naming `blame`."""
    from road_export.app import verify as checker

    step("verifying")
    with onnxruntime_blame(blame or onnx_path, "run"):
        if seq2seq:
            return checker.verify_seq2seq(onnx_path, source.reference_model, atol=atol,
                                          native=None if native else False, reference=source.reference_name)
        return checker.verify(onnx_path, source.reference_model, task=task, atol=atol,
                              native=None if native else False, reference=source.reference_name)


def normalized(options: Any, *names: str) -> None:
    """A frozen options object's path fields as the strings the checks read: `adapters` a tuple of str (a single
    path or a list welcome), the other `names` str (or None)."""
    if hasattr(options, "adapters"):
        given = options.adapters
        adapters = (given,) if isinstance(given, (str, Path)) else tuple(given)
        object.__setattr__(options, "adapters", tuple(str(a) for a in adapters))
    for name in names:
        value = getattr(options, name)
        if value is not None and not isinstance(value, str):
            object.__setattr__(options, name, str(value))


