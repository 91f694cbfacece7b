"""Decode-step latency of an encoder-decoder export: rotate / merged / base, interleaved on onnxruntime (2 threads).

A T5-shaped model (d_model 512, 8 heads of 64, d_ff 2048, 4 encoder and 4 decoder layers, vocab 4000) with the
seed's adapter (`target_modules=".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$"`, road_4 unless --variant),
exported three times (road-export's seq2seq files): rotated (one road node per adapted layer), merged into the
weights, and the base without adapter. Timed: one `decoder_with_past_model.onnx` step (batch 1, 1 new token,
--past cached decoder positions, --encoder encoder positions), A B A B ... in one process (tools/benchlib.py).

    python tools/bench_seq2seq.py [--d-model 512] [--layers 4] [--past 32] [--encoder 64] [--rounds 200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import interleave  # noqa: E402

SEED_REGEX = ".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--past", type=int, default=32)
    parser.add_argument("--encoder", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--variant", default="road_4", choices=("road_1", "road_2", "road_4"))
    args = parser.parse_args()
    torch.set_num_threads(2)

    import logging

    import peft
    from transformers import T5Config, T5ForConditionalGeneration

    import road_export as rx
    from road_export.runtime.session import RoadSession

    logging.disable(logging.WARNING)
    config = T5Config(d_model=args.d_model, d_kv=64, num_heads=args.d_model // 64, d_ff=4 * args.d_model,
                      num_layers=args.layers, vocab_size=args.vocab, decoder_start_token_id=0, pad_token_id=0,
                      eos_token_id=1)
    torch.manual_seed(0)
    base = T5ForConditionalGeneration(config).eval()
    root = Path(tempfile.mkdtemp(prefix="bench_seq2seq_"))
    rx.export(base, root / "base", mode="merge", require_adapter=False)
    model = peft.get_peft_model(base, peft.RoadConfig(variant=args.variant, group_size=64, init_weights=False,
                                                      target_modules=SEED_REGEX)).eval()
    rotated = rx.export(model, root / "rotate", mode="rotate")
    rx.export(model, root / "merge", mode="merge")
    sessions = {name: RoadSession(root / name, threads=2) for name in ("rotate", "merge", "base")}
    step = sessions["base"].decoder_with_past
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(3, args.vocab, (args.batch, 1)),
             "encoder_attention_mask": np.ones((args.batch, args.encoder), np.int64)}
    for value in step.session.get_inputs():
        if value.name.startswith("past_key_values."):
            length = args.encoder if ".encoder." in value.name else args.past
            feeds[value.name] = rng.standard_normal((args.batch, value.shape[1], length, value.shape[3]),
                                                    dtype=np.float32)
    runs = {name: (lambda s=s.decoder_with_past: s.session.run(None, feeds)) for name, s in sessions.items()}
    for _ in range(10):
        for run in runs.values():
            run()
    print(f"T5 d_model {args.d_model}, {args.layers}+{args.layers} layers, vocab {args.vocab}; {args.variant} on "
          f"decoder self/cross q,v ({rotated.road_nodes} road nodes over the files); decode step: batch {args.batch}, "
          f"1 token, past {args.past}, encoder {args.encoder}; onnxruntime 2 threads, "
          f"road ops: {'native' if sessions['rotate'].decoder_with_past.native else 'bodies'}")
    for a, b in (("rotate", "base"), ("merge", "base"), ("rotate", "merge")):
        print(interleave(runs[a], runs[b], rounds=args.rounds, names=(a, b)).line())


if __name__ == "__main__":
    main()
