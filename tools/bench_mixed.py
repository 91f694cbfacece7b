"""Mixed-adapter batches on onnxruntime: 8 rows with 8 different adapters, against the same batch with one
adapter and against 8 separate single-adapter runs, all on the same exported graph (interleaved, 2 threads).

Llama-shaped model (hidden 1024, 2 layers, vocab 4000), 8 RoAd adapters (road_1, group size 64) on q/v.

    python tools/bench_mixed.py [--hidden 1024] [--seq 32] [--rounds 100] [--variant road_1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import interleave, llama_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--variant", default="road_1", choices=("road_1", "road_2", "road_4"))
    parser.add_argument("--targets", default="q_proj,v_proj")
    args = parser.parse_args()
    torch.set_num_threads(2)

    import logging

    from transformers import LlamaForCausalLM

    import road_export as rx
    from road_export.runtime.session import RoadSession

    logging.disable(logging.WARNING)
    config = llama_config(args.hidden, 2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    names = [f"a{i}" for i in range(args.adapters)]
    for name in names:
        rx.get_road_model(model, rx.RoadConfig(variant=args.variant, group_size=64, init_weights=False,
                                               target_modules=targets), name)
    path = Path(tempfile.mkdtemp(prefix="bench_mixed_")) / "mixed.onnx"
    result = rx.export(model, path, mode="rotate")
    session = RoadSession(path, threads=2)
    n = args.adapters
    ids = np.random.default_rng(0).integers(3, 4000, (n, args.seq))
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    rows = [{"input_ids": ids[i:i + 1], "attention_mask": np.ones_like(ids[i:i + 1])} for i in range(n)]
    for _ in range(5):
        session.run(inputs, adapter_names=names)
        session.run(inputs, adapter=names[0])
    mixed = lambda: session.run(inputs, adapter_names=names)  # noqa: E731
    single = lambda: session.run(inputs, adapter=names[0])  # noqa: E731
    separate = lambda: [session.run(rows[i], adapter=names[i]) for i in range(n)]  # noqa: E731
    print(f"model: Llama hidden {args.hidden}, 2 layers; {n} adapters ({args.variant}, g=64, {args.targets}); "
          f"{result.road_nodes} road nodes; batch {n} x {args.seq} tokens")
    print("  " + interleave(mixed, single, rounds=args.rounds, names=(f"{n} adapters in one batch",
                                                                        "one adapter")).line())
    print("  " + interleave(mixed, separate, rounds=args.rounds, names=(f"{n} adapters in one batch",
                                                                          f"{n} separate runs")).line())


if __name__ == "__main__":
    main()
