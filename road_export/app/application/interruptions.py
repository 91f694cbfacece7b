"""SIGINT and SIGTERM while a job runs (`Interruptions`, owned by the job or by the CLI for its whole command), the
steps a job reports (`Steps`), and what turns an unexpected failure inside our own code into an ExportBug (`ours`)."""

from __future__ import annotations

import contextlib
import contextvars
import signal
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from road_export.core.errors import (
    ExportBug,
    RoadError,
    Terminated,
    is_onnxruntime_error,
)

Step = Callable[[str], None]



# ---- interruptions: SIGINT and SIGTERM while a job runs ----

ACTIVE: contextvars.ContextVar[Interruptions | None] = contextvars.ContextVar("road_export_interruptions",
                                                                                 default=None)


class Interruptions:
    """SIGINT and SIGTERM for one job (or one CLI command), state on the instance.

    While `installed`, SIGTERM raises `Terminated` in the main thread (a second one is ignored, so cleanup finishes)
    and SIGINT KeyboardInterrupt (where Python's own handler was there: an ignored SIGINT, as in a shell's background
    job, stays ignored). Once the job has committed its files (`commit`, the `on_commit` of its
    `files.kept_on_failure`) both are ignored: it ends with its own result, not 130/143 with the new files in place.
    A signal taken before the commit whose exception Python dropped (an exception a handler raises while a weakref or
    __del__ callback runs is lost; torch's weak maps run them) is raised at the job's next step (`check`) and at the
    latest at its commit, which then restores the old files. Outside the main thread nothing is installed."""

    def __init__(self) -> None:
        self.committed = False
        self.received: list[int] = []

    @staticmethod
    def active() -> Interruptions | None:
        """The instance installed by the caller in this context (the CLI's), if any."""
        return ACTIVE.get()

    def check(self) -> None:
        """Raise the exception of a signal taken before the commit whose first raise was dropped."""
        if self.received and not self.committed:
            raise Terminated() if self.received[0] == signal.SIGTERM else KeyboardInterrupt()

    def commit(self) -> None:
        """The commit: a dropped signal fails it (the old files come back), else from here on signals are
        ignored."""
        self.check()
        self.committed = True

    def _on_sigterm(self, signum, frame) -> None:
        if self.committed:
            return
        self.received.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM waits until the cleanup is done
        raise Terminated()

    def _on_sigint(self, signum, frame) -> None:
        if self.committed:
            return
        self.received.append(signum)
        raise KeyboardInterrupt()

    @contextlib.contextmanager
    def installed(self, exiting: bool = False) -> Iterator[Interruptions]:
        """The handlers in place for the block, the previous ones restored afterwards; with `exiting` (the process
        ends next, as after the CLI's main) a committed job leaves both signals ignored, so no signal between here
        and the exit turns it into 130/143."""
        self.committed = False
        self.received.clear()
        token = ACTIVE.set(self)
        try:
            try:
                previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_sigterm)}
            except ValueError:  # not the main thread
                yield self
                return
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
            try:
                yield self
            finally:
                for s, handler in previous.items():
                    if exiting and self.committed:
                        signal.signal(s, signal.SIG_IGN)
                    else:
                        signal.signal(s, signal.SIG_DFL if handler is None else handler)
                self.committed = False
        finally:
            ACTIVE.reset(token)

    def kept(self, *paths: str | Path | None, patterns: Sequence[tuple[Path, str]] = ()):
        """`files.kept_on_failure` for `paths` (None: skipped) with this instance's commit: leave them as they were
        when the block fails or is interrupted, remove those it created."""
        from road_export.graph import files

        return files.kept_on_failure([Path(p) for p in paths if p is not None], patterns=patterns,
                                     on_commit=self.commit)


@contextlib.contextmanager
def job_interruptions() -> Iterator[Interruptions]:
    """The caller's `Interruptions` (the CLI installs one for its whole command), else one installed for the
    block."""
    current = Interruptions.active()
    if current is not None:
        yield current
        return
    with Interruptions().installed() as mine:
        yield mine


@contextlib.contextmanager
def ours(steps: Steps | None, what: Callable[[], str]) -> Iterator[None]:
    """An unexpected exception of an export or translation (not bad input, not onnxruntime refusing the user's file,
    not the file system, not an interruption) is our bug: ExportBug naming what was being done and the step."""
    try:
        yield
    except (RoadError, ExportBug, OSError):
        raise
    except Exception as e:
        if is_onnxruntime_error(e):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        at = f" at step {steps.current!r}" if steps is not None else ""
        raise ExportBug(f"{what()} failed{at}: {type(e).__name__}: {first}; road-export takes this input, so this is "
                        "a bug of road-export: please report it") from e


class Steps:
    """A job's progress: `step(name)` stops the job for a dropped signal, remembers the step (ExportBug names it)
    and tells the caller's callback."""

    def __init__(self, on_step: Step | None, guard: Interruptions) -> None:
        self.on_step, self.guard, self.current = on_step, guard, "starting"

    def __call__(self, name: str) -> None:
        self.guard.check()
        self.current = name
        if self.on_step is not None:
            self.on_step(name)


