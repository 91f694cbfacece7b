"""Case planning: which inputs the harness runs, against torch or against another file (torch-free).

The shapes: batch 1 and more, sequence 1 and longer, left padding; for a graph with a key/value cache a prefill,
a padded prefill, a decode step and a chunk after cached positions; every adapter id for a mixed-adapter file.
Then the coverage checks (`verify(coverage=True)`, and always for the file-against-file check):
- "vocabulary sweep": every token id once, in rows of SWEEP_ROW tokens (the last row wraps around), so a damaged
  embedding or tied-head row of any id is seen; special ids first (`special_ids`) and the last id. Up to
  SWEEP_BUDGET ids the whole vocabulary; above it, the special ids plus a seeded random sample, SWEEP_BUDGET ids
  in all. Runs of at most SWEEP_CHUNK logits values each (`sweep_runs`).
- "long sequence": one row of min(the positions the model takes, LONG_CAP) tokens, so a learned position table is
  checked up to its end when it is small (GPT-2's, OPT's, BERT's in the tiny models: 128).
A model builder graph (GroupQueryAttention) cannot take some cases: `plan_gqa` replaces them by ones it takes and
reports the others as skipped. `check_task_fits` refuses a task whose inputs and outputs are not the file's before
anything runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from road_export.core.errors import RoadError
from road_export.core.names import PAST, PRESENT
from road_export.app.parity.comparisons import OutputParity, skipped_row

__all__ = ["CACHE_SHAPES", "DEFAULT_SHAPES", "LONG_CAP", "MIXED_SHAPES", "SEQ2SEQ_SHAPES", "SPECIAL_ID_KEYS",
           "SWEEP_BUDGET", "SWEEP_CHUNK", "SWEEP_ROW", "TASK_OUTPUTS", "as_cases", "case_label", "check_task_fits",
           "max_positions", "plan_gqa", "special_ids", "sweep_ids", "sweep_runs", "usable_positions"]

DEFAULT_SHAPES: tuple[tuple[int, int, int], ...] = ((1, 1, 0), (3, 7, 2), (2, 33, 5))  # (batch, seq, padding)
MIXED_SHAPES: tuple[tuple[int, int, int], ...] = ((1, 1, 0), (4, 7, 2), (3, 33, 5))  # every id appears
# With a cache: (batch, new tokens, past length, padding): prefill, padded prefill, a decode step, a chunk after past
CACHE_SHAPES: tuple[tuple[int, int, int, int], ...] = ((1, 1, 0, 0), (3, 7, 0, 2), (4, 1, 9, 3), (2, 4, 6, 1))
# Encoder-decoder cases: (batch, encoder length, encoder padding, decoder tokens, past decoder length)
SEQ2SEQ_SHAPES: tuple[tuple[int, int, int, int, int], ...] = ((1, 1, 0, 1, 1), (3, 7, 2, 1, 6), (2, 9, 3, 4, 3))
SWEEP_ROW, SWEEP_BUDGET, SWEEP_CHUNK = 64, 65536, 2**22
LONG_CAP = 256
SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id")
TASK_OUTPUTS = ("logits", "last_hidden_state")  # the first output of every task, as optimum names it


def as_cases(shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, int, int, int]]:
    """Shapes as (batch, sequence, past, padding): a (batch, sequence, padding) shape has no past."""
    return [tuple(shape) if len(shape) == 4 else (shape[0], shape[1], 0, shape[2]) for shape in shapes]


def case_label(batch: int, seq: int, past: int, pad: int, cache: bool) -> str:
    """A case as the report names it: "batch 3, seq 7, past 0, pad 2" (past only for a graph with a cache)."""
    return f"batch {batch}, seq {seq}" + (f", past {past}" if cache else "") + (f", pad {pad}" if pad else "")


def plan_gqa(cases: list[tuple[int, int, int, int]], output: str
             ) -> tuple[list[tuple[int, int, int, int]], list[OutputParity]]:
    """The cases a model builder graph (GroupQueryAttention, road_export.runtime.kvcache.GqaCache) runs and the rows of
    those it cannot: each row's tokens start at position 0 (a padded prompt is fed right padded, the reference
    too) and a past is unpadded; several new tokens on a past run at batch 1 only. A refused case is reported as
    skipped (named by `output`, the file's first output) and replaced by the nearest case it takes."""
    from road_export.runtime.kvcache import GQA_CHUNK_RULE

    runnable, skipped = [], []
    for batch, seq, past, pad in cases:
        label = f"batch {batch}, seq {seq}, past {past}" + (f", pad {pad}" if pad else "")
        if past and seq > 1 and batch > 1:
            skipped.append(skipped_row(output, label, GQA_CHUNK_RULE + "; run at batch 1"))
            runnable.append((1, seq, past, 0))
        elif past and pad:
            skipped.append(skipped_row(output, label, "GroupQueryAttention keeps rows right padded "
                                       "from position 0; a padded past is generate's check; run unpadded"))
            runnable.append((batch, seq, past, 0))
        else:
            runnable.append((batch, seq, past, pad))
    return runnable, skipped


def special_ids(config, vocab: int | None = None) -> list[int]:
    """0, 1, 2, a transformers config's bos/eos/pad/unk/decoder_start ids where set (lists flattened) and the last
    id, each once, in that order; `config` None (a file without its config) gives 0, 1, 2 and the last id.
    `vocab` defaults to the config's vocab_size."""
    vocab = int(config.vocab_size) if vocab is None else vocab
    ids = [0, 1, 2]
    for key in SPECIAL_ID_KEYS if config is not None else ():
        value = getattr(config, key, None)
        ids += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, int)]
    ids.append(vocab - 1)
    return list(dict.fromkeys(i for i in ids if 0 <= i < vocab))


def sweep_ids(vocab: int, first: Sequence[int], seed: int = 0) -> np.ndarray:
    """The vocabulary sweep's ids: `first` (the special ids), then every other id in order (vocab <= SWEEP_BUDGET),
    or a seeded random sample of the others up to SWEEP_BUDGET ids in all (int64)."""
    head = np.array(list(first), dtype=np.int64)
    rest = np.setdiff1d(np.arange(vocab, dtype=np.int64), head)
    if vocab > SWEEP_BUDGET:
        rest = np.sort(np.random.default_rng(seed).choice(rest, SWEEP_BUDGET - len(head), replace=False))
    return np.concatenate([head, rest.astype(np.int64)])


def sweep_runs(ids: np.ndarray, row: int, vocab: int) -> Iterator[tuple[int, np.ndarray]]:
    """The sweep's runs: `ids` in rows of `row` tokens (the last row wraps around to the first ids), several rows
    per run and at most SWEEP_CHUNK logits values ([rows, row, vocab]) each, as (index of the run's first row,
    ids [rows, row])."""
    rows_needed = -(-len(ids) // row)
    ids = np.resize(ids, rows_needed * row)
    per_run = max(1, SWEEP_CHUNK // (row * max(vocab, 1)))
    for first in range(0, rows_needed, per_run):
        yield first, ids[first * row:(first + per_run) * row].reshape(-1, row)


def max_positions(model) -> int:
    """The long check's length: the positions the model accepts (`usable_positions`) capped at LONG_CAP; LONG_CAP
    where the config names none."""
    usable = usable_positions(model)
    return LONG_CAP if usable is None else max(1, min(usable, LONG_CAP))


def usable_positions(model) -> int | None:
    """The longest row the torch model's position table takes (None where the config names no table size).

    The config's size (max_position_embeddings, n_positions), less the first row a padding-offset table leaves
    unused: the RoBERTa family (RoBERTa, XLM-RoBERTa, CamemBERT, BERTweet, Longformer, ...; fairseq's convention)
    keeps `nn.Embedding(max_position_embeddings, hidden, padding_idx=pad_token_id)` and numbers a row's tokens
    from `padding_idx + 1` (transformers' `RobertaEmbeddings.create_position_ids_from_input_ids`), so a table of
    130 rows with padding_idx 1 takes 128 tokens. Read off the model's own position table (an nn.Embedding named
    `position_embeddings` / `embed_positions` with a padding_idx), not a list of model types."""
    from torch import nn

    config = model.config
    size = None
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            size = value
            break
    if size is None:
        return None
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("position_embeddings", "embed_positions") \
                and module.padding_idx is not None and module.num_embeddings == size:
            return size - (module.padding_idx + 1)
    return size


def check_task_fits(path: Path, task: str, told: str, inputs: list[str], outputs: list[str]) -> None:
    """The task's inputs and outputs against the file's own, before anything runs (one line naming where the task
    came from: --task, the file's metadata, or the model class). Raises RoadError."""
    cache = any(n.startswith(PAST) for n in inputs) or any(n.startswith(PRESENT) for n in outputs)
    expected_out = "last_hidden_state" if task == "feature-extraction" else "logits"
    problem = None
    if task == "text-generation-with-past" and not cache:
        problem = "takes no past_key_values inputs and gives no present outputs (no key/value cache)"
    elif task != "text-generation-with-past" and cache:
        problem = "has a key/value cache (past_key_values inputs); that is text-generation-with-past"
    elif not outputs or (outputs[0] in TASK_OUTPUTS and outputs[0] != expected_out):
        # a file named as optimum names outputs must give the task's; one with a tracer's names (`linear_14`: a
        # plain torch.onnx export that `optimize` fused) is taken by position
        problem = f"gives {', '.join(outputs[:3])}, not {expected_out}"
    if problem:
        raise RoadError(f"{path.name}: task {task} (from {told}) does not fit the file: it {problem}; pass the "
                        "--task it was exported with (road-export inspect shows its inputs and outputs)")
