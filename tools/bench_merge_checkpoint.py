"""Peak memory of `road-export merge-checkpoint` against peft's load-merge-save, on a sharded checkpoint >= 1 GB.

Builds a Llama-shaped fp32 checkpoint (hidden 2048, 5 layers, vocab 4000: about 1.1 GB in 300 MB shards) and a
road_4 adapter on all linear layers (g 64), then runs each merge in its own process under /usr/bin/time -v and
reports the maximum resident set size next to the largest tensor (goal: <= 2 x largest tensor + 300 MB).

    python tools/bench_merge_checkpoint.py [--layers 5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import llama_config  # noqa: E402

PEFT_MERGE = """
import sys, torch, peft
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model = peft.PeftModel.from_pretrained(base, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3], max_shard_size="300MB")
"""


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(max RSS in MB, wall seconds) of a command, from /usr/bin/time -v."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{proc.stderr[-2000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return kb / 1024, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--keep", help="build the checkpoint here and keep it")
    args = parser.parse_args()

    import peft
    import torch
    from transformers import LlamaForCausalLM

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    root.mkdir(parents=True, exist_ok=True)
    base_dir, adapter_dir = root / "base", root / "adapter"
    config = llama_config(2048, args.layers, tie_word_embeddings=False)
    if not base_dir.is_dir():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        model.save_pretrained(base_dir, max_shard_size="300MB")
        torch.manual_seed(1)
        peft.get_peft_model(model, peft.RoadConfig(variant="road_4", group_size=64, init_weights=False,
                                                   target_modules="all-linear")).save_pretrained(str(adapter_dir))
        del model
    shards = sorted(base_dir.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in shards) / 2**20
    from road_export.export.checkpoint import _header

    largest = max(e - b for s in shards for k, v in _header(s)[1].items() if k != "__metadata__"
                  for b, e in [v["data_offsets"]]) / 2**20
    print(f"checkpoint: {total:.0f} MB in {len(shards)} shards; largest tensor {largest:.1f} MB; "
          f"goal <= {2 * largest + 300:.0f} MB")
    for out in ("ours", "peft"):
        shutil.rmtree(root / out, ignore_errors=True)
    road_export = shutil.which("road-export") or str(Path(sys.executable).with_name("road-export"))
    ours, ours_s = peak_rss([road_export, "merge-checkpoint", "--base", str(base_dir), "--adapter",
                             str(adapter_dir), str(root / "ours"), "--quiet"])
    theirs, theirs_s = peak_rss([sys.executable, "-c", PEFT_MERGE, str(base_dir), str(adapter_dir), str(root / "peft")])
    print(f"  road-export merge-checkpoint: peak RSS {ours:7.0f} MB  ({ours / largest:.1f} x largest tensor), "
          f"{ours_s:.1f} s")
    print(f"  peft load-merge-save:         peak RSS {theirs:7.0f} MB  ({theirs / largest:.1f} x largest tensor), "
          f"{theirs_s:.1f} s")
    print(f"  ratio peft / road-export peak RSS: {theirs / ours:.1f}x")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
