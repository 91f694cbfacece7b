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
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from road_export.app.cli_common import (EXIT_BROKEN_PIPE, EXIT_OK, EXIT_PARITY, Parser, failure, number,
                                        silence_stdout)
from road_export.core.errors import RoadError, Terminated
from road_export.graph.checks import CHOICES, MAX_OPSET, MIN_OPSET, SEED_LIMIT

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


# ---- option types: each refuses bad values while parsing, before anything is loaded ----

_tolerance = number(float, lambda v: math.isfinite(v) and v >= 0, "{text} must be a finite number >= 0 (e.g. 1e-4)")
_opset = number(int, lambda v: MIN_OPSET <= v <= MAX_OPSET,
                f"{{value}} is not supported; choose {MIN_OPSET} to {MAX_OPSET}")
_seed = number(int, lambda v: 0 <= v < SEED_LIMIT, "{value} must be >= 0")


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
    parser = Parser(prog=prog, usage=usage, description=description, epilog=EXAMPLES,
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
    parser.add_argument("--mode", choices=CHOICES["mode"], default="merge",
                        help="merge the adapter into the weights (default), or keep road rotation nodes")
    parser.add_argument("--opset", type=_opset, help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (default: the "
                        "exporter's)")
    parser.add_argument("--dtype", choices=CHOICES["dtype"], default="float32",
                        help="precision of the exported weights and activations (default float32; bfloat16 on the "
                        "model builder's graph only)")
    parser.add_argument("--graph", choices=CHOICES["graph"], default="road",
                        help="OUT_DIR's graph: road-export's own exporter (default), onnxruntime-genai's model "
                        "builder graph with RoAd attached (GroupQueryAttention, packed qkv, MatMulNBits int4: the "
                        "fastest onnxruntime LLM graph), or auto: the builder for the decoder families it supports "
                        "when onnxruntime-genai is installed")
    parser.add_argument("--device", choices=CHOICES["device"], default=None,
                        help="--graph builder: the execution provider the builder writes the graph for (default cpu)")
    parser.add_argument("--builder-option", metavar="KEY=VALUE", action="append", default=[],
                        help="--graph builder: one of the model builder's --extra_options (e.g. fuse_qkv=false)")
    parser.add_argument("--external-data", action="store_true", help="write weights to OUTPUT.onnx.data")
    parser.add_argument("--target", choices=CHOICES["target"], default=None,
                        help="rotate mode: road op bodies for onnxruntime (default) or standard ops only")
    parser.add_argument("--fixed", action="store_true",
                        help="rotate mode: coefficients as constants (fewest kernels; no .onnx_adapter swapping)")
    _quantize_option(parser)
    parser.add_argument("--no-verify", action="store_true", help="skip the parity check")
    _report_options(parser)
    return parser


def _quantize_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", choices=CHOICES["quantize"], default=None,
                        help="quantize the MatMul weights with onnxruntime's MatMulNBitsQuantizer (round to nearest, "
                        "asymmetric). int4: 4 bits in blocks of 16, except the first min(2, L // 4) of the L "
                        "numbered layers and the output head, kept at 8 bits (blocks of 32); int8: 8 bits, blocks of "
                        "32. road nodes and their coefficients stay float (parity then judged by cosine >= 0.98)")


def _version() -> str:
    from road_export.core.version import __version__

    return __version__


def verify_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="road-export verify", description="Parity of an existing ONNX file against its torch "
                     "source (--base and --adapter, as it was exported).")
    parser.add_argument("model", metavar="MODEL.onnx|DIR", help="the ONNX file (or model directory) to check")
    parser.add_argument("--against", metavar="REF.onnx",
                        help="compare with another ONNX file instead of the torch source (no torch needed): e.g. "
                             "the verified export before attach, optimize or quantization")
    _source_options(parser)
    _report_options(parser)
    return parser


def optimize_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="road-export optimize", description="Run the graph passes on any ONNX file: fuse "
                     "decomposed RoAd rotations into road nodes, compose chains, optionally fold them into "
                     "MatMul/Gemm weights, and lower the road op bodies for the target runtime.")
    parser.add_argument("source", metavar="IN.onnx", help="the ONNX file to read (left unchanged)")
    parser.add_argument("output", metavar="OUT.onnx", help="the ONNX file to write")
    parser.add_argument("--fold", action="store_true", help="fold rotations into constant MatMul/Gemm weights")
    parser.add_argument("--target", choices=CHOICES["target"], default="onnxruntime",
                        help="road op bodies for onnxruntime (default) or standard ops only")
    parser.add_argument("--debug", action="store_true", help="say why near-matches were not fused")
    _quantize_option(parser)
    _quiet_option(parser)
    return parser


def adapter_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="road-export adapter", description="Convert a peft RoAd adapter into an .onnx_adapter "
                     "file for a model exported with --mode rotate (onnxruntime swaps it in per Run).")
    parser.add_argument("adapter", metavar="ADAPTER_DIR", help="peft RoAd adapter directory")
    parser.add_argument("--like", metavar="MODEL.onnx|DIR", required=True,
                        help="the exported model (or model directory) it is for")
    parser.add_argument("output", metavar="OUT.onnx_adapter",
                        help="the file to write; MODEL.NAME.onnx_adapter beside MODEL.onnx is found by RoadSession")
    return parser


def merge_checkpoint_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="road-export merge-checkpoint", description="Merge a peft RoAd adapter into a "
                     "transformers safetensors checkpoint shard by shard (memory near one tensor).")
    parser.add_argument("--base", required=True, metavar="DIR", help="transformers model directory (safetensors)")
    parser.add_argument("--adapter", required=True, metavar="DIR", help="peft RoAd adapter directory")
    parser.add_argument("output", metavar="OUT_DIR", help="the directory to create (absent or empty)")
    _quiet_option(parser)
    return parser


def attach_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="road-export attach", description="Attach a peft RoAd adapter to an existing ONNX model "
                     "(no torch export): rotations folded into the weights (merge) or as road nodes (rotate).")
    parser.add_argument("base", metavar="BASE.onnx", help="the ONNX model to attach to (left unchanged)")
    parser.add_argument("--adapter", required=True, action="append", metavar="[NAME=]DIR",
                        help="peft RoAd adapter (repeatable on a model builder graph: a mixed-batch graph, input "
                        "adapter_ids)")
    parser.add_argument("--mode", choices=CHOICES["mode"], default="rotate",
                        help="fold the rotations into the weights, or keep road nodes (default)")
    parser.add_argument("--fixed", action="store_true",
                        help="model builder graph, one adapter: coefficients as constants, no OUT.NAME.onnx_adapter "
                        "(other graphs always take constants)")
    parser.add_argument("output", metavar="OUT.onnx", help="the ONNX file to write")
    _quantize_option(parser)
    _quiet_option(parser)
    return parser


def kernels_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="road-export kernels", description="Build (once per machine) the native onnxruntime "
                     "kernels for the road ops and print the library's path, for "
                     "SessionOptions.register_custom_ops_library in your own serving code. Without them "
                     "onnxruntime runs the road ops' standard-op bodies.")
    parser.add_argument("--genai-config", metavar="DIR", help="also write the library into DIR/genai_config.json "
                        "(session_options.custom_ops_library), for onnxruntime-genai on this machine")
    return parser


def inspect_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="road-export inspect", description="Show an exported model: mode, adapters, road "
                     "nodes, inputs, outputs, metadata.")
    parser.add_argument("model", metavar="MODEL.onnx|DIR", help="the ONNX file (or model directory) to describe")
    parser.add_argument("--json", action="store_true", help="print JSON")
    return parser


def help_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="road-export help", description="Show the commands, or one command's options.")
    parser.add_argument("command", nargs="?", metavar="COMMAND", help="the command to describe")
    return parser


# ---- progress and output ----

class _Progress:
    """A spinner on stderr naming the current long step (the job's `on_step`); silent with --quiet or when stderr is
    not a tty."""

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
        if self.status is not None and self.console.is_terminal:
            self.status.update(f"{name} ...")

    def done(self, message: str) -> None:
        if not self.quiet:
            elapsed = time.perf_counter() - self.started
            self.console.print(f"{message} ({elapsed:.1f} s)", highlight=False, soft_wrap=True)


def _print_report(report, quiet: bool) -> int:
    if not quiet:
        print(report.table(color=sys.stdout.isatty()), end="")
    return EXIT_OK if report.passed else EXIT_PARITY


# ---- runners: map the arguments to the application's options, run its job, present the result ----

def run_export(args: argparse.Namespace) -> int:
    from road_export.app import application

    job = application.ExportJob(application.ExportOptions(
        output=args.output, base=args.base, adapters=tuple(args.adapter), seed=args.seed, task=args.task,
        no_adapter=args.no_adapter, mode=args.mode, opset=args.opset, dtype=args.dtype, graph=args.graph,
        device=args.device, builder_options=tuple(args.builder_option), external_data=args.external_data,
        target=args.target, fixed=args.fixed, quantize=args.quantize, verify=not args.no_verify, atol=args.atol,
        report=args.report, native=not args.no_native))
    job.check()  # every option and path, before anything is loaded
    if job.route and not args.quiet:
        graph = "onnxruntime-genai model builder graph" if job.kind == "builder" else "road-export's own exporter"
        print(f"path: {graph} ({job.route})", flush=True)
    progress = _Progress(args.quiet)
    job.on_step = progress.step
    with progress.running():
        result = job.run()
    progress.done(result.summary)
    if result.report is not None:
        return _print_report(result.report, args.quiet)
    if not args.quiet:  # the model builder graph's prefill rows
        for row in result.rows:
            print(f"  {'ok  ' if row['ok'] else 'FAIL'} {row['case']}: max abs {row['max_abs']:.3g}, cosine "
                  f"{row['cosine']:.6f} (onnxruntime prefill vs peft)")
    return EXIT_OK if result.passed else EXIT_PARITY


def run_verify(args: argparse.Namespace) -> int:
    from road_export.app import application

    progress = _Progress(args.quiet)
    with progress.running():
        report = application.verify_model(application.VerifyOptions(
            model=args.model, against=args.against, base=args.base, adapters=tuple(args.adapter), seed=args.seed,
            task=args.task, atol=args.atol, report=args.report, native=not args.no_native), on_step=progress.step)
    return _print_report(report, args.quiet)


def run_optimize(args: argparse.Namespace) -> int:
    from road_export.app import application

    report, summary = application.optimize(application.OptimizeOptions(
        source=args.source, output=args.output, fold=args.fold, target=args.target, debug=args.debug,
        quantize=args.quantize))
    if not args.quiet:
        print(report.text())
        print(summary)
    return EXIT_OK


def run_adapter(args: argparse.Namespace) -> int:
    from road_export.app import application

    print(f"wrote {application.convert_adapter(args.adapter, args.like, args.output)}")
    return EXIT_OK


def run_merge_checkpoint(args: argparse.Namespace) -> int:
    from road_export.app import application

    report = application.merge_checkpoint(args.base, args.adapter, args.output)
    if not args.quiet:
        print(f"wrote {report.out_dir}: {report.shards} shard(s), {len(report.merged)} tensors rotated, "
              f"{len(report.replaced)} replaced (modules_to_save)"
              + (f", {len(report.added)} added (a head the base lacks)" if report.added else ""))
    return EXIT_OK


def run_attach(args: argparse.Namespace) -> int:
    from road_export.app import application

    summary = application.attach_adapters(application.AttachOptions(
        base=args.base, adapters=tuple(args.adapter), output=args.output, mode=args.mode, fixed=args.fixed,
        quantize=args.quantize))
    if not args.quiet:
        print(summary)
    return EXIT_OK


def run_kernels(args: argparse.Namespace) -> int:
    from road_export.graph import native

    if args.genai_config is not None:
        from road_export.app import application

        path, library = application.register_kernels(args.genai_config)
        print(f"wrote {path} (custom_ops_library: {library})")
        return EXIT_OK
    print(native.library_path())
    return EXIT_OK


def run_inspect(args: argparse.Namespace) -> int:
    from road_export.graph.inspection import inspect_model

    from road_export.graph.model_dir import model_file

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
    """road_export.app.serving.cli, imported when `serve` is used (Ray is an optional extra)."""
    from road_export.app.serving import cli

    return cli


def _overview() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {c.name:<{width}}  {c.help}" for c in COMMANDS.values())
    return "commands:\n" + rows


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code. The one place where exceptions become exit codes and one line
    (cli_common.failure: the error kinds of road_export.core.errors). SIGINT and SIGTERM are the command's
    `application.Interruptions`, installed for the whole command: its job commits under them, and a signal after
    the commit (while the result is printed) no longer stops it."""
    exiting = argv is None  # the process's own command line: the interpreter exits after main returns
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from road_export.app.application import Interruptions

    with Interruptions().installed(exiting):
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
            silence_stdout()
            return EXIT_BROKEN_PIPE
        except (Exception, KeyboardInterrupt, Terminated) as e:
            line, code = failure(e)
            print(f"road-export: {line}", file=sys.stderr)
            return code


if __name__ == "__main__":
    sys.exit(main())
