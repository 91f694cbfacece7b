"""The attention pass (road_export/passes/attention.py) on bench_serve's model: decode steps and prefills with and
without it, timed in alternation in one process.

Exports bench_serve's model (Llama hidden --hidden, --layers layers, 4 RoAd adapters, rotate mode, KV cache) twice,
the second time with the attention pass switched off, checks that both give the same outputs, then times one
onnxruntime run of each (--threads intra-op threads, no spinning, as `road-export serve`) for: a decode step of
1 row and of 5 rows (5 adapters, past --past), and a prefill of 1 and of 5 left-padded prompts (10 tokens).
Each sample is the mean of 5 runs after 2 untimed ones (the weights do not stay in cache across the two
sessions); printed: medians, the 5-row / 1-row ratio per model and the paired ratios with / without.

    python tools/bench_attention.py [--hidden 512] [--layers 4] [--past 24] [--rounds 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--past", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import onnx_ir as ir

    from bench_serve import ADAPTERS
    from road_export.passes.attention import AttentionPass, AttentionResult
    from road_export.runtime.session import RoadSession
    from road_export.app.serving.example import build_example

    def build(root: str) -> Path:
        h = args.hidden
        return build_example(root, adapters=ADAPTERS, hidden_size=h, layers=args.layers, heads=h // 64,
                             kv_heads=max(1, h // 256), intermediate_size=int(h * 2.6875) // 64 * 64,
                             context=256).model

    with tempfile.TemporaryDirectory() as tmp:
        with_pass = build(f"{tmp}/with")
        with mock.patch.object(AttentionPass, "call", lambda self, model: AttentionResult(model, modified=False)):
            without = build(f"{tmp}/without")
        config = {"session.intra_op.allow_spinning": "0"}
        sessions = {"with": RoadSession(with_pass, threads=args.threads, session_config=config).session,
                    "without": RoadSession(without, threads=args.threads, session_config=config).session}
        nodes = {k: len(ir.load(p / "onnx" / "model.onnx").graph) for k, p in (("with", with_pass),
                                                                               ("without", without))}
        pasts = [i for i in sessions["with"].get_inputs() if i.name.startswith("past_key_values")]
        rng = np.random.default_rng(0)

        def feeds(rows: int, width: int, past: int) -> dict[str, np.ndarray]:
            mask = np.ones((rows, past + width), np.int64)
            mask[1:, :2] = 0  # rows after the first left padded
            positions = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)[:, past:]
            f = {"input_ids": rng.integers(0, 300, (rows, width)), "attention_mask": mask,
                 "position_ids": positions.astype(np.int64), "adapter_ids": np.arange(rows, dtype=np.int64) % 5}
            f.update({i.name: rng.standard_normal((rows, i.shape[1], past, i.shape[3])).astype(np.float32)
                      for i in pasts})
            return f

        cases = {"decode 1 row": feeds(1, 1, args.past), "decode 5 rows": feeds(5, 1, args.past),
                 "prefill 1": feeds(1, 10, 0), "prefill 5": feeds(5, 10, 0)}
        for name, f in cases.items():
            a, b = sessions["with"].run(None, f), sessions["without"].run(None, f)
            err = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))
            assert err <= 1e-4, (name, err)
            print(f"{name}: outputs with / without the pass differ by at most {err:.1e}")
        times = {(k, c): [] for k in sessions for c in cases}
        for r in range(args.rounds):
            for c, f in cases.items():
                for k in (("with", "without") if r % 2 else ("without", "with")):
                    session = sessions[k]
                    session.run(None, f)
                    session.run(None, f)
                    started = time.perf_counter()
                    for _ in range(5):
                        session.run(None, f)
                    times[(k, c)].append((time.perf_counter() - started) / 5)
        print(f"hidden {args.hidden}, {args.layers} layers, {args.threads} threads, past {args.past}; nodes: with "
              f"{nodes['with']}, without {nodes['without']}; medians over {args.rounds} rounds")
        for k in sessions:
            m = {c: statistics.median(times[(k, c)]) * 1000 for c in cases}
            five = statistics.median(a / b for a, b in zip(times[(k, "decode 5 rows")], times[(k, "decode 1 row")],
                                                           strict=True))
            print(f"  {k:>7}: " + "  ".join(f"{c} {m[c]:.3f} ms" for c in cases) + f"   5 rows / 1 row {five:.2f} x")
        paired = {c: statistics.median(a / b for a, b in zip(times[("with", c)], times[("without", c)], strict=True))
                  for c in cases}
        print("  with / without (paired): " + "  ".join(f"{c} {v:.3f}" for c, v in paired.items()))


if __name__ == "__main__":
    main()
