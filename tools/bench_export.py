"""Export cost and runtime cost of RoAd exports, side by side with the plain base model's export.

Llama-shaped model (hidden 2048, 2 layers, vocab 4000), road_4 on all linear layers, group size 64.
Measured in one run:
  - export time: road-export rotate / base, merge / base, and a plain torch.onnx.export of the peft model / base
  - ONNX nodes added per adapted layer (in the file, and after onnxruntime's own optimisation)
  - onnxruntime latency of a one-token step (batch 1, sequence 1), 2 intra-op threads, interleaved A B A B
Rotate-mode files run twice: on the native road kernels (`+native`, what RoadSession runs) and on the road ops'
standard-op bodies (what stock onnxruntime runs without the kernels).

    python tools/bench_export.py [--hidden 2048] [--rounds 200] [--variant road_4] [--targets all-linear]
    python tools/bench_export.py --variant road_1 --targets q_proj,v_proj
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import interleave, llama_config  # noqa: E402


def session(path: Path, optimized: Path | None = None, native: bool = False):
    import onnxruntime as ort

    from road_export.graph import native as road_native

    so = ort.SessionOptions()
    road_native.register(so, native)
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if optimized is not None:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def node_count(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def peft_traced_export(peft_model, path: Path) -> None:
    """What a user gets today: torch.onnx.export(dynamo=True) of the peft model, default optimisation."""
    from road_export.export.tasks import TaskModule, sample_inputs, task_spec

    spec = task_spec(peft_model, "causal-lm")
    inputs = sample_inputs(peft_model.get_base_model(), spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(TaskModule(peft_model, spec), (), kwargs=inputs, dynamo=True,
                                    dynamic_shapes={n: {0: "batch", 1: "sequence"} for n in inputs},
                                    verbose=False)
    program.save(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--export-rounds", type=int, default=2)
    parser.add_argument("--variant", default="road_4", choices=("road_1", "road_2", "road_4"))
    parser.add_argument("--targets", default="all-linear", help="all-linear, or comma-separated module names")
    args = parser.parse_args()
    torch.set_num_threads(2)

    import logging

    import peft
    from transformers import LlamaForCausalLM

    import road_export as rx

    logging.disable(logging.WARNING)
    config = llama_config(args.hidden, args.layers)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    road_cfg = dict(variant=args.variant, group_size=64, init_weights=False, target_modules=targets)
    torch.manual_seed(1)
    ours = rx.get_road_model(copy.deepcopy(base), rx.RoadConfig(**road_cfg))
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.RoadConfig(**road_cfg)).eval()
    peft_model.load_state_dict({"base_model.model." + k: v for k, v in ours.state_dict().items() if "road_" in k},
                               strict=False)
    n_adapted = len(rx.road_layers(ours))
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab 4000; {args.variant} on {n_adapted} layers "
          f"({args.targets}), g=64")

    tmp = Path(tempfile.mkdtemp(prefix="bench_export_"))
    paths = {k: tmp / f"{k}.onnx" for k in ("base", "merge", "rotate", "fixed", "peft")}
    jobs = {
        "base": lambda: rx.export(base, paths["base"], require_adapter=False),
        "merge": lambda: rx.export(ours, paths["merge"], mode="merge"),
        "rotate": lambda: rx.export(ours, paths["rotate"], mode="rotate"),
        "fixed": lambda: rx.export(ours, paths["fixed"], mode="rotate", swappable=False),
        "peft": lambda: peft_traced_export(peft_model, paths["peft"]),
    }
    jobs["base"]()  # warm-up: the first export pays for imports and the exporter's own set-up
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(args.export_rounds):
        for key, job in jobs.items():
            start = time.perf_counter()
            job()
            times[key].append(time.perf_counter() - start)
    print("\nexport time (median of %d interleaved rounds)" % args.export_rounds)
    for key in ("merge", "rotate", "fixed", "peft"):
        ratio = statistics.median(a / b for a, b in zip(times[key], times["base"], strict=True))
        label = {"merge": "road-export merge", "rotate": "road-export rotate", "fixed": "rotate --fixed",
                 "peft": "peft + torch.onnx.export"}
        base_time = statistics.median(times["base"])
        print(f"  {label[key]:>26}: {statistics.median(times[key]):6.2f} s   base {base_time:6.2f} s"
              f"   ratio {ratio:.2f}x")

    print("\nONNX nodes added per adapted layer")
    base_nodes = node_count(paths["base"])
    runs = {**{k: (p, False) for k, p in paths.items()}, "rotate+native": (paths["rotate"], True),
            "fixed+native": (paths["fixed"], True)}
    opt = {k: tmp / f"{k}.ort.onnx" for k in runs}
    sessions = {k: session(p, opt[k], native) for k, (p, native) in runs.items()}
    shown = ("merge", "rotate+native", "fixed+native", "rotate", "fixed", "peft")
    for key in shown:
        in_file = (node_count(runs[key][0]) - base_nodes) / n_adapted
        after = (node_count(opt[key]) - node_count(opt["base"])) / n_adapted
        print(f"  {key:>14}: {in_file:5.2f} in the file, {after:5.2f} after onnxruntime's optimisation")

    feeds = {"input_ids": np.array([[5]], dtype=np.int64), "attention_mask": np.ones((1, 1), dtype=np.int64)}
    for s in sessions.values():
        for _ in range(10):
            s.run(None, feeds)
    print(f"\none-token step latency, batch 1 (onnxruntime, 2 threads, {args.rounds} interleaved rounds)")
    for key in shown:
        cmp = interleave(lambda k=key: sessions[k].run(None, feeds), lambda: sessions["base"].run(None, feeds),
                         rounds=args.rounds, names=(key, "base"), inner=5)
        print("  " + cmp.line())


if __name__ == "__main__":
    main()
