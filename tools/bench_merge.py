"""road_export.merge_and_unload against peft's merge_and_unload on the same adapter.

Llama-shaped model (hidden 2048, 2 layers, vocab 4000), road_4 on all linear layers, group size 64.
Each round merges a fresh copy of the adapted model with peft, then with road-export (interleaved).

    python tools/bench_merge.py [--rounds 3] [--hidden 2048]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import Comparison, llama_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)

    import peft
    from transformers import LlamaForCausalLM

    import road_export as rx

    config = llama_config(args.hidden, args.layers)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    road_cfg = dict(variant="road_4", group_size=64, init_weights=False, target_modules="all-linear")
    torch.manual_seed(1)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.RoadConfig(**road_cfg)).eval()
    ours_model = rx.get_road_model(copy.deepcopy(base), rx.RoadConfig(**road_cfg))
    state = {k.removeprefix("base_model.model."): v for k, v in peft_model.state_dict().items() if "road_" in k}
    ours_model.load_state_dict(state, strict=False)
    n_layers = len(rx.road_layers(ours_model))
    print(f"model: hidden {args.hidden}, {args.layers} layers, road_4 on {n_layers} linear layers, g=64")

    times_peft: list[float] = []
    times_ours: list[float] = []
    ids = torch.randint(0, 4000, (1, 8))
    for _ in range(args.rounds):
        p = copy.deepcopy(peft_model)
        start = time.perf_counter()
        merged_peft = p.merge_and_unload()
        times_peft.append(time.perf_counter() - start)
        o = copy.deepcopy(ours_model)
        start = time.perf_counter()
        merged_ours = rx.merge_and_unload(o)
        times_ours.append(time.perf_counter() - start)
    with torch.no_grad():
        err = (merged_peft(ids).logits - merged_ours(ids).logits).abs().max().item()
    cmp = Comparison("peft merge_and_unload", "road_export", times_peft, times_ours)
    print(cmp.line(unit="s"))
    print(f"road-export is {cmp.ratio:.1f}x faster (median of {args.rounds} paired rounds); "
          f"max |logit difference| between the two merged models: {err:.2e}")


if __name__ == "__main__":
    main()
