"""`road-export`: export a RoAd-adapted model to ONNX and prove parity, plus the subcommands of `COMMANDS`.

Exit codes: 0 success, 1 parity failed, 2 bad input (one line on stderr, no traceback, no output file),
3 a bug of ours, 130 interrupted (SIGINT), 143 terminated (SIGTERM); on 130 and 143 temporary files are removed
and the targets are left as they were. 141, silently, when stdout's reader went away (`road-export inspect X | head`).

Every option and path is checked before any long step (loading, tracing, verifying). Heavy libraries (torch,
transformers, onnx, onnxruntime) are imported by the runners only, so `road-export --help` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from road_export.cli_common import Parser
from road_export.errors import RoadError, Terminated

EXIT_OK, EXIT_PARITY, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 128 + signal.SIGTERM
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a tool killed by SIGPIPE
# torch's ONNX exporter writes opset 18 at least (a lower --opset would be silently raised to 18); 25 is the
# highest that the tested onnxruntime (1.32) loads.
MIN_OPSET, MAX_OPSET = 18, 25

EXAMPLES = """examples:
  road-export model.onnx                                   the embedded default model, merged, verified
  road-export export --base ./llama --adapter ./road model.onnx
  road-export --base ./llama --adapter ./road --mode rotate ./llama-road     a model directory (optimum, genai, js)
  road-export --base ./llama --adapter ./road --mode rotate --dtype float16 model.onnx
  road-export verify model.onnx --base ./llama --adapter ./road
  road-export inspect model.onnx
  road-export optimize peft_export.onnx fused.onnx --fold
  road-export adapter ./other_road --like model.onnx model.other.onnx_adapter
  road-export attach base.onnx --adapter ./road --mode merge merged.onnx
  road-export --graph builder --base ./llama --adapter ./road --mode rotate ./llama-road   onnxruntime-genai's graph
  road-export merge-checkpoint --base ./llama --adapter ./road ./llama-merged
  road-export kernels                                      build the native road kernels, print the library
  road-export kernels --genai-config ./llama-road          ... and name them in the directory's genai_config.json
  road-export help verify                                  one command's options
"""


_Parser = Parser  # argparse, but a usage error is one line and exit code 2 (road_export.cli_common)


# ---- option types: each refuses bad values while parsing, before anything is loaded ----

def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0 (e.g. 1e-4)")
    return value


def _opset(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not MIN_OPSET <= value <= MAX_OPSET:
        raise argparse.ArgumentTypeError(f"{value} is not supported; choose {MIN_OPSET} to {MAX_OPSET}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


# ---- parsers ----

def _source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", metavar="PATH|NAME",
                        help="transformers model directory, or a model name under models/ (default: the embedded "
                             "default model)")
    parser.add_argument("--adapter", metavar="[NAME=]PATH", action="append", default=[],
                        help="peft RoAd adapter directory (repeatable)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed for models/ weights built from config")
    parser.add_argument("--task", help="optimum's task names: text-generation (also causal-lm), "
                        "text-generation-with-past (decoder with KV cache), feature-extraction, text-classification "
                        "(also sequence-classification); default: inferred from the model class")


def _report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--atol", type=_tolerance,
                        help="parity tolerance, a finite number >= 0 (default: 1e-4 float32, 2e-2 float16)")
    parser.add_argument("--report", metavar="PATH", help="write the parity report as JSON")
    parser.add_argument("--no-native", action="store_true",
                        help="run road ops on their standard-op bodies, not the native kernels (road-export kernels)")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def _quiet_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def export_parser(prog: str = "road-export export") -> argparse.ArgumentParser:
    description = ("Export a RoAd-adapted model to ONNX and verify it on onnxruntime.\n"
                   "`road-export OUTPUT.onnx` is short for `road-export export OUTPUT.onnx`.")
    usage = None
    if prog == "road-export":  # the top-level help: the command table first, then export's options
        usage = ("road-export COMMAND [OPTIONS]   (road-export help COMMAND: its options)\n"
                 "       road-export [EXPORT OPTIONS] OUTPUT.onnx")
        description = _overview() + "\n\nexport: " + description
    parser = _Parser(prog=prog, usage=usage, description=description, epilog=EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", metavar="OUTPUT.onnx|OUT_DIR",
                        help="the ONNX file to write, or (a path not ending in .onnx) a model directory for "
                        "optimum, onnxruntime-genai and transformers.js: config.json, tokenizer, genai_config.json, "
                        "onnx/model.onnx; a decoder gets its KV cache (text-generation-with-past)")
    parser.add_argument("--version", action="version", version=f"road-export {_version()}",
                        help="print the version and exit")
    _source_options(parser)
    parser.add_argument("--no-adapter", action="store_true",
                        help="export the base model alone, no adapter: e.g. the base that `road-export attach` "
                        "adds adapters to (with --quantize: a quantized base for attach --mode rotate)")
    parser.add_argument("--mode", choices=("merge", "rotate"), default="merge",
                        help="merge the adapter into the weights (default), or keep road rotation nodes")
    parser.add_argument("--opset", type=_opset, help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default: the "
                        "exporter's)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="precision of the exported weights and activations (default float32; bfloat16 on the "
                        "model builder's graph only)")
    parser.add_argument("--graph", choices=("road", "builder", "auto"), default="road",
                        help="OUT_DIR's graph: road-export's own exporter (default), onnxruntime-genai's model "
                        "builder graph with RoAd attached (GroupQueryAttention, packed qkv, MatMulNBits int4: the "
                        "fastest onnxruntime LLM graph), or auto: the builder for the decoder families it supports "
                        "when onnxruntime-genai is installed")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="--graph builder: the execution provider the builder writes the graph for (default cpu)")
    parser.add_argument("--builder-option", metavar="KEY=VALUE", action="append", default=[],
                        help="--graph builder: one of the model builder's --extra_options (e.g. fuse_qkv=false)")
    parser.add_argument("--external-data", action="store_true", help="write weights to OUTPUT.onnx.data")
    parser.add_argument("--target", choices=("onnxruntime", "portable"), default=None,
                        help="rotate mode: road op bodies for onnxruntime (default) or standard ops only")
    parser.add_argument("--fixed", action="store_true",
                        help="rotate mode: coefficients as constants (fewest kernels; no .onnx_adapter swapping)")
    _quantize_option(parser)
    parser.add_argument("--no-verify", action="store_true", help="skip the parity check")
    _report_options(parser)
    return parser


def _quantize_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", choices=("int4", "int8"), default=None,
                        help="quantize the MatMul weights with onnxruntime's MatMulNBitsQuantizer (round to nearest, "
                        "asymmetric). int4: 4 bits in blocks of 16, except the first min(2, L // 4) of the L "
                        "numbered layers and the output head, kept at 8 bits (blocks of 32); int8: 8 bits, blocks of "
                        "32. road nodes and their coefficients stay float (parity then judged by cosine >= 0.98)")


def _version() -> str:
    from road_export import __version__

    return __version__


def verify_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="road-export verify", description="Parity of an existing ONNX file against its torch "
                     "source (--base and --adapter, as it was exported).")
    parser.add_argument("model", metavar="MODEL.onnx|DIR", help="the ONNX file (or model directory) to check")
    parser.add_argument("--against", metavar="REF.onnx",
                        help="compare with another ONNX file instead of the torch source (no torch needed): e.g. "
                             "the verified export before attach, optimize or quantization")
    _source_options(parser)
    _report_options(parser)
    return parser


def optimize_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="road-export optimize", description="Run the graph passes on any ONNX file: fuse "
                     "decomposed RoAd rotations into road nodes, compose chains, optionally fold them into "
                     "MatMul/Gemm weights, and lower the road op bodies for the target runtime.")
    parser.add_argument("source", metavar="IN.onnx", help="the ONNX file to read (left unchanged)")
    parser.add_argument("output", metavar="OUT.onnx", help="the ONNX file to write")
    parser.add_argument("--fold", action="store_true", help="fold rotations into constant MatMul/Gemm weights")
    parser.add_argument("--target", choices=("onnxruntime", "portable"), default="onnxruntime",
                        help="road op bodies for onnxruntime (default) or standard ops only")
    parser.add_argument("--debug", action="store_true", help="say why near-matches were not fused")
    _quantize_option(parser)
    _quiet_option(parser)
    return parser


def adapter_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="road-export adapter", description="Convert a peft RoAd adapter into an .onnx_adapter "
                     "file for a model exported with --mode rotate (onnxruntime swaps it in per Run).")
    parser.add_argument("adapter", metavar="ADAPTER_DIR", help="peft RoAd adapter directory")
    parser.add_argument("--like", metavar="MODEL.onnx|DIR", required=True,
                        help="the exported model (or model directory) it is for")
    parser.add_argument("output", metavar="OUT.onnx_adapter",
                        help="the file to write; MODEL.NAME.onnx_adapter beside MODEL.onnx is found by RoadSession")
    return parser


def merge_checkpoint_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="road-export merge-checkpoint", description="Merge a peft RoAd adapter into a "
                     "transformers safetensors checkpoint shard by shard (memory near one tensor).")
    parser.add_argument("--base", required=True, metavar="DIR", help="transformers model directory (safetensors)")
    parser.add_argument("--adapter", required=True, metavar="DIR", help="peft RoAd adapter directory")
    parser.add_argument("output", metavar="OUT_DIR", help="the directory to create (absent or empty)")
    _quiet_option(parser)
    return parser


def attach_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="road-export attach", description="Attach a peft RoAd adapter to an existing ONNX model "
                     "(no torch export): rotations folded into the weights (merge) or as road nodes (rotate).")
    parser.add_argument("base", metavar="BASE.onnx", help="the ONNX model to attach to (left unchanged)")
    parser.add_argument("--adapter", required=True, action="append", metavar="[NAME=]DIR",
                        help="peft RoAd adapter (repeatable on a model builder graph: a mixed-batch graph, input "
                        "adapter_ids)")
    parser.add_argument("--mode", choices=("merge", "rotate"), default="rotate",
                        help="fold the rotations into the weights, or keep road nodes (default)")
    parser.add_argument("--fixed", action="store_true",
                        help="model builder graph, one adapter: coefficients as constants, no OUT.NAME.onnx_adapter "
                        "(other graphs always take constants)")
    parser.add_argument("output", metavar="OUT.onnx", help="the ONNX file to write")
    _quantize_option(parser)
    _quiet_option(parser)
    return parser


def kernels_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="road-export kernels", description="Build (once per machine) the native onnxruntime "
                     "kernels for the road ops and print the library's path, for "
                     "SessionOptions.register_custom_ops_library in your own serving code. Without them "
                     "onnxruntime runs the road ops' standard-op bodies.")
    parser.add_argument("--genai-config", metavar="DIR", help="also write the library into DIR/genai_config.json "
                        "(session_options.custom_ops_library), for onnxruntime-genai on this machine")
    return parser


def inspect_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="road-export inspect", description="Show an exported model: mode, adapters, road "
                     "nodes, inputs, outputs, metadata.")
    parser.add_argument("model", metavar="MODEL.onnx|DIR", help="the ONNX file (or model directory) to describe")
    parser.add_argument("--json", action="store_true", help="print JSON")
    return parser


def help_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="road-export help", description="Show the commands, or one command's options.")
    parser.add_argument("command", nargs="?", metavar="COMMAND", help="the command to describe")
    return parser


# ---- progress and output ----

class _Progress:
    """A spinner on stderr naming the current long step; silent with --quiet or when stderr is not a tty."""

    def __init__(self, quiet: bool) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.quiet = quiet
        self.status = None
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def running(self) -> Iterator[_Progress]:
        if self.quiet or not self.console.is_terminal:
            yield self
            return
        with self.console.status("starting") as status:
            self.status = status
            yield self

    def step(self, name: str) -> None:
        _stop_if_signalled()  # a signal whose exception was dropped stops the command here
        if self.status is not None and self.console.is_terminal:
            self.status.update(f"{name} ...")

    def done(self, message: str) -> None:
        if not self.quiet:
            elapsed = time.perf_counter() - self.started
            self.console.print(f"{message} ({elapsed:.1f} s)", highlight=False, soft_wrap=True)


def _write_report(report, path: str | None) -> None:
    if path:
        from road_export.checks import os_error_line, write_text_atomic

        try:
            write_text_atomic(path, report.to_json() + "\n")
        except OSError as e:
            raise RoadError(f"--report {os_error_line(e, path)}") from e


def _print_report(report, quiet: bool) -> int:
    if not quiet:
        print(report.table(color=sys.stdout.isatty()), end="")
    return EXIT_OK if report.passed else EXIT_PARITY


def _check_report(path: str | None, *others: Path) -> None:
    """--report: a writable file path, not one of the command's other outputs."""
    if path is None:
        return
    from road_export.checks import check_output_file

    try:
        report = check_output_file(path, what="report path")
    except RoadError as e:
        raise RoadError(f"--report {e}") from None
    for other in others:
        if report.resolve() == other.resolve():
            raise RoadError(f"--report {path}: is also the command's {other.suffix or 'output'} file; choose another "
                            "path")


def _input_paths(args: argparse.Namespace, *files: str | Path | None) -> list[Path]:
    """The command's inputs: `files`, --base (a directory) and the PATH of each --adapter [NAME=]PATH."""
    paths = [Path(f) for f in files if f is not None]
    if getattr(args, "base", None) and isinstance(args.base, str):
        paths.append(Path(args.base))
    adapters = getattr(args, "adapter", None) or []
    for text in [adapters] if isinstance(adapters, str) else adapters:  # `adapter ADAPTER_DIR`: one path
        name, sep, path = text.partition("=")
        paths.append(Path(text) if not sep or Path(text).exists() else Path(path))
    return paths


def _check_outputs(args: argparse.Namespace, outputs: dict[str, Path | str | None], *inputs: str | Path | None
                   ) -> None:
    """Every output (name in the message -> path) differs from every input (`_input_paths`)."""
    from road_export.checks import check_not_input

    paths = _input_paths(args, *inputs)
    for what, output in outputs.items():
        if output is not None:
            check_not_input(output, what, paths)


def _is_onnxruntime_error(error: BaseException) -> bool:
    return type(error).__module__.startswith("onnxruntime")


@contextlib.contextmanager
def _blame(path: str | Path, doing: str) -> Iterator[None]:
    """onnxruntime failures while loading or running the user's model become one line naming the model."""
    try:
        yield
    except Exception as e:
        if not _is_onnxruntime_error(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RoadError(f"{path}: onnxruntime cannot {doing} it ({first})") from e


_WRITE_ERRORS = ("ENOSPC", "EDQUOT", "EROFS", "EFBIG", "EIO")


@contextlib.contextmanager
def _writing(output: str | Path) -> Iterator[None]:
    """A write that the file system refuses (full, read-only, too big) becomes one line naming `output`, also when
    the failing call was on a temporary file or gave no name."""
    import errno

    try:
        yield
    except OSError as e:
        if e.errno is not None and e.errno not in {getattr(errno, n) for n in _WRITE_ERRORS if hasattr(errno, n)}:
            raise
        from road_export.checks import write_failure_reason

        raise RoadError(f"{output}: cannot write ({write_failure_reason(e, output)})") from e


def _scheme(proto) -> str | None:
    """A loaded file's quantization: the scheme of its road_export.quantize record, or its first quantized op."""
    import json

    from road_export.quantize import METADATA_QUANTIZE, QUANTIZED_OPS

    record = next((p.value for p in proto.metadata_props if p.key == METADATA_QUANTIZE), None)
    if record:
        try:
            return json.loads(record)["scheme"]
        except (ValueError, KeyError, TypeError):
            return record
    return next((n.op_type for n in proto.graph.node if n.op_type in QUANTIZED_OPS), None)


def _check_atol_float(atol: float | None, path: str | Path, quantized: str | None) -> None:
    """--atol judges float files; a quantized one is judged by cosine (parity.COSINE_MIN), which --atol would not
    change: refused rather than silently ignored."""
    if atol is not None and quantized:
        from road_export.parity import COSINE_MIN

        raise RoadError(f"--atol {atol:g}: {path} is quantized ({quantized}), and a quantized file's parity is judged "
                        f"by cosine >= {COSINE_MIN:g}, not by a tolerance; drop --atol")


def _quantized(path: Path) -> str | None:
    """The written file's quantization in one phrase (inspection.quantization_summary), None for float weights."""
    from road_export.inspection import quantization_summary

    return quantization_summary(path)


def _kept_paths(*paths: str | Path | None, patterns: Sequence[tuple[Path, str]] = ()):
    """Leave `paths` (None: skipped) as they were when the command fails or is interrupted, remove those it created
    (files.kept_on_failure). Its successful end is the command's commit point: from there on SIGINT and SIGTERM
    are ignored (`_signals`), so a command whose files are in place exits with its own code. Every command that
    writes wraps its writes, and whatever may still fail (reading the written file back for the message), in
    one, and prints its result after it."""
    from road_export.files import kept_on_failure

    return kept_on_failure([Path(p) for p in paths if p is not None], patterns=patterns, on_commit=_commit)


def _kept(model: Path, *others: str | Path | None, swap_files: bool = False):
    """`_kept_paths` for a model, its `.data` file, `others` (e.g. --report) and, with `swap_files`, the
    `MODEL.*.onnx_adapter` files beside it."""
    patterns = [(model.parent, f"{model.stem}.*.onnx_adapter")] if swap_files else []
    return _kept_paths(model, model.with_name(model.name + ".data"), *others, patterns=patterns)


def _kept_dir(directory: Path, report: str | None):
    """`_kept_paths` for a model directory (absent or empty before: removed, or emptied, on failure) and
    --report."""
    return _kept_paths(directory, report)


def _swap_file_paths(args: argparse.Namespace, output: Path) -> list[Path]:
    """The `.onnx_adapter` swap file an export of one adapter in rotate mode writes beside `output` (none for
    --fixed, several adapters, or merge mode): `OUTPUT_STEM.NAME.onnx_adapter`."""
    if args.mode != "rotate" or args.fixed or len(args.adapter) > 1:
        return []
    name = "default"
    if args.adapter:
        from road_export.source import parse_adapter

        name = parse_adapter(args.adapter[0], 0).name
    return [output.with_name(f"{output.stem}.{name}.onnx_adapter")]


def _check_implicit_outputs(outputs: dict[str, Path]) -> None:
    """Files a command writes without being named (`.data`, swap files): none may be a directory or other
    non-file, which the write would replace."""
    for what, path in outputs.items():
        if path.is_dir() and not path.is_symlink():
            raise RoadError(f"{path}: is a directory, where the {what} would be written; remove or rename it")
        if path.exists() and not path.is_file():
            raise RoadError(f"{path}: exists and is not a regular file, where the {what} would be written; remove "
                            "or rename it")


# ---- runners: each checks every option and path first, then does the work ----

def run_export(args: argparse.Namespace) -> int:
    from road_export.checks import check_output_model
    from road_export.model_dir import is_dir_output

    if is_dir_output(args.output):
        return _run_export_dir(args)
    if args.graph == "builder":
        raise RoadError(f"{args.output}: --graph builder writes a model directory; give a directory, not a .onnx path")
    _check_road_graph_options(args)
    output = check_output_model(args.output)
    data = output.with_name(output.name + ".data")
    _check_no_adapter(args)
    if args.mode != "rotate" and (args.fixed or args.target):
        raise RoadError(f"--{'fixed' if args.fixed else 'target'} applies to --mode rotate only")
    if args.no_verify and (args.report or args.atol is not None or args.no_native):
        used = "--report" if args.report else "--atol" if args.atol is not None else "--no-native"
        raise RoadError(f"{used} needs the parity check; drop --no-verify or {used}")
    _check_atol_float(args.atol, output, args.quantize)
    _check_report(args.report, output, data)
    swap = {f"swap file {p.name}": p for p in _swap_file_paths(args, output)}
    _check_implicit_outputs(swap)
    _check_outputs(args, {"output": output, "external data file": data, "--report": args.report, **swap})
    if len(args.adapter) > 1 and args.mode != "rotate":
        raise RoadError(f"{len(args.adapter)} adapters cannot be merged into one set of weights; add --mode "
                        "rotate for one graph that serves them all (input adapter_ids)")
    _quiet_libraries()
    import road_export as rx
    from road_export.export.tasks import SEQ2SEQ, normalize_task
    from road_export.source import load_source

    if args.task is not None and normalize_task(args.task) in SEQ2SEQ:  # known before the model is loaded
        raise RoadError(f"{output}: task {normalize_task(args.task)} writes an encoder and decoder files; give a "
                        "directory as the output, not a .onnx path")
    from road_export.verify import verify

    progress = _Progress(args.quiet)
    with progress.running(), _writing(output), _kept(output, args.report, swap_files=True):
        progress.step("loading")
        import torch

        load_dtype = torch.float16 if args.no_verify and args.dtype == "float16" else torch.float32  # no fp32 copy
        source = load_source(args.base, args.adapter, seed=args.seed, task=args.task, reference=not args.no_verify,
                             dtype=load_dtype, defer_reference=True, no_adapter=args.no_adapter)
        float_rows: list = []
        check_float = _float_check(args, source, progress, output, float_rows)
        result = rx.export(source.model, output, mode=args.mode, task=args.task, opset=args.opset,
                           require_adapter=not args.no_adapter,
                           dtype=args.dtype, external_data=args.external_data or None,
                           target=args.target or "onnxruntime", swappable=not args.fixed, on_step=progress.step,
                           quantize=args.quantize,
                           on_weights_read=lambda: source.release_model(unverified=args.no_verify),
                           on_float_saved=check_float)
        report = None
        if not args.no_verify:
            source.release_model()  # with peft's reference: one torch model beside onnxruntime, not two
            progress.step("verifying")
            with _blame(output, "run"):
                report = verify(output, source.reference_model, task=result.task, atol=args.atol,
                                native=False if args.no_native else None, reference=source.reference_name)
            report.rows[:0] = float_rows  # with --quantize: the float model the quantizer read, by max abs
            _write_report(report, args.report)
        nodes = f", {result.road_nodes} road nodes" if args.mode == "rotate" else ""
        nodes += "".join(f", swap file {f.name}" for f in result.adapter_files)
        weights = args.dtype + (f", {_quantized(output)}" if args.quantize else "")
        adapters = f"adapters: {', '.join(source.adapters)}" if source.adapters else "the base alone, no adapter"
    progress.done(f"wrote {output} ({args.mode}, {weights}, {adapters}"
                  f"{' from the embedded config' if source.embedded else ''}{nodes})")
    if report is None:
        return EXIT_OK
    return _print_report(report, args.quiet)


def _float_check(args: argparse.Namespace, source, progress, output: Path, rows: list):
    """`on_float_saved` for an export with --quantize and the check on (else None): the float model written for the
    quantizer is verified against the reference by max abs (the tolerance of its dtype), so everything but the
    quantizer's rounding is held to the float bar; its rows go to `rows`, marked "float, before quantizing", to
    lead the report."""
    if args.no_verify or not args.quantize:
        return None
    from road_export.verify import verify

    def check(path: Path) -> None:
        progress.step("verifying the float model")
        with _blame(output, "run"):
            checked = verify(path, source.reference_model, task=args.task, native=False if args.no_native else None,
                             reference=source.reference_name)
        for row in checked.rows:
            row.case = f"float, before quantizing (max abs <= {checked.atol:g}): {row.case}"
        rows.extend(checked.rows)

    return check


def _check_no_adapter(args: argparse.Namespace) -> None:
    """--no-adapter: the base alone, so no --adapter and nothing to rotate."""
    if not args.no_adapter:
        return
    if args.adapter:
        raise RoadError("--no-adapter with --adapter: drop one (--no-adapter exports the base model alone)")
    if args.mode == "rotate":
        raise RoadError("--no-adapter with --mode rotate: the base alone has no rotations; drop --mode rotate "
                        "(attach adds road nodes to the base later: road-export attach BASE.onnx --adapter DIR ...)")


def _export_checks(args: argparse.Namespace, output: Path, *others: Path) -> None:
    _check_no_adapter(args)
    if args.mode != "rotate" and (args.fixed or args.target):
        raise RoadError(f"--{'fixed' if args.fixed else 'target'} applies to --mode rotate only")
    if args.no_verify and (args.report or args.atol is not None or args.no_native):
        used = "--report" if args.report else "--atol" if args.atol is not None else "--no-native"
        raise RoadError(f"{used} needs the parity check; drop --no-verify or {used}")
    _check_atol_float(args.atol, output, args.quantize)
    _check_report(args.report, output, *others)
    _check_outputs(args, {"output": output, "--report": args.report})
    if len(args.adapter) > 1 and args.mode != "rotate":
        raise RoadError(f"{len(args.adapter)} adapters cannot be merged into one set of weights; add --mode "
                        "rotate for one graph that serves them all (input adapter_ids)")


def _run_export_dir(args: argparse.Namespace) -> int:
    """`road-export ... OUT_DIR`: a model directory (road_export.model_dir) that optimum, onnxruntime-genai and
    transformers.js load as it is; a decoder is exported with its KV cache (text-generation-with-past)."""
    from road_export.checks import check_output_dir

    output = check_output_dir(args.output, what="model directory")
    if output.exists() and output.is_symlink():
        raise RoadError(f"{output}: is a symbolic link; give a new directory")
    from road_export import genai_builder

    blockers = [flag for flag, used in (("--opset", args.opset), ("--external-data", args.external_data),
                                        ("--target", args.target), ("--report", args.report),
                                        ("--no-native", args.no_native)) if used]
    graph, why = genai_builder.choose_graph(args.graph, args.base, directory=True, task=args.task, blockers=blockers)
    if graph == "builder":
        return _run_builder_dir(args, output, why)
    _check_road_graph_options(args, why)
    if args.graph == "auto" and not args.quiet:
        print(f"path: road-export's own exporter ({why})", flush=True)
    _export_checks(args, output)
    _quiet_libraries()
    import road_export as rx
    from road_export import model_dir
    from road_export.export.tasks import SEQ2SEQ, normalize_task
    from road_export.source import load_source
    from road_export.verify import verify

    progress = _Progress(args.quiet)
    with progress.running(), _writing(output), _kept_dir(output, args.report):
        progress.step("loading")
        source = load_source(args.base, args.adapter, seed=args.seed, task=args.task, reference=not args.no_verify,
                             no_adapter=args.no_adapter)
        task = normalize_task(args.task) if args.task else None
        if task is None:
            from road_export.export.tasks import infer_task

            task = infer_task(source.model)
        if task in ("text-generation", "text2text-generation") and not args.task:
            task += "-with-past"  # optimum's default for a decoder; what the clients generate with
        config, generation, tokenizer_dir, fields = _directory_configs(source, args.base)
        library = _kernels_library() if args.mode == "rotate" else None

        seq2seq = task in SEQ2SEQ  # onnx/encoder_model.onnx, onnx/decoder_model.onnx, ... (export/seq2seq.py)
        if seq2seq and args.quantize:
            raise RoadError(SEQ2SEQ_QUANTIZE.format(option=f"--quantize {args.quantize}", model=source.base))

        float_rows: list = []
        check_float = _float_check(args, source, progress, output, float_rows)

        def write(path: Path):
            return rx.export(source.model, path.parent if seq2seq else path, mode=args.mode, task=task,
                             opset=args.opset, dtype=args.dtype,
                             external_data=args.external_data or None, target=args.target or "onnxruntime",
                             swappable=not args.fixed, on_step=progress.step, require_adapter=not args.no_adapter,
                             quantize=args.quantize, on_float_saved=check_float)

        written = model_dir.write_model_dir(output, write, config=config, generation=generation,
                                            tokenizer_dir=tokenizer_dir, custom_ops_library=library, fields=fields)
        result = written.result
        report = None
        if not args.no_verify:
            progress.step("verifying")
            onnx_file = output / model_dir.MODEL_FILE
            with _blame(output if seq2seq else onnx_file, "run"):
                if seq2seq:
                    from road_export.verify import verify_seq2seq

                    report = verify_seq2seq(output, source.reference_model, atol=args.atol,
                                            native=False if args.no_native else None, reference=source.reference_name)
                else:
                    report = verify(onnx_file, source.reference_model, task=result.task, atol=args.atol,
                                    native=False if args.no_native else None, reference=source.reference_name)
            report.rows[:0] = float_rows
            _write_report(report, args.report)
        weights = args.dtype + (f", {_quantized(output / model_dir.MODEL_FILE)}" if args.quantize else "")
    notes = [f"{result.task}", f"{args.mode}", weights,
             f"adapters: {', '.join(source.adapters)}" if source.adapters else "no adapter"]
    if args.mode == "rotate":
        notes.append(f"{result.road_nodes} road nodes")
    if not any(Path(f).name in model_dir.TOKENIZER_FILES for f in written.files):
        notes.append("no tokenizer files in the base (add them: tokenizer.save_pretrained(OUT_DIR))")
    if model_dir.GENAI_CONFIG in written.files and library is None and args.mode == "rotate":
        notes.append("genai_config without the native kernels (add them: road-export kernels --genai-config DIR)")
    progress.done(f"wrote {output}/ ({'; '.join(notes)}): {', '.join(written.files)}")
    if report is None:
        return EXIT_OK
    return _print_report(report, args.quiet)


def _check_road_graph_options(args: argparse.Namespace, why: str = "") -> None:
    """Refuse options of the model builder path on road-export's own exporter."""
    used = ("--dtype bfloat16" if args.dtype == "bfloat16" else "--device" if args.device else
            "--builder-option" if args.builder_option else None)
    if used:
        reason = f" ({why})" if why else ""
        raise RoadError(f"{used} applies to the model builder's graph (--graph builder, a model directory), not to "
                        f"road-export's own exporter{reason}")


def _run_builder_dir(args: argparse.Namespace, output: Path, why: str) -> int:
    """`road-export --graph builder ... OUT_DIR`: onnxruntime-genai's model builder graph with RoAd attached
    (road_export.genai_builder); prints which path it took and why."""
    from road_export import genai_builder
    from road_export.source import parse_adapter

    _check_no_adapter(args)
    if args.no_verify and args.atol is not None:
        raise RoadError("--atol needs the parity check; drop --no-verify or --atol")
    _check_outputs(args, {"output": output})
    if len(args.adapter) > 1 and args.mode != "rotate":
        raise RoadError(f"{len(args.adapter)} adapters cannot be merged into one set of weights; add --mode "
                        "rotate for one graph that serves them all (input adapter_ids)")
    if args.mode != "rotate" and args.fixed:
        raise RoadError("--fixed applies to --mode rotate only")
    specs = [parse_adapter(text, i) for i, text in enumerate(args.adapter)]
    if len({s.name for s in specs}) != len(specs):
        raise RoadError(f"--adapter: names {', '.join(s.name for s in specs)} repeat; give each NAME=PATH its own")
    options = []
    for option in args.builder_option:
        if "=" not in option or option.startswith("="):
            raise RoadError(f"--builder-option {option!r}: expected KEY=VALUE (one of the builder's extra_options)")
        options.append(option)
    library = _kernels_library() if args.mode == "rotate" and specs else None
    progress = _Progress(args.quiet)
    if not args.quiet:
        print(f"path: onnxruntime-genai model builder graph ({why})", flush=True)
    with progress.running(), _writing(output), _kept_dir(output, None):
        result = genai_builder.build(args.base, [(s.name, s.path) for s in specs], output, mode=args.mode,
                                     dtype=args.dtype, quantize=args.quantize, provider=args.device or "cpu",
                                     swappable=not args.fixed, custom_ops_library=library,
                                     verify=not args.no_verify, atol=args.atol,
                                     builder_options=["--extra_options", *options] if options else [],
                                     on_step=progress.step)
    prec = genai_builder.precision(args.dtype, args.quantize)
    notes = [f"model builder graph -p {prec} -e {args.device or 'cpu'}", args.mode if specs else "no adapter"]
    if specs:
        notes.append(f"adapters: {', '.join(s.name for s in specs)}"
                     + (" (mixed batch: input adapter_ids)" if len(specs) > 1 else ""))
        notes.append(f"{result.placed} module(s) placed, {result.road_nodes} road nodes"
                     + (f", {result.fused} fused into their products for CUDA" if result.fused else ""))
    if args.mode == "rotate" and specs and library is None:
        notes.append("genai_config without the native kernels (add them: road-export kernels --genai-config DIR)")
    if not args.no_verify and not result.rows:
        notes.append("parity not checked: onnxruntime's CPU provider does not run a -e cuda or bfloat16 graph")
    progress.done(f"wrote {output}/ ({'; '.join(notes)}): {', '.join(result.files)}")
    if not result.rows:
        return EXIT_OK
    if not args.quiet:
        for row in result.rows:
            print(f"  {'ok  ' if row['ok'] else 'FAIL'} {row['case']}: max abs {row['max_abs']:.3g}, cosine "
                  f"{row['cosine']:.6f} (onnxruntime prefill vs peft)")
    return EXIT_OK if result.ok else EXIT_PARITY


def _directory_configs(source, base: str | None) -> tuple[dict, dict, Path | None, dict]:
    """(config.json, generation_config.json, tokenizer directory, genai's config values) for a model directory, from
    the loaded base: transformers' own serialisations (`to_diff_dict`, as `save_pretrained` writes them); the base
    directory's generation_config.json when it has one; the values genai_config.json needs read through the config
    object (`model_dir.config_fields`: attribute_map aliases and class defaults)."""
    import transformers

    from road_export import model_dir, zoo

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


def _kernels_library() -> str | None:
    """The native road kernels' path for genai_config.json, or None where they do not build here."""
    from road_export import native

    try:
        return str(native.library_path())
    except RoadError:
        return None


def run_verify(args: argparse.Namespace) -> int:
    from road_export.checks import check_onnx_input
    from road_export.model_dir import model_file

    from road_export.seq2seq import is_seq2seq_dir

    if is_seq2seq_dir(args.model):
        return _verify_seq2seq(args)
    args.model = str(model_file(args.model))
    proto = check_onnx_input(args.model)
    _check_report(args.report, Path(args.model))
    _check_outputs(args, {"--report": args.report}, args.model)
    if args.against is not None:
        return _verify_against(args)
    _check_atol_float(args.atol, args.model, _scheme(proto))
    _quiet_libraries()
    from road_export.export.tasks import normalize_task
    from road_export.inspection import check_fits
    from road_export.source import load_source
    from road_export.verify import verify

    if args.task is not None:
        normalize_task(args.task)
    progress = _Progress(args.quiet)
    # a file without RoAd (a base export, an onnxruntime-genai builder graph) against --base alone: no --adapter
    records = {p.key: p.value for p in proto.metadata_props}.get("road_export.adapters", "[]")
    bare = not args.adapter and args.base is not None and records in ("", "[]") and \
        not any(n.domain == "road" for n in proto.graph.node)
    with progress.running():
        progress.step("loading")
        source = load_source(args.base, args.adapter, seed=args.seed, task=args.task, no_adapter=bare)
        check_fits(proto, source.model.config, args.model,
                   hint="pass the --base (and --adapter) it was exported from")
        del proto
        progress.step("verifying")
        with _blame(args.model, "run"):
            report = verify(args.model, source.reference_model, task=args.task, atol=args.atol,
                            native=False if args.no_native else None, reference=source.reference_name)
    with _kept_paths(args.report):
        _write_report(report, args.report)
    return _print_report(report, args.quiet)


def _verify_against(args: argparse.Namespace) -> int:
    """`road-export verify MODEL --against REF.onnx`: onnxruntime against onnxruntime, torch-free."""
    from road_export.checks import check_onnx_input
    from road_export.crosscheck import verify_against_file

    given = [flag for flag, value in (("--base", args.base), ("--adapter", args.adapter), ("--task", args.task))
             if value]
    if given:
        raise RoadError(f"{', '.join(given)} with --against: the reference is the file {args.against}; "
                        "drop them, or drop --against to compare with the torch source")
    check_onnx_input(args.against)
    _check_report(args.report, Path(args.against))
    with _blame(args.model, "run"):
        report = verify_against_file(args.model, args.against, atol=args.atol,
                                     native=False if args.no_native else None)
    with _kept_paths(args.report):
        _write_report(report, args.report)
    return _print_report(report, args.quiet)


def _verify_seq2seq(args: argparse.Namespace) -> int:
    """`road-export verify DIR` for an encoder-decoder export: encoder, first decoder step, step with past."""
    if args.base is None:  # the embedded default is a decoder-only model: it cannot be this export's source
        raise RoadError(f"{args.model}: an encoder-decoder export is checked against its source; pass --base (the "
                        "base model directory or models/ name it was exported from) and --adapter, as for export")
    _check_report(args.report, Path(args.model))
    _quiet_libraries()
    from road_export.source import load_source
    from road_export.verify import verify_seq2seq

    progress = _Progress(args.quiet)
    with progress.running():
        progress.step("loading")
        source = load_source(args.base, args.adapter, seed=args.seed, task=args.task)
        progress.step("verifying")
        with _blame(args.model, "run"):
            report = verify_seq2seq(args.model, source.reference_model, atol=args.atol,
                                    native=False if args.no_native else None, reference=source.reference_name)
    with _kept_paths(args.report):
        _write_report(report, args.report)
    return _print_report(report, args.quiet)


def run_optimize(args: argparse.Namespace) -> int:
    from road_export.checks import check_onnx_input, check_output_model

    check_onnx_input(args.source)
    output = check_output_model(args.output)
    _check_outputs(args, {"OUT.onnx": output, "external data file": output.with_name(output.name + ".data")},
                   args.source)
    from road_export.passes.pipeline import optimize_file

    with _writing(output), _kept(output):
        report = optimize_file(args.source, output, fold=args.fold, target=args.target, debug=args.debug,
                               quantize=args.quantize)
        quantized = None if args.quiet else _quantized(output)
    if not args.quiet:
        print(report.text())
        print(f"wrote {output}" + (f" (quantized: {quantized})" if quantized else ""))
    return EXIT_OK


def run_adapter(args: argparse.Namespace) -> int:
    from road_export.checks import check_input_dir, check_onnx_input, check_output_file

    from road_export.model_dir import model_file

    check_input_dir(args.adapter, "adapter")
    args.like = str(model_file(args.like))
    check_onnx_input(args.like)
    output = check_output_file(args.output, suffix=".onnx_adapter")
    _check_outputs(args, {"OUT.onnx_adapter": output}, args.like)
    from road_export.swap import convert_adapter

    with _writing(output), _kept_paths(output):
        path = convert_adapter(args.adapter, args.like, output)
    print(f"wrote {path}")
    return EXIT_OK


def run_merge_checkpoint(args: argparse.Namespace) -> int:
    from road_export.checks import check_input_dir, check_output_dir

    check_input_dir(args.base, "base model")
    check_input_dir(args.adapter, "adapter")
    output = check_output_dir(args.output)
    from road_export.checkpoint import merge_checkpoint

    with _writing(output), _kept_dir(output, None):
        report = merge_checkpoint(args.base, args.adapter, args.output)
    if not args.quiet:
        print(f"wrote {report.out_dir}: {report.shards} shard(s), {len(report.merged)} tensors rotated, "
              f"{len(report.replaced)} replaced (modules_to_save)"
              + (f", {len(report.added)} added (a head the base lacks)" if report.added else ""))
    return EXIT_OK


SEQ2SEQ_QUANTIZE = ("{option}: {model} is an encoder-decoder model, and road-export quantizes decoder-only and "
                    "encoder-only models so far; drop {option} (the files are written in float)")


def run_attach(args: argparse.Namespace) -> int:
    from road_export.checks import check_input_dir, check_onnx_input, check_output_model

    if Path(args.base).is_dir():  # an encoder-decoder export: a directory of optimum's files
        return _attach_seq2seq(args)
    proto = check_onnx_input(args.base)
    from road_export.attach import adapter_specs, attach, check_no_adapter

    specs = adapter_specs(args.adapter)
    for _, path in specs:
        check_input_dir(path, "adapter")
    output = check_output_model(args.output)
    base, args.base = args.base, None  # BASE.onnx is an input file here, not a --base directory
    swap_files = {f"swap file {output.stem}.{name}.onnx_adapter": output.with_name(f"{output.stem}.{name}.onnx_adapter")
                  for name, _ in specs} if len(specs) == 1 and args.mode == "rotate" and not args.fixed else {}
    _check_outputs(args, {"OUT.onnx": output, "external data file": output.with_name(output.name + ".data"),
                          **swap_files}, base)
    args.base = base
    check_no_adapter({p.key: p.value for p in proto.metadata_props}, args.base)
    del proto

    with _writing(output), _kept(output, swap_files=True):
        report = attach(args.base, [p for _, p in specs], output, mode=args.mode, quantize=args.quantize,
                        names=[n for n, _ in specs], swappable=False if args.fixed else None)
        quantized = None if args.quiet else _quantized(output)
    if not args.quiet:
        what = f"{report.folded} folded into weights" if args.mode == "merge" else f"{report.road_nodes} road nodes"
        where = " on the model builder graph" if report.builder else ""
        extra = ""
        if report.builder and len(specs) > 1:
            extra = f"; mixed batch: input adapter_ids, rows 1..{len(specs)} = {', '.join(n for n, _ in specs)}"
        elif report.swap_values:
            extra = "; swappable: " + ", ".join(f"{output.stem}.{n}.onnx_adapter" for n in report.swap_values)
        print(f"wrote {output}: {len(report.placed)} module(s) placed{where}, {what}"
              + (f"; weights {quantized}" if quantized else "") + extra)
    return EXIT_OK


def _attach_seq2seq(args: argparse.Namespace) -> int:
    """`road-export attach BASE_DIR --adapter A OUT_DIR` for an encoder-decoder export (attach.attach_seq2seq)."""
    from road_export.attach import attach_seq2seq
    from road_export.checks import check_input_dir, check_output_dir

    if len(args.adapter) != 1:
        raise RoadError("attach takes one --adapter; several adapters in one graph need a torch export "
                        "(road-export --adapter a=... --adapter b=... --mode rotate)")
    check_input_dir(args.adapter[0], "adapter")
    if args.quantize:
        raise RoadError(SEQ2SEQ_QUANTIZE.format(option=f"--quantize {args.quantize}", model=args.base))
    output = check_output_dir(args.output, what="model directory")
    with _writing(output), _kept_dir(output, None):
        report = attach_seq2seq(args.base, args.adapter[0], output, mode=args.mode)
    if not args.quiet:
        what = f"{report.folded} folded into weights" if args.mode == "merge" else f"{report.road_nodes} road nodes"
        print(f"wrote {output}/: {len(report.placed)} module placement(s) over its files, {what}")
    return EXIT_OK


def run_kernels(args: argparse.Namespace) -> int:
    from road_export import native

    if args.genai_config is not None:
        from road_export.model_dir import GENAI_CONFIG, library_name, set_custom_ops_library

        check_dir = Path(args.genai_config)
        if not check_dir.is_dir():
            raise RoadError(f"--genai-config {check_dir}: no such model directory")
        library = native.library_path()
        with _kept_paths(check_dir / GENAI_CONFIG, check_dir / library_name(library)):
            path = set_custom_ops_library(check_dir, library)
        print(f"wrote {path} (custom_ops_library: {library})")
        return EXIT_OK
    print(native.library_path())
    return EXIT_OK


def run_inspect(args: argparse.Namespace) -> int:
    from road_export.inspection import inspect_model

    from road_export.model_dir import model_file

    info = inspect_model(model_file(args.model))
    print(info.to_json() if args.json else info.text())
    return EXIT_OK


def run_help(args: argparse.Namespace) -> int:
    if args.command is None:
        export_parser("road-export").print_help()
        return EXIT_OK
    if args.command not in COMMANDS:
        raise RoadError(f"no command {args.command!r}; the commands are {', '.join(COMMANDS)}")
    COMMANDS[args.command].parser().print_help()
    return EXIT_OK


@dataclass(frozen=True)
class Command:
    """One subcommand: its parser, its runner, and the line `road-export --help` shows for it."""

    name: str
    parser: Callable[[], argparse.ArgumentParser]
    run: Callable[[argparse.Namespace], int]
    help: str


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("export", export_parser, run_export, "export a model with its RoAd adapter(s) to ONNX and verify it "
            "(the default: road-export OUTPUT.onnx)"),
    Command("verify", verify_parser, run_verify, "parity of an ONNX file against its torch source"),
    Command("inspect", inspect_parser, run_inspect, "show an ONNX file's mode, adapters, road nodes, inputs, "
            "outputs"),
    Command("optimize", optimize_parser, run_optimize, "fuse, compose, fold and lower road rotations in any ONNX "
            "file"),
    Command("adapter", adapter_parser, run_adapter, "convert a peft RoAd adapter into an .onnx_adapter swap file"),
    Command("attach", attach_parser, run_attach, "attach a peft RoAd adapter to an existing ONNX model, no torch"),
    Command("merge-checkpoint", merge_checkpoint_parser, run_merge_checkpoint, "merge an adapter into a "
            "safetensors checkpoint, shard by shard"),
    Command("kernels", kernels_parser, run_kernels, "build the native onnxruntime kernels, print the library path"),
    Command("serve", lambda: _serving().serve_parser(), lambda args: _serving().run_serve(args), "serve a model "
            "directory's adapters over OpenAI's API on Ray Serve, batched together (road-export[serve])"),
    Command("help", help_parser, run_help, "show this overview, or one command's options (help COMMAND)"),
)}
SUBCOMMANDS = tuple(COMMANDS)


def _serving():
    """road_export.serving.cli, imported when `serve` is used (Ray is an optional extra)."""
    from road_export.serving import cli

    return cli


def _overview() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {c.name:<{width}}  {c.help}" for c in COMMANDS.values())
    return "commands:\n" + rows


def _quiet_libraries() -> None:
    """transformers draws its own progress bars and warnings; ours is the one progress display."""
    from road_export import requires_export  # noqa: F401  (one clear line without the export extra)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _command(argv: list[str]) -> tuple[Command, list[str]]:
    """The command and its arguments; anything that is not a command name is the export alias."""
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]], argv[1:]
    if argv and argv[0] in ("-h", "--help"):
        return COMMANDS["help"], []
    if argv and not argv[0].startswith("-") and not argv[0].endswith(".onnx") and len(argv) > 1:
        import difflib

        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        if close:
            raise RoadError(f"no command {argv[0]!r}; did you mean {close[0]}? (see road-export --help)")
    return COMMANDS["export"], argv


def _parse(command: Command, argv: list[str]) -> argparse.Namespace:
    parser = export_parser("road-export") if command.name == "export" and not argv else command.parser()
    return parser.parse_args(argv)


_committed = False  # the running command's files are in place (`_kept_paths`): a signal no longer stops it
# signals taken before the commit: Python drops an exception a handler raises while a weakref or __del__
# callback runs (torch's weak maps run them), so the command may run on; it is stopped at its next step
# (`_stop_if_signalled`) and at the latest at its commit, which then restores the old files instead
_received: list[int] = []


def _stop_if_signalled() -> None:
    """Raise the exception of a signal taken before the commit whose first raise was dropped."""
    if _received and not _committed:
        raise Terminated() if _received[0] == signal.SIGTERM else KeyboardInterrupt()


def _commit() -> None:
    """`kept_on_failure`'s commit: a dropped signal fails it (the old files come back), else from here on
    signals are ignored."""
    global _committed
    _stop_if_signalled()
    _committed = True


def _on_sigterm(signum, frame) -> None:
    if _committed:
        return
    _received.append(signum)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM waits until the cleanup is done
    raise Terminated()


def _on_sigint(signum, frame) -> None:
    if _committed:
        return
    _received.append(signum)
    raise KeyboardInterrupt()


@contextlib.contextmanager
def _signals(exiting: bool) -> Iterator[None]:
    """While the command runs, SIGTERM raises `Terminated` in the main thread (a second one is ignored, so cleanup
    finishes) and SIGINT KeyboardInterrupt (where Python's own handler was there: an ignored SIGINT, as in a
    shell's background job, stays ignored). Once the command has committed its files (`_commit`, at the end of
    `_kept_paths`) both are ignored: it exits with its own code, not 130/143 with the new files in place. The
    previous handlers come back afterwards; with `exiting` (main called for the process's own command line, the
    interpreter exits next) a committed command leaves both ignored, so no signal between here and the exit can
    turn it into 130/143 either. Outside the main thread, nothing changes."""
    global _committed
    _committed = False
    _received.clear()
    try:
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _on_sigterm)}
    except ValueError:  # not the main thread
        yield
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        for s, handler in previous.items():
            if exiting and _committed:
                signal.signal(s, signal.SIG_IGN)
            else:
                signal.signal(s, signal.SIG_DFL if handler is None else handler)
        _committed = False


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what is left does not fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _fail(message: str, code: int) -> int:
    print(f"road-export: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code. The one place where exceptions become exit codes and one line."""
    exiting = argv is None  # the process's own command line: the interpreter exits after main returns
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from road_export.checks import os_error_line

    with _signals(exiting):
        try:
            command, rest = _command(argv)
            try:
                args = _parse(command, rest)
            except SystemExit as e:  # --help and --version print and exit 0
                return e.code if isinstance(e.code, int) else EXIT_OK
            code = command.run(args)
            sys.stdout.flush()  # a closed pipe (`road-export inspect X | head`) fails here, not at exit
            return code
        except BrokenPipeError:  # the reader went away: exit quietly, as Unix tools do on SIGPIPE
            _silence_stdout()
            return EXIT_BROKEN_PIPE
        except RoadError as e:  # `cli_message`: the same error in the command line's terms (--task, not task=)
            return _fail(f"error: {e.cli_message or e}", EXIT_BAD_INPUT)
        except OSError as e:  # the file system refused: full, read-only, a directory where a file goes, ...
            return _fail(f"error: {os_error_line(e)}", EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            return _fail("interrupted; temporary files removed", EXIT_INTERRUPTED)
        except Terminated:
            return _fail("terminated; temporary files removed", EXIT_TERMINATED)
        except Exception as e:  # a bug of ours, not bad input: still one line, the traceback on request
            if os.environ.get("ROAD_EXPORT_DEBUG"):  # the traceback on request, the exit code unchanged
                import traceback

                traceback.print_exc(file=sys.stderr)
            if _is_onnxruntime_error(e):
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                return _fail(f"error: onnxruntime refused the input: {first}", EXIT_BAD_INPUT)
            return _fail(f"internal error: {type(e).__name__}: {e} (set ROAD_EXPORT_DEBUG=1 for the traceback)",
                         EXIT_INTERNAL)


if __name__ == "__main__":
    sys.exit(main())
