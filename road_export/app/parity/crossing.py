"""Generation across the lengths where a decoder computes differently: the parity harness's threshold check.

The forward checks of `road_export.app.parity.torch_reference` feed one call each; they cannot see generation state that
transformers changes mid-sequence. Here a decoder with a KV cache generates greedily on onnxruntime
(road_export.runtime.generation, the loop `RoadSession.generate` runs) and with the reference's own `generate` (peft's,
for a peft model), from a prompt two tokens short of each threshold (`road_export.export.rope.thresholds`: the longrope
switch and other ropes' `original_max_position_embeddings`, where dynamic NTK starts growing, sliding windows) to
three tokens past it, and compares every step's logits and tokens; a model with a learned position table (GPT-2,
OPT) generates up to the table's last row. A Phi-3 longrope file that keeps its short-factor keys past the switch
(exported before road-export followed transformers' cache recompute, or with the long factors lost) fails here while
every forward check passes.

Only models with such a threshold inside their position range (and at most CROSS_CAP) pay for it: two short
generations per threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from road_export.runtime import generation
from road_export.export.rope import thresholds
from road_export.export.tasks import uses_absolute_positions
from road_export.core.names import ADAPTER_IDS, PAST
from road_export.runtime.kvcache import file_layout
from road_export.app.parity.comparisons import OutputParity, compare

__all__ = ["CROSS_CAP", "CROSS_NEW", "crossing_rows", "reference_generate"]

CROSS_CAP = 8192  # thresholds beyond this many tokens are not generated across (verify's time and memory)
CROSS_NEW = 5  # new tokens: the prompt is 2 short of the threshold, so the last two steps run past it


class _FileSession:
    """road_export.runtime.generation's Session over verify's own onnxruntime session (no second copy of the
    weights)."""

    def __init__(self, path: Path, session) -> None:
        self.path, self.session = path, session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.cache_layout = file_layout(path, session)  # the decode loop's cache strategy (road_export.runtime.kvcache)

    def route(self, batch: int, *, adapter: str | None = None, adapter_names: Sequence[str] | None = None):
        return {}, None

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return feeds

    def run_feeds(self, output_names, feeds: dict[str, np.ndarray], options=None) -> list[np.ndarray]:
        return self.session.run(output_names, feeds, options)


def reference_generate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Greedy `model.generate` (transformers', through peft for a peft model) of exactly `new` tokens with no EOS:
    (tokens [batch, new] int64, raw logits [batch, new, vocab] float32)."""
    defaults = getattr(model, "generation_config", None)
    saved = getattr(defaults, "eos_token_id", None)
    if defaults is not None:
        defaults.eos_token_id = None  # generate() would fill an unset EOS from the defaults
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    finally:
        if defaults is not None:
            defaults.eos_token_id = saved
    tokens = out.sequences[:, ids.shape[1]:].numpy()
    return tokens, np.stack([t.float().numpy() for t in out.logits], 1)


def crossing_rows(path: Path, session, model: nn.Module, *, atol: float, exact: bool, by_cosine: bool = False,
                  seed: int = 0) -> list[OutputParity]:
    """One row per threshold of `model` for the decoder file at `path` (its onnxruntime `session`): the logits of
    CROSS_NEW greedy steps from a prompt of threshold - 2 tokens (for a learned position table, a prompt whose last
    step runs at the table's last row; batch 2, row 0 left padded by one) against
    `reference_generate`, judged as verify's rows (max abs <= atol, or cosine with `by_cosine`). `exact` (a float32
    file) also requires the same tokens; otherwise steps after the first differing token are not compared (their
    inputs differ). [] for a file without a cache, a mixed-adapter file, or a model without thresholds."""
    inputs = [i.name for i in session.get_inputs()]
    if not any(n.startswith(PAST) for n in inputs) or ADAPTER_IDS in inputs:
        return []
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    limit = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or CROSS_CAP)
    rows = []
    crossings = [(length, why, length - 2) for length, why in thresholds(model)]
    if limit <= CROSS_CAP and uses_absolute_positions(model):  # the last position the table has
        crossings.append((limit, "position table end", limit - CROSS_NEW + 1))
    for length, why, prompt in crossings:
        # past the position range only where the model means to go there (dynamic NTK grows beyond it)
        if prompt < 2 or vocab < 4 or length > CROSS_CAP or \
                (prompt + CROSS_NEW - 1 > limit and "dynamic" not in why):
            continue
        gen = torch.Generator().manual_seed(seed + length)
        ids = torch.randint(3, vocab, (2, prompt), generator=gen)
        mask = torch.ones(2, prompt, dtype=torch.int64)
        ids[0, 0], mask[0, 0] = 0, 0
        want_tokens, want_logits = reference_generate(model, ids, mask, CROSS_NEW)
        steps = list(generation.stream(_FileSession(path, session), ids.numpy(), mask.numpy(),
                                       max_new_tokens=CROSS_NEW, pad_token_id=0))
        got_tokens = np.stack([s.tokens for s in steps], 1)
        got_logits = np.stack([s.logits for s in steps], 1)
        differ = np.flatnonzero((got_tokens != want_tokens).any(0))
        case = f"generate across {why} {length}: prompt {prompt}, {CROSS_NEW} new"
        upto = CROSS_NEW if exact or not differ.size else int(differ[0]) + 1
        row = compare("logits", case, got_logits[:, :upto], want_logits[:, :upto], None, atol, logits=True,
                      by_cosine=by_cosine)
        if differ.size:
            row.case += f", tokens differ from step {int(differ[0])}"
            row.ok = row.ok and not exact
        rows.append(row)
    return rows
