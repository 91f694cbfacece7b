"""Decode speed with a KV cache on onnxruntime: merged and rotate exports against the base model's, in one run.

Llama-shaped model (hidden 1024, 6 layers, grouped-query attention, vocab 8000), RoAd on all linear layers, group
size 64, exported with --task text-generation-with-past. Each round generates with every export in turn
(RoadSession.generate: prefill, then one token per step feeding present.* back as past_key_values.*), so drift
hits all sides equally. Decode tokens/s counts the steps after the prefill; ratios are medians of paired rounds.
Then the decode step alone, steadier: one new token after the prompt's cache, each export timed against the
base export in alternation (A B A B ..., --steps rounds), no Python generation loop around it.
Also shown: what a user gets today from torch.onnx.export(dynamo=True) of the peft model with the same cache I/O
(peft-traced), and a causal-lm export of the base model without cache (every step reruns the whole sequence).
Rotate exports run on the native road kernels (RoadSession's default), and once more on the road ops'
standard-op bodies (`bodies`: stock onnxruntime without the kernels).

    python tools/bench_generate.py [--hidden 1024] [--layers 6] [--batch 1] [--prompt 32] [--new 64] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import interleave, llama_config  # noqa: E402


def decode_rate(session, ids: np.ndarray, new: int) -> float:
    """Tokens per second over the steps after the prefill (batch rows count separately)."""
    start = None
    count = 0
    for step in session.stream(ids, max_new_tokens=new):
        if start is None:
            start = time.perf_counter()  # the prefill is done: time the decode steps only
        else:
            count += 1
    return count * ids.shape[0] / (time.perf_counter() - start)


def step_call(session, ids: np.ndarray):
    """A call running one decode step of `session` after the prefill of `ids` (cache of the prompt's length)."""
    from road_export.runtime.generation import _empty_cache, positions

    batch, length = ids.shape
    mask = np.ones((batch, length), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask), **_empty_cache(session, batch)}
    out = session.run(feeds)
    past = {name.replace("present", "past_key_values"): v for name, v in out.items() if name.startswith("present")}
    step_mask = np.ones((batch, length + 1), dtype=np.int64)
    step = {"input_ids": out["logits"][:, -1].argmax(-1)[:, None], "attention_mask": step_mask,
            "position_ids": positions(step_mask)[:, -1:], **past}
    step = {k: v for k, v in step.items() if k in session.input_names}
    names = session.output_names
    return lambda: session.session.run(names, step)


def peft_traced_export(peft_model, path: Path) -> None:
    """torch.onnx.export(dynamo=True) of the peft model itself, with road-export's cache I/O and default optimiser."""
    from road_export.export.tasks import TaskModule, dynamic_shapes, task_spec, trace_inputs

    spec = task_spec(peft_model, "text-generation-with-past")
    program = torch.onnx.export(TaskModule(peft_model, spec), (), kwargs=trace_inputs(peft_model, spec),
                                dynamo=True, input_names=list(spec.input_names),
                                output_names=list(spec.output_names), dynamic_shapes=dynamic_shapes(spec),
                                verbose=False)
    program.save(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=300, help="interleaved rounds of the one-step comparison")
    parser.add_argument("--variant", default="road_4", choices=("road_1", "road_2", "road_4"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")

    import peft
    from transformers import LlamaForCausalLM

    import road_export as rx
    from road_export.runtime.session import RoadSession

    config = llama_config(args.hidden, args.layers, vocab=8000, max_position_embeddings=4096)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    torch.manual_seed(1)
    road_cfg = dict(variant=args.variant, group_size=64, init_weights=False, target_modules="all-linear")
    ours = rx.get_road_model(copy.deepcopy(base), rx.RoadConfig(**road_cfg))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.RoadConfig(**road_cfg)).eval()
    theirs.load_state_dict({"base_model.model." + k: v for k, v in ours.state_dict().items() if "road_" in k},
                           strict=False)
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, vocab 8000; {args.variant} on "
          f"{len(rx.road_layers(ours))} layers (all-linear), g=64; batch {args.batch}, prompt {args.prompt}, "
          f"{args.new} new tokens, greedy")

    tmp = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    task = "text-generation-with-past"
    exports = {
        "base": lambda p: rx.export(base, p, task=task, require_adapter=False),
        "merged": lambda p: rx.export(ours, p, mode="merge", task=task),
        "rotate": lambda p: rx.export(ours, p, mode="rotate", task=task),
        "rotate --fixed": lambda p: rx.export(ours, p, mode="rotate", task=task, swappable=False),
        "peft-traced": lambda p: peft_traced_export(theirs, p),
        "base, no cache": lambda p: rx.export(base, p, task="causal-lm", require_adapter=False),
    }
    sessions = {}
    for i, (name, job) in enumerate(exports.items()):
        start = time.perf_counter()
        job(tmp / f"m{i}.onnx")
        sessions[name] = RoadSession(tmp / f"m{i}.onnx", threads=2)
        print(f"  exported {name:<15} {time.perf_counter() - start:5.1f} s")
        if name == "rotate":
            assert sessions[name].native, "the native road kernels did not build (see road-export kernels)"
            sessions["rotate, bodies"] = RoadSession(tmp / f"m{i}.onnx", threads=2, native=False)

    ids = np.random.default_rng(0).integers(3, 8000, (args.batch, args.prompt))
    reference = sessions["base"].generate(ids, max_new_tokens=8)
    assert (sessions["base, no cache"].generate(ids, max_new_tokens=8) == reference).all()
    adapted = sessions["merged"].generate(ids, max_new_tokens=8)
    for name in ("rotate", "rotate, bodies", "rotate --fixed", "peft-traced"):
        assert (sessions[name].generate(ids, max_new_tokens=8) == adapted).all(), name
    for s in sessions.values():
        s.generate(ids, max_new_tokens=4)  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.rounds):
        for name, s in sessions.items():
            rates[name].append(decode_rate(s, ids, args.new))

    print(f"\ndecode tokens/s through onnxruntime (2 threads), median of {args.rounds} interleaved rounds")
    for name in list(sessions)[1:]:
        ratio = statistics.median(a / b for a, b in zip(rates[name], rates["base"], strict=True))
        base_rate = statistics.median(rates["base"])
        print(f"  {name:>15}: {statistics.median(rates[name]):8.1f} tokens/s   base {base_rate:8.1f} tokens/s"
              f"   ratio {name}/base = {ratio:.3f}x")

    print(f"\none decode step after a {args.prompt}-token cache, batch {args.batch}, {args.steps} interleaved rounds")
    base_step = step_call(sessions["base"], ids)
    for name in list(sessions)[1:-1]:  # the no-cache export has no decode step
        cmp = interleave(step_call(sessions[name], ids), base_step, rounds=args.steps, names=(name, "base"), inner=3)
        print("  " + cmp.line())


if __name__ == "__main__":
    main()
