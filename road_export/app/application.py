"""The application layer: typed options and the jobs behind road-export's commands, for Python as for the CLI.

    from road_export.app.application import ExportOptions, export_verified

    result = export_verified(ExportOptions("model.onnx", base="./llama", adapters=("./road",), mode="rotate"))
    print(result.summary, result.report.table())

A job checks every option and path first (`check`, before anything is loaded), then runs load -> export -> verify
-> report -> commit: every file it writes (model, `.data`, swap files, report, model directory) is written under
one `files.kept_on_failure`, whose end is the commit (new files in place, old ones dropped); a failure or an
interruption before it leaves the targets as they were. Progress is a callback (`on_step(name)`); SIGINT/SIGTERM
while a job runs are `Interruptions`, owned by the job (or by the caller that installed one, as the CLI does for its
whole command, so that its printing after the commit is covered too). The CLI (road_export.app.cli) parses, maps its
arguments to these options and presents the result; the error kinds and their exit codes are road_export.core.errors'.

Messages name the command line's options (`--report`, `--atol`), the same for Python users: each option is the
`ExportOptions` field of the same name.
"""

from __future__ import annotations

import contextlib
import contextvars
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from road_export.core.errors import (
    ExportBug,
    ParityFailure,
    RoadError,
    Terminated,
    is_onnxruntime_error,
    onnxruntime_blame,
)

Step = Callable[[str], None]

SEQ2SEQ_QUANTIZE = ("{option}: {model} is an encoder-decoder model, and road-export quantizes decoder-only and "
                    "encoder-only models so far; drop {option} (the files are written in float)")


# ---- interruptions: SIGINT and SIGTERM while a job runs ----

_ACTIVE: contextvars.ContextVar[Interruptions | None] = contextvars.ContextVar("road_export_interruptions",
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
        return _ACTIVE.get()

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
        token = _ACTIVE.set(self)
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
            _ACTIVE.reset(token)

    def kept(self, *paths: str | Path | None, patterns: Sequence[tuple[Path, str]] = ()):
        """`files.kept_on_failure` for `paths` (None: skipped) with this instance's commit: leave them as they were
        when the block fails or is interrupted, remove those it created."""
        from road_export.graph import files

        return files.kept_on_failure([Path(p) for p in paths if p is not None], patterns=patterns,
                                     on_commit=self.commit)


@contextlib.contextmanager
def _interruptions() -> Iterator[Interruptions]:
    """The caller's `Interruptions` (the CLI installs one for its whole command), else one installed for the
    block."""
    current = Interruptions.active()
    if current is not None:
        yield current
        return
    with Interruptions().installed() as mine:
        yield mine


@contextlib.contextmanager
def _ours(steps: _Steps | None, what: Callable[[], str]) -> Iterator[None]:
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


class _Steps:
    """A job's progress: `step(name)` stops the job for a dropped signal, remembers the step (ExportBug names it)
    and tells the caller's callback."""

    def __init__(self, on_step: Step | None, guard: Interruptions) -> None:
        self.on_step, self.guard, self.current = on_step, guard, "starting"

    def __call__(self, name: str) -> None:
        self.guard.check()
        self.current = name
        if self.on_step is not None:
            self.on_step(name)


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


def _check_implicit_outputs(outputs: dict[str, Path]) -> None:
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
    from road_export.core import requires_export  # noqa: F401  (one clear line without the export extra)
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


def _normalized(options: Any, *names: str) -> None:
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


# ---- export ----

@dataclass(frozen=True)
class ExportOptions:
    """What `road-export [export]` takes, field by field (the CLI option of the same name, `--no-verify` being
    `verify=False`, `--no-native` `native=False`, `--adapter` `adapters`, `--builder-option` `builder_options`).

    output: a `.onnx` file, or (any other path) a model directory for optimum, onnxruntime-genai and
    transformers.js. base: a transformers directory or a models/ name (None: the embedded default model).
    adapters: peft RoAd adapter directories, `[NAME=]PATH`. mode: "merge" (into the weights) or "rotate" (road
    nodes). graph: "road" (road-export's exporter), "builder" (onnxruntime-genai's model builder graph with RoAd
    attached; a directory output) or "auto". quantize: "int4" | "int8" | None. verify: the parity check against
    peft's forward (atol: its tolerance, default per dtype; report: where its JSON goes). Everything is checked by
    `ExportJob.check` (RoadError, one line) before anything is loaded."""

    output: str | Path
    base: str | None = None
    adapters: tuple[str, ...] = ()
    seed: int = 0
    task: str | None = None
    no_adapter: bool = False
    mode: str = "merge"
    opset: int | None = None
    dtype: str = "float32"
    graph: str = "road"
    device: str | None = None
    builder_options: tuple[str, ...] = ()
    external_data: bool = False
    target: str | None = None
    fixed: bool = False
    quantize: str | None = None
    verify: bool = True
    atol: float | None = None
    report: str | None = None
    native: bool = True

    def __post_init__(self) -> None:
        _normalized(self, "base", "report")
        object.__setattr__(self, "builder_options", tuple(self.builder_options))


@dataclass
class VerifiedExport:
    """What an export job wrote and how it verified.

    output: the file or directory. kind: "file", "directory" or "builder" (a model builder graph directory). route:
    why that graph was chosen (`--graph auto|builder`), else None. summary: the one line the CLI prints ("wrote ...").
    report: the parity report (verify.ParityReport; None without verification or on the builder graph, whose prefill
    rows are `rows`: dicts with case, ok, max_abs, cosine). passed: parity passed, or was not checked."""

    output: Path
    kind: str
    summary: str
    report: Any = None
    rows: list[dict] = field(default_factory=list)
    passed: bool = True
    files: list[str] = field(default_factory=list)
    route: str | None = None
    exported: Any = None  # the exporter's ExportResult, or genai_builder.BuilderResult


class ExportJob:
    """One export: `check()` (every option and path, nothing loaded), then `run()`: load -> export -> verify ->
    report -> commit. `on_step(name)` is told each long step. Raises RoadError for bad input, OnnxRuntimeFailure
    when onnxruntime cannot run the written file, ExportBug (naming the model and the step) when export fails on a
    model road-export takes; a parity failure is `result.passed` False (`export_verified` raises ParityFailure)."""

    def __init__(self, options: ExportOptions, *, on_step: Step | None = None) -> None:
        self.options = options
        self.on_step = on_step
        self.kind: str | None = None  # "file" | "directory" | "builder", once checked
        self.route: str | None = None  # why that graph (`--graph auto|builder`)
        self.output: Path | None = None

    # -- checks --

    def check(self) -> None:
        """Every option and path, before any long step; RoadError (one line) for the first problem."""
        from road_export.graph.model_dir import is_dir_output

        o = self.options
        if is_dir_output(o.output):
            self._check_directory()
            return
        if o.graph == "builder":
            raise RoadError(f"{o.output}: --graph builder writes a model directory; give a directory, not a .onnx "
                            "path")
        from road_export.graph.checks import check_output_model

        self._check_road_graph()
        output = check_output_model(o.output)
        data = output.with_name(output.name + ".data")
        swap = {f"swap file {p.name}": p for p in self._swap_files(output)}
        self._check_common(output, {"external data file": data, **swap}, report_others=(data,), implicit=swap)
        quiet_libraries()
        from road_export.export.tasks import SEQ2SEQ, normalize_task

        if o.task is not None and normalize_task(o.task) in SEQ2SEQ:  # known before the model is loaded
            raise RoadError(f"{output}: task {normalize_task(o.task)} writes an encoder and decoder files; give a "
                            "directory as the output, not a .onnx path")
        self.kind, self.output = "file", output

    def _check_directory(self) -> None:
        from road_export.app import genai_builder
        from road_export.graph.checks import check_output_dir

        o = self.options
        output = check_output_dir(o.output, what="model directory")
        if output.exists() and output.is_symlink():
            raise RoadError(f"{output}: is a symbolic link; give a new directory")
        blockers = [flag for flag, used in (("--opset", o.opset), ("--external-data", o.external_data),
                                            ("--target", o.target), ("--report", o.report),
                                            ("--no-native", not o.native)) if used]
        graph, why = genai_builder.choose_graph(o.graph, o.base, directory=True, task=o.task, blockers=blockers)
        self.output = output
        if graph == "builder":
            self._check_common(output, {}, builder=True)
            from road_export.export.source import parse_adapter

            specs = [parse_adapter(text, i) for i, text in enumerate(o.adapters)]
            if len({s.name for s in specs}) != len(specs):
                raise RoadError(f"--adapter: names {', '.join(s.name for s in specs)} repeat; give each NAME=PATH its "
                                "own")
            for option in o.builder_options:
                if "=" not in option or option.startswith("="):
                    raise RoadError(f"--builder-option {option!r}: expected KEY=VALUE (one of the builder's "
                                    "extra_options)")
            self.kind, self.route = "builder", why
            return
        self._check_road_graph(why)
        self._check_common(output, {})
        self.kind, self.route = "directory", why if o.graph == "auto" else None
        quiet_libraries()

    def _check_road_graph(self, why: str = "") -> None:
        """Refuse options of the model builder path on road-export's own exporter."""
        o = self.options
        used = ("--dtype bfloat16" if o.dtype == "bfloat16" else "--device" if o.device else
                "--builder-option" if o.builder_options else None)
        if used:
            reason = f" ({why})" if why else ""
            raise RoadError(f"{used} applies to the model builder's graph (--graph builder, a model directory), not "
                            f"to road-export's own exporter{reason}")

    def _check_common(self, output: Path, others: dict[str, Path], *, report_others: Sequence[Path] = (),
                      implicit: dict[str, Path] | None = None, builder: bool = False) -> None:
        """The checks every export path shares: --no-adapter, rotate-only options, options that need the parity
        check, --atol on a quantized file, --report, outputs that would overwrite inputs, several adapters."""
        o = self.options
        if o.no_adapter and o.adapters:
            raise RoadError("--no-adapter with --adapter: drop one (--no-adapter exports the base model alone)")
        if o.no_adapter and o.mode == "rotate":
            raise RoadError("--no-adapter with --mode rotate: the base alone has no rotations; drop --mode rotate "
                            "(attach adds road nodes to the base later: road-export attach BASE.onnx --adapter DIR "
                            "...)")
        if o.mode != "rotate" and (o.fixed or o.target):
            raise RoadError(f"--{'fixed' if o.fixed else 'target'} applies to --mode rotate only")
        if not o.verify and (o.report or o.atol is not None or not o.native):
            used = "--report" if o.report else "--atol" if o.atol is not None else "--no-native"
            raise RoadError(f"{used} needs the parity check; drop --no-verify or {used}")
        if not builder:
            check_atol_float(o.atol, output, o.quantize)
        check_report(o.report, output, *report_others)
        if implicit:
            _check_implicit_outputs(implicit)
        check_outputs({"output": output, **{k: v for k, v in others.items() if k not in (implicit or {})},
                       "--report": o.report, **(implicit or {})},
                      input_paths(base=o.base, adapters=o.adapters))
        if len(o.adapters) > 1 and o.mode != "rotate":
            raise RoadError(f"{len(o.adapters)} adapters cannot be merged into one set of weights; add --mode "
                            "rotate for one graph that serves them all (input adapter_ids)")

    def _swap_files(self, output: Path) -> list[Path]:
        """The `.onnx_adapter` swap file an export of one adapter in rotate mode writes beside `output` (none for
        --fixed, several adapters, or merge mode): `OUTPUT_STEM.NAME.onnx_adapter`."""
        o = self.options
        if o.mode != "rotate" or o.fixed or len(o.adapters) > 1:
            return []
        name = "default"
        if o.adapters:
            from road_export.export.source import parse_adapter

            name = parse_adapter(o.adapters[0], 0).name
        return [output.with_name(f"{output.stem}.{name}.onnx_adapter")]

    # -- run --

    def run(self) -> VerifiedExport:
        """Load, export, verify, write the report, commit; `check()` first when not done yet."""
        if self.kind is None:
            self.check()
        with _interruptions() as guard:
            steps = _Steps(self.on_step, guard)
            if self.kind == "builder":
                return self._run_builder(guard, steps)
            return self._run_road(guard, steps)

    def _run_road(self, guard: Interruptions, steps: _Steps) -> VerifiedExport:
        import road_export as rx
        from road_export.export.source import load_source

        o, output = self.options, self.output
        assert output is not None
        directory = self.kind == "directory"
        kept = guard.kept(output, o.report) if directory else guard.kept(
            output, output.with_name(output.name + ".data"), o.report,
            patterns=[(output.parent, f"{output.stem}.*.onnx_adapter")])
        source, library = None, None
        with writing(output), kept:
            steps("loading")
            import torch

            # float16 without verification: no float32 copy (a directory keeps its float32 load for its configs)
            load_dtype = torch.float16 if not directory and not o.verify and o.dtype == "float16" else torch.float32
            source = load_source(o.base, list(o.adapters), seed=o.seed, task=o.task, reference=o.verify,
                                 dtype=load_dtype, defer_reference=not directory, no_adapter=o.no_adapter)
            float_rows: list = []
            check_float = self._float_check(source, steps, output, float_rows)
            options: dict[str, Any] = dict(mode=o.mode, opset=o.opset, dtype=o.dtype, quantize=o.quantize,
                                           external_data=o.external_data or None, target=o.target or "onnxruntime",
                                           swappable=not o.fixed, on_step=steps, require_adapter=not o.no_adapter,
                                           on_float_saved=check_float)
            with _ours(steps, lambda: f"exporting {_model_name(source, o)}"):
                if directory:
                    written, seq2seq, library = self._write_directory(source, output, options)
                    exported, files, onnx_file = written.result, written.files, output / _model_file()
                else:
                    # road_export.export is the subpackage, callable as the export function (mypy sees a module)
                    exported = rx.export(source.model, output, task=o.task,  # type: ignore[operator]
                                         on_weights_read=lambda: source.release_model(unverified=not o.verify),
                                         **options)
                    seq2seq, files, onnx_file = False, [], output
            report = None
            if o.verify:
                if not directory:
                    source.release_model()  # with peft's reference: one torch model beside onnxruntime, not two
                report = parity(output if seq2seq else onnx_file, source, steps, task=exported.task, atol=o.atol,
                                native=o.native, seq2seq=seq2seq, blame=output if seq2seq else onnx_file)
                report.rows[:0] = float_rows  # with --quantize: the float model the quantizer read, by max abs
                write_report(report, o.report)
            weights = o.dtype + (f", {quantized(onnx_file)}" if o.quantize else "")
        if directory:
            summary = self._directory_summary(source, exported, weights, files, library)
        else:
            nodes = f", {exported.road_nodes} road nodes" if o.mode == "rotate" else ""
            nodes += "".join(f", swap file {f.name}" for f in exported.adapter_files)
            adapters = f"adapters: {', '.join(source.adapters)}" if source.adapters else "the base alone, no adapter"
            summary = (f"wrote {output} ({o.mode}, {weights}, {adapters}"
                       f"{' from the embedded config' if source.embedded else ''}{nodes})")
        return VerifiedExport(output, self.kind or "file", summary, report=report,
                            passed=report is None or report.passed, files=list(files), route=self.route,
                            exported=exported)

    def _write_directory(self, source, output: Path, options: dict[str, Any]):
        """The model directory (model_dir.write_model_dir) around rx.export: configs, tokenizer, genai_config."""
        import road_export as rx
        from road_export.graph import model_dir
        from road_export.export.tasks import SEQ2SEQ, infer_task, normalize_task

        o = self.options
        task = normalize_task(o.task) if o.task else infer_task(source.model)
        if task in ("text-generation", "text2text-generation") and not o.task:
            task += "-with-past"  # optimum's default for a decoder; what the clients generate with
        config, generation, tokenizer_dir, fields = _directory_configs(source, o.base)
        library = kernels_library() if o.mode == "rotate" else None
        seq2seq = task in SEQ2SEQ  # onnx/encoder_model.onnx, onnx/decoder_model.onnx, ... (export/seq2seq.py)
        if seq2seq and o.quantize:
            raise RoadError(SEQ2SEQ_QUANTIZE.format(option=f"--quantize {o.quantize}", model=source.base))
        written = model_dir.write_model_dir(
            output, lambda path: rx.export(  # type: ignore[operator]
                source.model, path.parent if seq2seq else path, task=task, **options),  # the callable subpackage
            config=config, generation=generation, tokenizer_dir=tokenizer_dir, custom_ops_library=library,
            fields=fields)
        return written, seq2seq, library

    def _directory_summary(self, source, exported, weights: str, files: list[str], library: str | None) -> str:
        from road_export.graph import model_dir

        o = self.options
        notes = [f"{exported.task}", f"{o.mode}", weights,
                 f"adapters: {', '.join(source.adapters)}" if source.adapters else "no adapter"]
        if o.mode == "rotate":
            notes.append(f"{exported.road_nodes} road nodes")
        if not any(Path(f).name in model_dir.TOKENIZER_FILES for f in files):
            notes.append("no tokenizer files in the base (add them: tokenizer.save_pretrained(OUT_DIR))")
        if model_dir.GENAI_CONFIG in files and library is None and o.mode == "rotate":
            notes.append("genai_config without the native kernels (add them: road-export kernels --genai-config DIR)")
        return f"wrote {self.output}/ ({'; '.join(notes)}): {', '.join(files)}"

    def _float_check(self, source, steps: _Steps, output: Path, rows: list):
        """`on_float_saved` for an export with --quantize and the check on (else None): the float model written for
        the quantizer is verified against the reference by max abs (the tolerance of its dtype), so everything but
        the quantizer's rounding is held to the float bar; its rows go to `rows`, marked "float, before
        quantizing", to lead the report."""
        o = self.options
        if not o.verify or not o.quantize:
            return None

        def check(path: Path) -> None:
            steps("verifying the float model")
            with onnxruntime_blame(output, "run"):
                from road_export.app import verify as checker

                checked = checker.verify(path, source.reference_model, task=o.task,
                                         native=None if o.native else False, reference=source.reference_name)
            for row in checked.rows:
                row.case = f"float, before quantizing (max abs <= {checked.atol:g}): {row.case}"
            rows.extend(checked.rows)

        return check

    def _run_builder(self, guard: Interruptions, steps: _Steps) -> VerifiedExport:
        """onnxruntime-genai's model builder graph with RoAd attached (road_export.app.genai_builder)."""
        from road_export.app import genai_builder
        from road_export.export.source import parse_adapter

        o, output = self.options, self.output
        assert output is not None
        specs = [parse_adapter(text, i) for i, text in enumerate(o.adapters)]
        library = kernels_library() if o.mode == "rotate" and specs else None
        with writing(output), guard.kept(output), _ours(steps, lambda: "attaching RoAd to the model builder "
                                                                            f"graph of {o.base}"):
            built = genai_builder.build(str(o.base), [(s.name, s.path) for s in specs], output, mode=o.mode,
                                        dtype=o.dtype, quantize=o.quantize, provider=o.device or "cpu",
                                        swappable=not o.fixed, custom_ops_library=library, verify=o.verify,
                                        atol=o.atol, on_step=steps,
                                        builder_options=["--extra_options", *o.builder_options]
                                        if o.builder_options else [])
        prec = genai_builder.precision(o.dtype, o.quantize)
        notes = [f"model builder graph -p {prec} -e {o.device or 'cpu'}", o.mode if specs else "no adapter"]
        if specs:
            notes.append(f"adapters: {', '.join(s.name for s in specs)}"
                         + (" (mixed batch: input adapter_ids)" if len(specs) > 1 else ""))
            notes.append(f"{built.placed} module(s) placed, {built.road_nodes} road nodes"
                         + (f", {built.fused} fused into their products for CUDA" if built.fused else ""))
        if o.mode == "rotate" and specs and library is None:
            notes.append("genai_config without the native kernels (add them: road-export kernels --genai-config DIR)")
        if o.verify and not built.rows:
            notes.append("parity not checked: onnxruntime's CPU provider does not run a -e cuda or bfloat16 graph")
        return VerifiedExport(output, "builder", f"wrote {output}/ ({'; '.join(notes)}): {', '.join(built.files)}",
                            rows=list(built.rows), passed=not built.rows or built.ok, files=list(built.files),
                            route=self.route, exported=built)


def _model_file() -> str:
    from road_export.graph.model_dir import MODEL_FILE

    return MODEL_FILE


def _model_name(source, options: ExportOptions) -> str:
    """The model class (once loaded) and where it came from, for ExportBug."""
    where = options.base or "the embedded default model"
    if source is None:
        return where
    inner = source.model.get_base_model() if hasattr(source.model, "get_base_model") else source.model
    return f"{type(inner).__name__} from {where}"


def _directory_configs(source, base: str | None) -> tuple[dict, dict, Path | None, dict]:
    """(config.json, generation_config.json, tokenizer directory, genai's config values) for a model directory, from
    the loaded base: transformers' own serialisations (`to_diff_dict`, as `save_pretrained` writes them); the base
    directory's generation_config.json when it has one; the values genai_config.json needs read through the config
    object (`model_dir.config_fields`: attribute_map aliases and class defaults)."""
    import transformers

    from road_export.graph import model_dir
    from road_export.export import zoo

    inner = source.model.get_base_model() if hasattr(source.model, "get_base_model") else source.model
    config = inner.config
    path = zoo.resolve(base or zoo.DEFAULT_MODEL)
    if (path / "generation_config.json").is_file():
        generation = transformers.GenerationConfig.from_pretrained(path)
    else:
        generation = transformers.GenerationConfig.from_model_config(config)
    config_dict = config.to_diff_dict()
    config_dict.setdefault("model_type", config.model_type)
    tokenizer_dir = None if zoo.is_named(base or zoo.DEFAULT_MODEL) else path
    fields = model_dir.config_fields(lambda key: getattr(config, key, None))
    return config_dict, generation.to_diff_dict(), tokenizer_dir, fields


def kernels_library() -> str | None:
    """The native road kernels' path for genai_config.json, or None where they do not build here."""
    from road_export.graph import native

    try:
        return str(native.library_path())
    except RoadError:
        return None


def export_verified(options: ExportOptions, *, on_step: Step | None = None, strict: bool = True) -> VerifiedExport:
    """Export a RoAd-adapted model as `road-export export` does: check every option and path, load the base and its
    adapters, export, verify on onnxruntime against peft's forward, write the report, commit the files atomically.

    options: ExportOptions (the CLI's options by name). on_step: told the name of each long step ("loading",
    "verifying", ...). strict: raise ParityFailure when parity fails (the files stay written, as the CLI leaves
    them; `error.report` says where), else return the result with `passed` False.
    Returns VerifiedExport (`summary` the line the CLI prints, `report` the parity report). Raises RoadError for bad
    input (nothing written), OnnxRuntimeFailure when onnxruntime cannot run the written file, ExportBug (a bug of
    ours: the model, the part traced or the step) when export fails on a model road-export takes;
    KeyboardInterrupt/Terminated on SIGINT/SIGTERM before the commit (the targets left as they were)."""
    result = ExportJob(options, on_step=on_step).run()
    if strict and not result.passed:
        raise ParityFailure(result.output, result.report if result.report is not None else result.rows)
    return result


# ---- verify ----

@dataclass(frozen=True)
class VerifyOptions:
    """What `road-export verify` takes: `model` (an ONNX file or model directory) against its torch source (`base`,
    `adapters`, `seed`, `task`, as it was exported) or, with `against`, another ONNX file (torch-free). atol:
    tolerance (default per dtype); report: where the JSON report goes; native: run road ops on the native kernels
    where they build."""

    model: str | Path
    against: str | None = None
    base: str | None = None
    adapters: tuple[str, ...] = ()
    seed: int = 0
    task: str | None = None
    atol: float | None = None
    report: str | None = None
    native: bool = True

    def __post_init__(self) -> None:
        _normalized(self, "base", "report", "against")


def verify_model(options: VerifyOptions, *, on_step: Step | None = None):
    """Parity of an existing export (`road-export verify`): checks, load, verify, the report written atomically.
    Returns the parity report (`passed`, `table()`, `to_json()`). Raises RoadError for bad input,
    OnnxRuntimeFailure when onnxruntime cannot run the file."""
    from road_export.graph.checks import check_onnx_input
    from road_export.graph.model_dir import model_file
    from road_export.runtime.seq2seq import is_seq2seq_dir

    o = options
    inputs = input_paths(base=o.base, adapters=o.adapters)
    if is_seq2seq_dir(o.model):
        if o.base is None:  # the embedded default is a decoder-only model: it cannot be this export's source
            raise RoadError(f"{o.model}: an encoder-decoder export is checked against its source; pass --base (the "
                            "base model directory or models/ name it was exported from) and --adapter, as for export")
        check_report(o.report, Path(o.model))
        target, proto, seq2seq = Path(o.model), None, True
    else:
        target = model_file(o.model)
        proto = check_onnx_input(target)
        check_report(o.report, target)
        check_outputs({"--report": o.report}, [target, *inputs])
        seq2seq = False
        if o.against is not None:
            return _verify_against(o, target, o.against, on_step)
        from road_export.graph.inspection import read_facts

        check_atol_float(o.atol, target, read_facts(proto).quantization)
    quiet_libraries()
    from road_export.export.source import load_source

    bare = False
    if proto is not None:
        from road_export.export.tasks import normalize_task

        if o.task is not None:
            normalize_task(o.task)
        # a file without RoAd (a base export, an onnxruntime-genai builder graph) against --base alone: no --adapter
        records = {p.key: p.value for p in proto.metadata_props}.get("road_export.adapters", "[]")
        bare = not o.adapters and o.base is not None and records in ("", "[]") and \
            not any(n.domain == "road" for n in proto.graph.node)
    with _interruptions() as guard:
        steps = _Steps(on_step, guard)
        steps("loading")
        source = load_source(o.base, list(o.adapters), seed=o.seed, task=o.task, no_adapter=bare)
        if proto is not None:
            from road_export.graph.inspection import check_fits

            check_fits(proto, source.model.config, str(target), hint="pass the --base (and --adapter) it was exported "
                                                                       "from")
            del proto
        report = parity(target, source, steps, task=o.task, atol=o.atol, native=o.native, seq2seq=seq2seq)
        with guard.kept(o.report):
            write_report(report, o.report)
    return report


def _verify_against(o: VerifyOptions, target: Path, against: str, on_step: Step | None):
    """`verify MODEL --against REF.onnx`: onnxruntime against onnxruntime, torch-free."""
    from road_export.graph.checks import check_onnx_input
    from road_export.app.crosscheck import verify_against_file

    given = [flag for flag, value in (("--base", o.base), ("--adapter", o.adapters), ("--task", o.task)) if value]
    if given:
        raise RoadError(f"{', '.join(given)} with --against: the reference is the file {against}; "
                        "drop them, or drop --against to compare with the torch source")
    check_onnx_input(against)
    check_report(o.report, Path(against))
    with _interruptions() as guard:
        _Steps(on_step, guard)("verifying")
        with onnxruntime_blame(target, "run"):
            report = verify_against_file(target, against, atol=o.atol, native=None if o.native else False)
        with guard.kept(o.report):
            write_report(report, o.report)
    return report


# ---- attach, optimize, adapter, merge-checkpoint ----

@dataclass(frozen=True)
class AttachOptions:
    """What `road-export attach` takes: `base` (an ONNX file, or an encoder-decoder export's directory), `adapters`
    (peft RoAd adapter directories, `[NAME=]DIR`; several only on a model builder graph), `output`, `mode` ("merge":
    folded into the weights, "rotate": road nodes), `fixed` (coefficients as constants on a builder graph),
    `quantize` ("int4" | "int8" | None)."""

    base: str | Path
    adapters: tuple[str, ...]
    output: str | Path
    mode: str = "rotate"
    fixed: bool = False
    quantize: str | None = None

    def __post_init__(self) -> None:
        _normalized(self)


def attach_adapters(options: AttachOptions) -> str:
    """Attach peft RoAd adapters to an existing ONNX model, no torch (attach.attach, attach.attach_seq2seq); the
    files are committed atomically. Returns the line the CLI prints ("wrote ..."). Raises RoadError for bad input,
    ExportBug when the translation fails on a graph it takes."""
    from road_export.graph.checks import check_input_dir, check_onnx_input, check_output_model

    o = options
    if Path(o.base).is_dir():  # an encoder-decoder export: a directory of optimum's files
        return _attach_seq2seq(o)
    proto = check_onnx_input(o.base)
    from road_export.passes.attach import adapter_specs, attach, check_no_adapter

    specs = adapter_specs(o.adapters)
    for _, path in specs:
        check_input_dir(path, "adapter")
    output = check_output_model(o.output)
    swap_files = {f"swap file {output.stem}.{name}.onnx_adapter": output.with_name(f"{output.stem}.{name}.onnx_adapter")
                  for name, _ in specs} if len(specs) == 1 and o.mode == "rotate" and not o.fixed else {}
    check_outputs({"OUT.onnx": output, "external data file": output.with_name(output.name + ".data"), **swap_files},
                  input_paths(o.base, adapters=o.adapters))
    check_no_adapter({p.key: p.value for p in proto.metadata_props}, o.base)
    del proto
    swaps = [(output.parent, f"{output.stem}.*.onnx_adapter")]
    with _interruptions() as guard, writing(output), guard.kept(output, output.with_name(output.name + ".data"),
                                                                patterns=swaps):
        with _ours(None, lambda: f"attaching {', '.join(map(str, o.adapters))} to {o.base}"):
            report = attach(o.base, [p for _, p in specs], output, mode=o.mode, quantize=o.quantize,
                            names=[n for n, _ in specs], swappable=False if o.fixed else None)
        weights = quantized(output)
    what = f"{report.folded} folded into weights" if o.mode == "merge" else f"{report.road_nodes} road nodes"
    where = " on the model builder graph" if report.builder else ""
    extra = ""
    if report.builder and len(specs) > 1:
        extra = f"; mixed batch: input adapter_ids, rows 1..{len(specs)} = {', '.join(n for n, _ in specs)}"
    elif report.swap_values:
        extra = "; swappable: " + ", ".join(f"{output.stem}.{n}.onnx_adapter" for n in report.swap_values)
    return (f"wrote {output}: {len(report.placed)} module(s) placed{where}, {what}"
            + (f"; weights {weights}" if weights else "") + extra)


def _attach_seq2seq(o: AttachOptions) -> str:
    """`attach BASE_DIR --adapter A OUT_DIR` for an encoder-decoder export (attach.attach_seq2seq)."""
    from road_export.passes.attach import attach_seq2seq
    from road_export.graph.checks import check_input_dir, check_output_dir

    if len(o.adapters) != 1:
        raise RoadError("attach takes one --adapter; several adapters in one graph need a torch export "
                        "(road-export --adapter a=... --adapter b=... --mode rotate)")
    check_input_dir(o.adapters[0], "adapter")
    if o.quantize:
        raise RoadError(SEQ2SEQ_QUANTIZE.format(option=f"--quantize {o.quantize}", model=o.base))
    output = check_output_dir(o.output, what="model directory")
    with _interruptions() as guard, writing(output), guard.kept(output):
        with _ours(None, lambda: f"attaching {o.adapters[0]} to {o.base}"):
            report = attach_seq2seq(o.base, o.adapters[0], output, mode=o.mode)
    what = f"{report.folded} folded into weights" if o.mode == "merge" else f"{report.road_nodes} road nodes"
    return f"wrote {output}/: {len(report.placed)} module placement(s) over its files, {what}"


@dataclass(frozen=True)
class OptimizeOptions:
    """What `road-export optimize` takes: `source` and `output` ONNX files, `fold` (rotations into weights),
    `target` ("onnxruntime" | "portable"), `debug` (why near-matches were not fused), `quantize`."""

    source: str | Path
    output: str | Path
    fold: bool = False
    target: str = "onnxruntime"
    debug: bool = False
    quantize: str | None = None


def optimize(options: OptimizeOptions) -> tuple[Any, str]:
    """The graph passes on any ONNX file (passes.pipeline.optimize_file), committed atomically. Returns (the pass
    report, whose `text()` lists what each pass did; the line "wrote ..."). Raises RoadError for bad input."""
    from road_export.graph.checks import check_onnx_input, check_output_model

    o = options
    check_onnx_input(o.source)
    output = check_output_model(o.output)
    data = output.with_name(output.name + ".data")
    check_outputs({"OUT.onnx": output, "external data file": data}, input_paths(o.source))
    from road_export.passes.pipeline import optimize_file

    with _interruptions() as guard, writing(output), guard.kept(output, data):
        report = optimize_file(o.source, output, fold=o.fold, target=o.target, debug=o.debug, quantize=o.quantize)
        weights = quantized(output)
    return report, f"wrote {output}" + (f" (quantized: {weights})" if weights else "")


def convert_adapter(adapter: str | Path, like: str | Path, output: str | Path) -> Path:
    """`road-export adapter`: a peft RoAd adapter as an .onnx_adapter swap file for the model (or model directory)
    `like` (swap.convert_adapter), committed atomically. Returns the file written. Raises RoadError for bad input."""
    from road_export.graph.checks import check_input_dir, check_onnx_input, check_output_file
    from road_export.graph.model_dir import model_file

    check_input_dir(adapter, "adapter")
    like = model_file(like)
    check_onnx_input(like)
    path = check_output_file(output, suffix=".onnx_adapter")
    check_outputs({"OUT.onnx_adapter": path}, input_paths(like, adapters=[str(adapter)]))
    from road_export.graph import swap

    with _interruptions() as guard, writing(path), guard.kept(path):
        return swap.convert_adapter(adapter, like, path)


def merge_checkpoint(base: str | Path, adapter: str | Path, output: str | Path):
    """`road-export merge-checkpoint`: the adapter merged into the safetensors checkpoint shard by shard
    (checkpoint.merge_checkpoint) into a new directory, committed atomically. Returns its report (shards, merged,
    replaced, added). Raises RoadError for bad input."""
    from road_export.graph.checks import check_input_dir, check_output_dir

    check_input_dir(base, "base model")
    check_input_dir(adapter, "adapter")
    directory = check_output_dir(output)
    from road_export.export import checkpoint

    with _interruptions() as guard, writing(directory), guard.kept(directory):
        return checkpoint.merge_checkpoint(base, adapter, output)


def register_kernels(directory: str | Path) -> tuple[Path, Path]:
    """`road-export kernels --genai-config DIR`: build the native road kernels (once per machine) and name them in
    DIR/genai_config.json (model_dir.set_custom_ops_library), committed atomically. Returns (the config written,
    the library). Raises RoadError when DIR is not a directory or the kernels do not build here."""
    from road_export.graph import native
    from road_export.graph.model_dir import GENAI_CONFIG, library_name, set_custom_ops_library

    directory = Path(directory)
    if not directory.is_dir():
        raise RoadError(f"--genai-config {directory}: no such model directory")
    library = native.library_path()
    with _interruptions() as guard, guard.kept(directory / GENAI_CONFIG, directory / library_name(library)):
        return set_custom_ops_library(directory, library), library
