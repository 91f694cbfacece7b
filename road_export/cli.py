"""`road-export`: export a RoAd-adapted model to ONNX and prove parity; `verify` and `inspect` subcommands.

Exit codes: 0 success, 1 parity failed, 2 bad input (one line on stderr, no traceback, no output file).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from road_export.errors import RoadError

SUBCOMMANDS = ("verify", "inspect", "optimize", "adapter", "merge-checkpoint", "attach", "kernels")
EXIT_OK, EXIT_PARITY, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3

EXAMPLES = """examples:
  road-export model.onnx                                   the embedded default model, merged, verified
  road-export --base ./llama --adapter ./road model.onnx
  road-export --base ./llama --adapter ./road --mode rotate --dtype float16 model.onnx
  road-export verify model.onnx --base ./llama --adapter ./road
  road-export inspect model.onnx
  road-export optimize peft_export.onnx fused.onnx --fold
  road-export adapter ./other_road --like model.onnx model.other.onnx_adapter
  road-export attach base.onnx --adapter ./road --mode merge merged.onnx
  road-export merge-checkpoint --base ./llama --adapter ./road ./llama-merged
  road-export kernels                                      build the native road kernels, print the library
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise RoadError(f"{message} (see {self.prog} --help)")


def _source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", metavar="PATH|NAME",
                        help="transformers model directory, or a model name under models/ (default: the embedded "
                             "default model)")
    parser.add_argument("--adapter", metavar="[NAME=]PATH", action="append", default=[],
                        help="peft RoAd adapter directory (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed for models/ weights built from config")
    parser.add_argument("--task", help="text-generation, text-generation-with-past (decoder with KV cache), "
                        "feature-extraction or text-classification (default: the adapter's task_type, else the "
                        "checkpoint's class); causal-lm and sequence-classification are accepted as synonyms")


def _report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--atol", type=float, help="parity tolerance (default: 1e-4 float32, 2e-2 float16)")
    parser.add_argument("--report", metavar="PATH", help="write the parity report as JSON")
    parser.add_argument("--no-native", action="store_true",
                        help="run road ops on their standard-op bodies, not the native kernels (road-export kernels)")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")


def export_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="road-export", description="Export a RoAd-adapted model to ONNX and verify it on "
                     "onnxruntime. Subcommands: road-export verify ..., road-export inspect ...",
                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", metavar="OUTPUT.onnx", help="the ONNX file to write")
    parser.add_argument("--version", action="version", version=f"road-export {_version()}")
    _source_options(parser)
    parser.add_argument("--mode", choices=("merge", "rotate"), default="merge",
                        help="merge the adapter into the weights (default), or keep road rotation nodes")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--external-data", action="store_true", help="write weights to OUTPUT.onnx.data")
    parser.add_argument("--target", choices=("onnxruntime", "portable"), default="onnxruntime",
                        help="rotate mode: road op bodies for onnxruntime (default) or standard ops only")
    parser.add_argument("--fixed", action="store_true",
                        help="rotate mode: coefficients as constants (fewest kernels; no .onnx_adapter swapping)")
    parser.add_argument("--no-verify", action="store_true", help="skip the parity check")
    _report_options(parser)
    return parser


def _version() -> str:
    from road_export import __version__

    return __version__


def verify_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="road-export verify", description="Parity of an existing ONNX file against its torch "
                     "source (--base and --adapter, as it was exported).")
    parser.add_argument("model", metavar="MODEL.onnx")
    _source_options(parser)
    _report_options(parser)
    return parser


def optimize_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="road-export optimize", description="Run the graph passes on any ONNX file: fuse "
                     "decomposed RoAd rotations into road nodes, compose chains, optionally fold them into "
                     "MatMul/Gemm weights, and lower the road op bodies for the target runtime.")
    parser.add_argument("source", metavar="IN.onnx")
    parser.add_argument("output", metavar="OUT.onnx")
    parser.add_argument("--fold", action="store_true", help="fold rotations into constant MatMul/Gemm weights")
    parser.add_argument("--target", choices=("onnxruntime", "portable"), default="onnxruntime")
    parser.add_argument("--debug", action="store_true", help="say why near-matches were not fused")
    parser.add_argument("--quiet", action="store_true")
    return parser


def adapter_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="road-export adapter", description="Convert a peft RoAd adapter into an .onnx_adapter "
                     "file for a model exported with --mode rotate (onnxruntime swaps it in per Run).")
    parser.add_argument("adapter", metavar="ADAPTER_DIR")
    parser.add_argument("--like", metavar="MODEL.onnx", required=True, help="the exported model it is for")
    parser.add_argument("output", metavar="OUT.onnx_adapter")
    return parser


def merge_checkpoint_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="road-export merge-checkpoint", description="Merge a peft RoAd adapter into a "
                     "transformers safetensors checkpoint shard by shard (memory near one tensor).")
    parser.add_argument("--base", required=True, metavar="DIR", help="transformers model directory (safetensors)")
    parser.add_argument("--adapter", required=True, metavar="DIR", help="peft RoAd adapter directory")
    parser.add_argument("output", metavar="OUT_DIR")
    parser.add_argument("--quiet", action="store_true")
    return parser


def attach_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="road-export attach", description="Attach a peft RoAd adapter to an existing ONNX model "
                     "(no torch export): rotations folded into the weights (merge) or as road nodes (rotate).")
    parser.add_argument("base", metavar="BASE.onnx")
    parser.add_argument("--adapter", required=True, action="append", metavar="DIR", help="peft RoAd adapter")
    parser.add_argument("--mode", choices=("merge", "rotate"), default="rotate")
    parser.add_argument("output", metavar="OUT.onnx")
    parser.add_argument("--quiet", action="store_true")
    return parser


def kernels_parser() -> argparse.ArgumentParser:
    return _Parser(prog="road-export kernels", description="Build (once per machine) the native onnxruntime "
                   "kernels for the road ops and print the library's path, for "
                   "SessionOptions.register_custom_ops_library in your own serving code. Without them onnxruntime "
                   "runs the road ops' standard-op bodies.")


def inspect_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="road-export inspect", description="Show an exported model: mode, adapters, road "
                     "nodes, inputs, outputs, metadata.")
    parser.add_argument("model", metavar="MODEL.onnx")
    parser.add_argument("--json", action="store_true", help="print JSON")
    return parser


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
        if self.status is not None and self.console.is_terminal:
            self.status.update(f"{name} ...")

    def done(self, message: str) -> None:
        if not self.quiet:
            elapsed = time.perf_counter() - self.started
            self.console.print(f"{message} ({elapsed:.1f} s)", highlight=False, soft_wrap=True)


def _write_report(report, path: str | None) -> None:
    if path:
        try:
            Path(path).write_text(report.to_json() + "\n")
        except OSError as e:
            raise RoadError(f"--report {path}: cannot write ({e.strerror or e})") from e


def _print_report(report, quiet: bool) -> int:
    if not quiet:
        print(report.table(color=sys.stdout.isatty()), end="")
    return EXIT_OK if report.passed else EXIT_PARITY


def run_export(argv: Sequence[str]) -> int:
    args = export_parser().parse_args(argv)
    import road_export as rx
    from road_export.files import check_writable
    from road_export.source import load_source
    from road_export.verify import verify

    output = Path(args.output)
    if output.suffix != ".onnx":
        raise RoadError(f"{output}: the output file name must end in .onnx")
    check_writable(output)
    progress = _Progress(args.quiet)
    with progress.running():
        progress.step("loading")
        source = load_source(args.base, args.adapter, seed=args.seed, task=args.task, reference=not args.no_verify)
        if len(source.adapters) > 1 and args.mode != "rotate":
            raise RoadError(f"{len(source.adapters)} adapters cannot be merged into one set of weights; add --mode "
                            "rotate for one graph that serves them all (input adapter_ids)")
        result = rx.export(source.model, output, mode=args.mode, task=args.task, opset=args.opset,
                           dtype=args.dtype, external_data=args.external_data or None, target=args.target,
                           swappable=not args.fixed,
                           on_step=progress.step)
        report = None
        if not args.no_verify:
            progress.step("verifying")
            report = verify(output, source.reference_model, task=result.task, atol=args.atol,
                            native=False if args.no_native else None, reference=source.reference_name)
    nodes = f", {result.road_nodes} road nodes" if args.mode == "rotate" else ""
    nodes += "".join(f", swap file {f.name}" for f in result.adapter_files)
    progress.done(f"wrote {output} ({args.mode}, {args.dtype}, adapters: {', '.join(source.adapters)}"
                  f"{' from the embedded config' if source.embedded else ''}{nodes})")
    if report is None:
        return EXIT_OK
    _write_report(report, args.report)
    return _print_report(report, args.quiet)


def run_verify(argv: Sequence[str]) -> int:
    args = verify_parser().parse_args(argv)
    from road_export.source import load_source
    from road_export.verify import verify

    progress = _Progress(args.quiet)
    with progress.running():
        if not Path(args.model).is_file():
            raise RoadError(f"{args.model}: no such ONNX file")
        progress.step("loading")
        source = load_source(args.base, args.adapter, seed=args.seed, task=args.task)
        progress.step("verifying")
        report = verify(args.model, source.reference_model, task=args.task, atol=args.atol,
                        native=False if args.no_native else None, reference=source.reference_name)
    _write_report(report, args.report)
    return _print_report(report, args.quiet)


def run_optimize(argv: Sequence[str]) -> int:
    args = optimize_parser().parse_args(argv)
    from road_export.passes.pipeline import optimize_file

    report = optimize_file(args.source, args.output, fold=args.fold, target=args.target, debug=args.debug)
    if not args.quiet:
        print(report.text())
        print(f"wrote {args.output}")
    return EXIT_OK


def run_adapter(argv: Sequence[str]) -> int:
    args = adapter_parser().parse_args(argv)
    from road_export.swap import convert_adapter

    path = convert_adapter(args.adapter, args.like, args.output)
    print(f"wrote {path}")
    return EXIT_OK


def run_merge_checkpoint(argv: Sequence[str]) -> int:
    args = merge_checkpoint_parser().parse_args(argv)
    from road_export.checkpoint import merge_checkpoint

    report = merge_checkpoint(args.base, args.adapter, args.output)
    if not args.quiet:
        print(f"wrote {report.out_dir}: {report.shards} shard(s), {len(report.merged)} tensors rotated, "
              f"{len(report.replaced)} replaced (modules_to_save)")
    return EXIT_OK


def run_attach(argv: Sequence[str]) -> int:
    args = attach_parser().parse_args(argv)
    from road_export.attach import attach

    report = attach(args.base, args.adapter, args.output, mode=args.mode)
    if not args.quiet:
        what = f"{report.folded} folded into weights" if args.mode == "merge" else f"{report.road_nodes} road nodes"
        print(f"wrote {args.output}: {len(report.placed)} module(s) placed, {what}")
    return EXIT_OK


def run_kernels(argv: Sequence[str]) -> int:
    kernels_parser().parse_args(argv)
    from road_export import native

    print(native.library_path())
    return EXIT_OK


def run_inspect(argv: Sequence[str]) -> int:
    args = inspect_parser().parse_args(argv)
    from road_export.inspection import inspect_model

    info = inspect_model(args.model)
    print(info.to_json() if args.json else info.text())
    return EXIT_OK


def _quiet_libraries() -> None:
    """transformers draws its own progress bars and warnings; ours is the one progress display."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    commands = {"verify": run_verify, "inspect": run_inspect, "optimize": run_optimize, "adapter": run_adapter,
                "merge-checkpoint": run_merge_checkpoint, "attach": run_attach, "kernels": run_kernels}
    try:
        if not argv or argv[0] not in set(SUBCOMMANDS) - {"verify"}:  # only export and verify load transformers
            _quiet_libraries()
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return run_export(argv)
    except RoadError as e:
        print(f"road-export: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("road-export: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours, not bad input: still one line, the traceback on request
        if os.environ.get("ROAD_EXPORT_DEBUG"):
            raise
        print(f"road-export: internal error: {type(e).__name__}: {e} (set ROAD_EXPORT_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
