"""Checks on the paths a command reads and writes, made before any long step; torch-free.

Every function raises `RoadError` with one line naming the path at fault and what to do. These are small and
self-contained so that the module owning file I/O can take them over as they are.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from road_export.core.errors import RoadError, first_line

# The OS error reasons, the write probe and the atomic text write live with the other writers in road_export.graph.files
# (the module that owns file I/O); they are re-exported here for the checks below and for existing callers.
from road_export.graph.files import (  # noqa: F401
    deferred_signals,
    os_error_reason,
    probe_writable,
    write_failure_reason,
    write_text_atomic,
)


def os_error_line(error: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for an OSError: the path at fault (the error's own, else `path`), what happened, a hint."""
    where = error.filename if error.filename is not None else path
    what = os_error_reason(error)
    return f"{where}: {what}" if where is not None else what


def _directory(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _check_parent(path: Path, what: str) -> None:
    parent = _directory(path)
    if not parent.exists():
        raise RoadError(f"{path}: directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise RoadError(f"{path}: {parent} is a file, not a directory")
    probe_writable(parent, path)  # says why (read-only file system, permission denied), for root too


def check_output_file(path: str | os.PathLike, *, suffix: str | None = None, what: str = "output path") -> Path:
    """A file about to be written (replaced atomically): not a directory, in an existing writable directory.

    `suffix`: the name must end in it (".onnx", ".onnx_adapter"). Returns the path; raises RoadError.
    """
    path = Path(path)
    if suffix and not path.name.endswith(suffix):
        raise RoadError(f"{path}: the {what} must end in {suffix}")
    if path.is_dir():
        raise RoadError(f"{path}: is a directory; give a file name{f' ending in {suffix}' if suffix else ''}")
    if path.exists() and not path.is_file():
        raise RoadError(f"{path}: exists and is not a regular file; choose another {what}")
    _check_parent(path, what)
    return path


def check_output_model(path: str | os.PathLike) -> Path:
    """An ONNX file to write, and the `.data` file beside it that external data would take."""
    path = check_output_file(path, suffix=".onnx")
    data = path.with_name(path.name + ".data")
    if data.is_dir():
        raise RoadError(f"{data}: is a directory, where the model's external data file would go; remove or rename "
                        "it")
    return path


def check_not_input(output: str | os.PathLike, what: str, inputs) -> None:
    """Refuse an output that is one of the command's inputs: the same path or file (hard links, symbolic links),
    an ONNX input's `.data` file, or a file already inside an input directory (a base or adapter directory's file).

    `inputs`: paths of the input files and directories (missing ones are skipped). Raises RoadError naming `what`.
    """
    out = Path(output)
    for given in inputs:
        if given is None:
            continue
        candidates = [Path(given)]
        if Path(given).suffix == ".onnx":
            candidates.append(Path(given).with_name(Path(given).name + ".data"))
        for inp in candidates:
            if not inp.exists():
                continue
            same = out.resolve() == inp.resolve() or (out.exists() and os.path.samefile(out, inp))
            inside = inp.is_dir() and out.is_file() and out.resolve().is_relative_to(inp.resolve())
            if same or inside:
                where = "is" if same else "is a file of"
                raise RoadError(f"{what} {output}: {where} the input {inp}; inputs are left unchanged, choose "
                                "another path")


def check_output_dir(path: str | os.PathLike, *, what: str = "output directory") -> Path:
    """A directory about to be created (renamed into place): absent or empty, parent writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RoadError(f"{path}: is a file; the {what} must be a new directory")
    if path.is_dir() and any(path.iterdir()):
        raise RoadError(f"{path}: exists and is not empty; choose a new directory")
    _check_parent(path, what)
    return path


def check_input_dir(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise RoadError(f"{path}: no such {what} directory")
    if not path.is_dir():
        raise RoadError(f"{path}: is a file; the {what} is a directory")
    return path


def check_onnx_input(path: str | os.PathLike):
    """Read an ONNX file's structure (not its external data) and check it is a whole model.

    Refuses: a missing path, a directory, an empty file, a file that does not parse (truncated or not ONNX), a
    model without graph, opset or outputs, and external data files that are missing or shorter than the model
    says. Returns the `onnx.ModelProto` (external tensors not loaded). Raises RoadError naming this path.
    """
    import onnx

    path = Path(path)
    if not path.exists():
        raise RoadError(f"{path}: no such ONNX file")
    if path.is_dir():
        raise RoadError(f"{path}: is a directory; give an ONNX file")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise RoadError(os_error_line(e, path)) from e
    if size == 0:
        raise RoadError(f"{path}: empty file; not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except OSError as e:
        raise RoadError(os_error_line(e, path)) from e
    except Exception as e:
        first = first_line(e)
        raise RoadError(f"{path}: not a readable ONNX model, truncated or another format ({first})") from e
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import or not model.graph.output:
        raise RoadError(f"{path}: not a whole ONNX model (no {_first_missing(model)}); truncated or another format")
    check_external_data(model, path)
    return model


def _first_missing(model) -> str:
    if model.ir_version <= 0:
        return "IR version"
    if not model.HasField("graph"):
        return "graph"
    if not model.opset_import:
        return "opset import"
    return "graph outputs"


def check_external_data(model, path: Path) -> None:
    """Every initializer stored outside the model must have its file, long enough; blamed on the model `path`."""
    import onnx

    sizes: dict[Path, int] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        file = _directory(path) / location
        if file not in sizes:
            try:
                sizes[file] = file.stat().st_size if file.is_file() else -1
            except OSError:
                sizes[file] = -1
        if sizes[file] < 0:
            raise RoadError(f"{path}: its external data file {location!r} is missing (expected beside it, "
                            f"{file}); copy it with the model")
        end = int(info.get("offset") or 0) + int(info.get("length") or 0)
        if end > sizes[file]:
            raise RoadError(f"{path}: its external data file {location!r} is truncated ({sizes[file]} bytes, tensor "
                            f"{tensor.name} ends at {end})")


def check_tolerance(value: float | None, option: str = "--atol") -> float | None:
    """A parity tolerance: None (the dtype's default) or a finite number >= 0."""
    if value is None:
        return None
    if not math.isfinite(value) or value < 0:
        raise RoadError(f"{option} {value}: must be a finite number >= 0 (e.g. 1e-4)")
    return value


# torch's ONNX exporter writes opset 18 at least (a lower --opset would be silently raised to 18); 25 is the
# highest that the tested onnxruntime (1.32) loads.
MIN_OPSET, MAX_OPSET = 18, 25
SEED_LIMIT = 2**63  # seeds are integers in [0, SEED_LIMIT): torch.manual_seed's int64
# The options that take one of a few words, as the CLI offers them (its `choices`) and the application checks them.
CHOICES = {"mode": ("merge", "rotate"), "dtype": ("float32", "float16", "bfloat16"),
           "graph": ("road", "builder", "auto"), "device": ("cpu", "cuda"), "target": ("onnxruntime", "portable"),
           "quantize": ("int4", "int8")}


def check_option_values(options) -> None:
    """The values of an options object (road_export.app.application's ExportOptions, VerifyOptions, ...) whatever
    built it, Python or the CLI: each field of CHOICES one of its words (None where the field may be unset), `seed`
    an integer in [0, SEED_LIMIT), `opset` None or MIN_OPSET..MAX_OPSET, `atol` None or a finite number >= 0. Raises
    RoadError naming the option as the CLI spells it ("--seed -1: must be an integer >= 0")."""
    for field, words in CHOICES.items():
        value = getattr(options, field, None)
        if value is not None and value not in words:
            raise RoadError(f"--{field} {value!r}: choose one of {', '.join(words)}")
    seed = getattr(options, "seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise RoadError(f"--seed {seed!r}: must be an integer >= 0")
    opset = getattr(options, "opset", None)
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int)
                              or not MIN_OPSET <= opset <= MAX_OPSET):
        raise RoadError(f"--opset {opset!r}: not supported; choose {MIN_OPSET} to {MAX_OPSET}")
    atol = getattr(options, "atol", None)
    if atol is not None and (isinstance(atol, bool) or not isinstance(atol, int | float)):
        raise RoadError(f"--atol {atol!r}: must be a finite number >= 0 (e.g. 1e-4)")
    check_tolerance(atol)

