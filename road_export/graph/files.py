"""Files in and out, torch-free: every writer in road-export goes through `atomic_write`.

`atomic_write(path)` yields a path inside a private staging directory beside `path` (same file system, so the
final `os.replace` is atomic); whatever the block writes there replaces `path` only when the block succeeds.
On any exception, KeyboardInterrupt and SystemExit included (a SIGTERM handler that raises SystemExit is
covered too), the staging directory is removed and `path` is left as it was: no half-written file is ever
visible under a final name. The writers: the exporter and `optimize`/`attach` (`save_model`), peft adapter
directories (`adapters.save_adapter`), merged checkpoints (`checkpoint.merge_checkpoint`), `.onnx_adapter`
files (`swap.write_adapter_file`) and the native kernel library (`native.library_path`).

ONNX models load through onnx-ir with external data left lazy (`ir.load`: tensors are read from the `.data`
file when used) and save as one `.onnx` file, or with their weights in `<name>.onnx.data` beside it when asked
or when their initializers pass `EXTERNAL_DATA_THRESHOLD` (256 MiB).

Why 256 MiB: a single-file save builds the whole protobuf (every tensor's bytes copied into it) and serialises
it, so it holds about two more copies of the weights in memory while writing; onnx-ir's external-data save writes
tensor by tensor (one tensor's bytes at a time). Up to 256 MiB the transient copies cost less than onnxruntime's
own import overhead and the one file is easier to move; above it, the streamed save is what keeps export near
1 x the torch model (tools/bench_scale.py measures it). Tensors of another file's external data are copied by
the kernel (onnx-ir's `ExternalTensor.tofile`, copy_file_range), so rewriting a model (attach, optimize) never
holds the weights it does not change; lazily computed ones (fold, the exporter's) are evaluated one at a time.

JSON files from the user's directories (a base's config.json, a model directory's genai_config.json, ...) are read
by `read_json_object`: a file that is not JSON, or JSON of another kind than an object, is one RoadError line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from road_export.core.errors import RoadError, first_line

if TYPE_CHECKING:  # onnx-ir (and onnx under it) load on first use: `road-export --help` stays light
    import onnx_ir as ir

__all__ = [
    "EXTERNAL_DATA_THRESHOLD", "atomic_write", "check_output", "check_writable", "deferred_signals",
    "kept_on_failure", "load_for_rewrite", "load_model", "needs_external_data", "os_error_reason", "probe_writable",
    "read_json_object", "save_model", "release", "staging_dir", "tensor_bytes", "write_failure_reason",
    "write_text_atomic",
]

TWO_GB = 2**31
EXTERNAL_DATA_THRESHOLD = 256 * 2**20  # bytes of initializers above which weights go to `.data` (see above)
DATA_ALIGNMENT = 65536  # large tensors start at multiples of this in `.data` (onnxruntime can map them)


def _parent(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


_HINTS = {
    errno.ENOSPC: "the disk is full; free space or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted; free space or write elsewhere",
    errno.EROFS: "choose a path on a writable file system",
    errno.EACCES: "choose another path or fix the permissions",
    errno.EPERM: "choose another path or fix the permissions",
    errno.EISDIR: "a directory stands where a file is wanted",
    errno.ENOTDIR: "a file stands where a directory is wanted",
    errno.EFBIG: "the file would exceed the size allowed here (ulimit -f or the file system's limit)",
}


def os_error_reason(error: OSError) -> str:
    """What an OSError says, with a hint: "No space left on device; the disk is full; free space or ..."."""
    what = error.strerror or str(error) or type(error).__name__
    hint = _HINTS.get(error.errno or -1)
    return f"{what}; {hint}" if hint else what


def write_failure_reason(error: OSError, path: str | os.PathLike) -> str:
    """Why writing `path` failed: the OSError's reason; a short write without errno (numpy's "8192 requested and
    3072 written") on a file system with no room left is reported as the full disk it is."""
    if error.errno is None:
        try:
            full = shutil.disk_usage(_parent(Path(path))).free < 1 << 20
        except OSError:
            full = False
        if full:
            return f"No space left on device; {_HINTS[errno.ENOSPC]} ({error})"
    return os_error_reason(error)


def probe_writable(directory: Path, path: Path) -> None:
    """Create and remove a temporary file in `directory`: catches read-only mounts, which os.access misses for
    root. Raises RoadError naming `path`."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=directory)
    except OSError as e:
        raise RoadError(f"{path}: cannot write in {directory} ({os_error_reason(e)})") from e
    try:
        os.close(fd)
    finally:
        os.unlink(name)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, companions: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to (a file, or a directory the block creates).

    On success the temporary replaces `path` with `os.replace`: a file atomically; a directory by moving the old
    one aside first, then removing it. `companions` are further file names the block writes beside the temporary
    path (e.g. an ONNX model's `<name>.data`); they are moved beside `path` first, so the main file never points
    at data that is not there yet. On any exception (BaseException: KeyboardInterrupt, SystemExit too) all of it
    is removed and `path` is untouched.

    Raises RoadError when the staging directory cannot be made, the block wrote nothing to the yielded path, or
    the rename fails (OSError from the block itself is turned into RoadError as well: "<path>: cannot write").
    """
    path = Path(path)
    parent = _parent(path)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise RoadError(f"{path}: cannot write in {parent} ({os_error_reason(e)})") from e
    try:
        tmp = stage / path.name
        yield tmp
        if not tmp.exists() and not tmp.is_symlink():
            raise RoadError(f"{path}: nothing was written")
        with deferred_signals():  # an interruption leaves the old files or the new ones, never a mix
            for name in companions:
                if (stage / name).exists():
                    os.replace(stage / name, parent / name)
            _replace(tmp, path, stage)
    except OSError as e:
        raise RoadError(f"{path}: cannot write ({write_failure_reason(e, path)})") from e
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through `atomic_write`; nothing half-written remains.

    Raises OSError as the file system reports it (the caller names the path: `--report PATH: ...`)."""
    try:
        with atomic_write(path) as tmp:
            tmp.write_text(text)
    except RoadError as e:
        if isinstance(e.__cause__, OSError):
            raise e.__cause__ from None
        raise
    return Path(path)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while a group of renames runs (a model and its data file), so an interruption
    leaves either the old pair or the new one, never a mix; a signal that came meanwhile is raised again on exit,
    to the handler that was there before. Python runs signal handlers in the main thread only, so the handlers
    are swapped (a signal mask would not do: another thread of torch or onnxruntime would take the signal).
    Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: pending.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


def _replace(new: Path, path: Path, stage: Path) -> None:
    if path.is_dir() and not path.is_symlink() and not new.is_dir():
        # a file never replaces a directory: that would delete whatever the directory holds
        raise RoadError(f"{path}: is a directory, where a file would be written; remove or rename it")
    if path.is_dir() and not path.is_symlink():
        old = stage / ".replaced"
        os.replace(path, old)  # the old directory waits in the stage, which is removed after the rename
        try:
            os.replace(new, path)
        except BaseException:
            os.replace(old, path)
            raise
        return
    os.replace(new, path)


def private_dir(prefix: str) -> str:
    """A new directory only this user can enter (mode 0700, `tempfile.mkdtemp` in $TMPDIR) for a process's runtime
    files that are no output (a server's sockets and state); the caller removes it. Not for outputs: those go
    through `atomic_write`."""
    return tempfile.mkdtemp(prefix=prefix)


@contextlib.contextmanager
def staging_dir(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """A hidden directory beside `path` (`.NAME.<random><suffix>`) for intermediate files, e.g. the float model
    `--quantize` reads; removed afterwards whatever happens, with SIGINT/SIGTERM held back (`deferred_signals`) so
    an interruption cannot leave half of it behind (as it could inside tempfile.TemporaryDirectory's cleanup)."""
    path = Path(path)
    stage = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        yield stage
    finally:
        with deferred_signals():
            shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def kept_on_failure(paths: Sequence[str | os.PathLike], *,
                    patterns: Sequence[tuple[str | os.PathLike, str]] = (),
                    on_commit: Callable[[], None] | None = None) -> Iterator[None]:
    """Leave `paths` exactly as they were when the block fails or is interrupted (any BaseException:
    KeyboardInterrupt, a SIGTERM handler's exception): for the writes of one command, which replace several files
    one after the other (a model, its `.data`, its `.onnx_adapter` files) and check them afterwards.

    Before the block each existing file gets a hard link (a copy where the file system has none) in a hidden
    `.<name>.<random>.keep` beside it; `atomic_write` replaces a file by renaming a new one over it, so the link
    keeps the old bytes. On failure the links are renamed back over the paths, paths that did not exist are
    removed (a directory with what it holds: it was created by the block), and an empty directory that was there is
    made empty again; on success the links are dropped. `patterns` are (directory, glob) pairs of further files the
    block may write (e.g. `MODEL.*.onnx_adapter`): those that exist are kept the same way, new ones removed on
    failure. The restore runs with SIGINT/SIGTERM held back (`deferred_signals`).

    The commit, when the block has succeeded, is one step with SIGINT/SIGTERM held back: `on_commit()` runs (the
    CLI's: it raises for a signal taken earlier whose exception Python dropped, and the old files are restored;
    else from here on a signal is ignored, the command exits with its own code), then the links are dropped; a
    signal that arrives before it (after the block's last rename too) restores the old files, one held back
    during it is delivered afterwards to a handler that knows the command has committed.
    """
    targets = [Path(p) for p in paths]
    matches = lambda: {m for d, pattern in patterns for m in Path(d).glob(pattern)  # noqa: E731
                       if not m.name.startswith(".") and (m.is_symlink() or m.is_file())}
    before = matches()
    targets = list(dict.fromkeys([*targets, *sorted(before)]))
    kept: dict[Path, Path] = {}
    empty_dirs: list[Path] = []
    absent: list[Path] = []
    with deferred_signals():
        try:
            for path in targets:
                if path.is_symlink() or path.is_file():
                    kept[path] = _keep(path)
                elif path.is_dir():
                    if any(path.iterdir()):
                        raise RoadError(f"{path}: exists and is not empty; choose a new path")
                    empty_dirs.append(path)
                else:
                    absent.append(path)
        except BaseException:
            for link in kept.values():
                link.unlink(missing_ok=True)
            raise
    committed = False
    try:
        yield
        with deferred_signals():  # the commit point: the new files stay
            if on_commit is not None:
                on_commit()  # may refuse (raise): the block is then undone like a failed one
            for link in kept.values():
                link.unlink(missing_ok=True)
            committed = True
    except BaseException:
        if committed:  # a signal delivered after the commit: the new files are final
            raise
        with deferred_signals():
            for path in [*absent, *(matches() - before)]:
                _remove(path)
            for path in empty_dirs:
                if not path.is_dir() or path.is_symlink() or any(path.iterdir()):
                    _remove(path)
                    with contextlib.suppress(OSError):
                        path.mkdir()
            for path, link in kept.items():
                try:
                    os.replace(link, path)
                    # rename() between two links of one file does nothing: the file was never replaced
                    link.unlink(missing_ok=True)
                except OSError:
                    if path.is_dir() and not path.is_symlink():  # a directory came in its place: ours
                        _remove(path)
                        os.replace(link, path)
                    else:
                        raise
        raise


def _keep(path: Path) -> Path:
    """A hidden hard link to `path` beside it (a copy where hard links are refused)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".keep", dir=_parent(path))
    os.close(fd)
    os.unlink(name)
    try:
        os.link(path, name, follow_symlinks=False)
    except OSError:
        try:
            shutil.copy2(path, name, follow_symlinks=False)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
    return Path(name)


def _remove(path: Path) -> None:
    """Remove a file, link or directory tree; nothing when absent."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def check_writable(path: str | os.PathLike) -> None:
    """Fail early, before long work, when file `path` cannot be created: RoadError naming what to change."""
    path = Path(path)
    if path.is_dir():
        raise RoadError(f"{path}: is a directory; give a file name")
    parent = _parent(path)
    if not parent.is_dir():
        raise RoadError(f"{path}: directory {parent} does not exist; create it first")
    probe_writable(parent, path)  # says why (read-only file system, permission denied), for root too


def check_output(path: str | os.PathLike, suffix: str = ".onnx") -> Path:
    """`path` as a Path after checking its suffix and that it can be written (RoadError otherwise)."""
    path = Path(path)
    if path.suffix != suffix:
        raise RoadError(f"{path}: the output file name must end in {suffix}")
    check_writable(path)
    return path


def load_model(path: str | os.PathLike) -> ir.Model:
    """An ONNX file as onnx-ir, external data left lazy; RoadError when missing or unreadable."""
    import onnx_ir as ir

    path = Path(path)
    if not path.is_file():
        raise RoadError(f"{path}: no such ONNX file")
    try:
        return ir.load(path)
    except Exception as e:
        first = first_line(e)
        raise RoadError(f"{path}: not a readable ONNX model ({first})") from e


_JSON_KINDS = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def read_json_object(path: str | os.PathLike, fix: str) -> dict[str, Any]:
    """The JSON object in the file at `path` (a config.json, genai_config.json, tokenizer_config.json, a
    safetensors index: files of the user's directories). Raises RoadError "PATH: not JSON (WHY); FIX" for a file
    that cannot be read as JSON, and "PATH: holds a JSON array, not an object; FIX" for JSON of another kind; `fix`
    says how to mend it (e.g. "export the model again")."""
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise RoadError(f"{path}: cannot read it ({os_error_reason(e)}); {fix}") from e
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        raise RoadError(f"{path}: not JSON ({first_line(e)}); {fix}") from e
    if not isinstance(data, dict):
        raise RoadError(f"{path}: holds a JSON {_JSON_KINDS.get(type(data), type(data).__name__)}, not an object; "
                        f"{fix}")
    return data


def tensor_bytes(model: ir.Model) -> int:
    """Bytes of the model's initializers (what decides between one file and `.data`)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def needs_external_data(model: ir.Model) -> bool:
    """True when the model already keeps weights outside or its initializers pass `EXTERNAL_DATA_THRESHOLD`."""
    import onnx_ir as ir

    external = any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    return external or tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD


def save_model(model: ir.Model, path: str | os.PathLike, external_data: bool | None = None,
               check: Callable[[Path], None] | None = None) -> Path | None:
    """Write `model` to `path` atomically; returns the `.data` file's path when weights went there.

    `external_data=None` decides by size (`EXTERNAL_DATA_THRESHOLD`). With external data the tensors are written
    one at a time (lazy tensors evaluated, tensors of another file's `.data` copied by the kernel), large ones
    aligned to `DATA_ALIGNMENT`; the model is unchanged afterwards. A stale `<path>.data` of an earlier save
    is removed when the new file holds its weights inline. `check(temporary path)` runs on the written file before
    it is moved into place and may raise to keep it from ever appearing (e.g. "onnxruntime must load it").
    Raises RoadError when `path` cannot be written.
    """
    import onnx_ir as ir

    path = Path(path)
    check_writable(path)
    if external_data is None:
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    with atomic_write(path, companions=[data_name] if external_data else []) as tmp:
        if external_data:
            ir.save(model, tmp, external_data=data_name, alignment=DATA_ALIGNMENT)
        else:
            ir.external_data.load_to_model(model)  # weights of another file's `.data` go inside the one file
            ir.save(model, tmp)
        if check is not None:
            check(tmp)
    if external_data:
        return path.with_name(data_name)
    path.with_name(data_name).unlink(missing_ok=True)  # a stale data file of an earlier export
    return None


def release(tensor: ir.TensorProtocol) -> None:
    """Close an ExternalTensor's memory map (its pages stop counting as resident); a map that numpy arrays still
    view is left open. Anything else: nothing to do."""
    import onnx_ir as ir

    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):
            tensor.release()


def load_for_rewrite(source: str | os.PathLike, target: str | os.PathLike) -> tuple[ir.Model, bool]:
    """Check both paths, load `source` (external data lazy) and say whether `target` should get external data.

    For tools that read one ONNX file and write another (`optimize`, `attach`). RoadError on a missing or
    unreadable source or a target that is not a writable `.onnx` path.
    """
    if not Path(source).is_file():
        raise RoadError(f"{source}: no such ONNX file")
    check_output(target)
    model = load_model(source)
    return model, needs_external_data(model)
