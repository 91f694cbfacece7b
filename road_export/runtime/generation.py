"""Token-by-token generation on onnxruntime: greedy or sampled, batch > 1 with left padding, with a KV cache.

A `text-generation-with-past` export runs the prompt once with an empty cache (the prefill) and then one token per
step, feeding each step's `present.*` back as `past_key_values.*`. A `text-generation` export without cache still
works: every step reruns the whole sequence, which is what the cache saves. Wherever the file takes `position_ids`
(every absolute-position model's export), they are transformers' positions for the left-padded mask.

A file whose rope switches at a length (Phi-3's longrope: the `road_export.rope` record's `recompute_cache_at`) is
generated as transformers' generation of that model does it (`Phi3ForCausalLM.prepare_inputs_for_generation`): when
the sequence first reaches that many tokens, the cache is dropped and the whole sequence runs again, so every key
is computed with the long factors the graph then chooses.

This module holds the package's one decode loop. `Decoding` is a batch's state (prefill, step, present -> past
through the file's cache strategy `road_export.runtime.kvcache`, mask and position growth, the longrope recompute) over
a `Run` (onnxruntime's run with the rows' adapters: `host_run` here, the IOBinding run of `road_export.runtime.gpu`);
`decode` chooses the tokens (`Pick`: `host_pick`, or the GPU's ArgMax), stops rows at EOS and pads them. `stream`
(RoadSession on the host), `road_export.runtime.gpu.generate`, `road_export.runtime.seq2seq.Seq2SeqSession.stream` (the
decoder, the encoder's output a fixed feed) run `decode`; the serving engine drives `Decoding` step by step as rows join
and leave.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from road_export.core.errors import RoadError
from road_export.runtime.kvcache import NUMPY_TYPES, KVCache, bucket, new_cache  # noqa: F401  (NUMPY_TYPES: re-exported)
# (PAST, PRESENT: tools import them)
from road_export.core.names import METADATA_ROPE, PAST, PRESENT, positions  # noqa: F401


class Session(Protocol):
    """What generation drives: road_export.runtime.session.RoadSession has these (generation sits below the runtime)."""

    path: Path
    session: Any  # onnxruntime.InferenceSession
    input_names: list[str]
    output_names: list[str]
    cache_layout: Any  # road_export.runtime.kvcache.CacheLayout | None

    def route(self, batch: int, *, adapter: str | None = None, adapter_names: Sequence[str] | None = None
              ) -> tuple[dict[str, np.ndarray], Any]: ...

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def run_feeds(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray], options: Any = None
                  ) -> list[np.ndarray]: ...



@dataclass
class Step:
    """One decoding step: the token chosen for each row and the raw logits it was chosen from."""

    tokens: np.ndarray  # [batch] int64; rows already finished get pad_token_id
    logits: np.ndarray | None  # [batch, vocab] float32, before temperature / top-k / top-p; None where the token was
    # chosen on the device (the GPU loop's greedy ArgMax: the logits never came to the host)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: argmax, or a draw from the tempered, truncated distribution."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise RoadError(f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise RoadError(f"top_k must be >= 0 and top_p in (0, 1], got top_k={self.top_k}, top_p={self.top_p}")

    def choose(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not self.do_sample:
            return logits.argmax(-1)
        scores = logits.astype(np.float64) / self.temperature
        if self.top_k and self.top_k < scores.shape[-1]:
            kth = np.partition(scores, -self.top_k, axis=-1)[:, -self.top_k, None]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        if self.top_p < 1:
            order = np.argsort(-probs, axis=-1)
            sorted_probs = np.take_along_axis(probs, order, -1)
            drop = np.cumsum(sorted_probs, -1) - sorted_probs >= self.top_p  # keep the smallest set reaching top_p
            np.put_along_axis(probs, order, np.where(drop, 0.0, sorted_probs), -1)
            probs /= probs.sum(-1, keepdims=True)
        return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)


def check_request(session: Session, input_ids, attention_mask, max_new_tokens, pad_token_id, seed: int | None,
                  eos_token_id) -> tuple[np.ndarray, np.ndarray, np.random.Generator, np.ndarray]:
    """A generation request checked against the file, shared by `stream` and the GPU loop (road_export.runtime.gpu):
    (input_ids [batch, prompt] int64, attention_mask int64, the seeded rng, EOS ids [n] int64).

    Raises RoadError for a bad prompt or mask, a non-integer or < 1 `max_new_tokens`, a non-integer
    `pad_token_id`, a file that is not a causal LM export, or token ids outside the logits' vocabulary."""
    ids, mask = _prompt(input_ids, attention_mask)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
        raise RoadError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int | np.integer):
        raise RoadError(f"pad_token_id must be an integer token id, got {pad_token_id!r}")
    if "input_ids" not in session.input_names or "logits" not in session.output_names:
        raise RoadError(f"{session.path.name} is not a causal language model export (inputs {session.input_names}, "
                        f"outputs {session.output_names}); export with --task text-generation-with-past")
    vocab = session.session.get_outputs()[session.output_names.index("logits")].shape[-1]
    if isinstance(vocab, int) and (ids.min() < 0 or ids.max() >= vocab):
        raise RoadError(f"input_ids must lie in [0, {vocab}); got values from {ids.min()} to {ids.max()}")
    eos = np.array([] if eos_token_id is None else np.atleast_1d(eos_token_id), dtype=np.int64)
    return ids, mask, np.random.default_rng(seed), eos


Run = Callable[[dict[str, Any], Mapping[str, Any]], dict[str, Any]]
"""One run of a decode loop: (feeds, {present output: value to write into} from `KVCache.shared_outputs`) ->
{output name: value}; `host_run` for InferenceSession.run, `road_export.runtime.gpu`'s IOBinding runner for the
device."""


def host_run(session: Session, extra: Mapping[str, np.ndarray], options: Any = None, *, check: bool = True) -> Run:
    """A `Run` over `session.run_feeds` (onnxruntime's InferenceSession.run): `extra` (`adapter_ids`) joins every
    run's feeds, `options` (RunOptions activating a swapped adapter) goes with each run; with `check`, the first
    run's feeds are checked against the model's inputs (`session.check_feeds`: RoadError saying what it takes).
    Outputs are numpy arrays; the shared outputs are not bound (GqaCache keeps the returned copy)."""
    checked = not check

    def run(feeds: dict[str, Any], shared: Mapping[str, Any] | None = None) -> dict[str, Any]:
        nonlocal checked
        if not checked:
            feeds, checked = session.check_feeds(feeds), True
        feeds.update(extra)
        return dict(zip(session.output_names, session.run_feeds(None, feeds, options), strict=True))

    return run


class Rerun:
    """The decode loop's strategy for a file without a key/value cache: every run is the whole sequence so far
    (the mask as given, `position_ids` from it where the file takes them); what a cache saves."""

    aligned = True

    def __init__(self, with_positions: bool):
        self.with_positions = with_positions
        self.ids = self.mask = np.zeros((0, 0), np.int64)

    def prefill(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        self.ids, self.mask = ids, mask
        return self._feeds()

    def step(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        rows = self.ids.shape[0]
        self.ids = np.concatenate([self.ids, np.asarray(tokens, np.int64).reshape(rows, 1)], 1)
        self.mask = np.concatenate([self.mask, np.ones((rows, 1), np.int64)], 1)
        return self._feeds()

    def _feeds(self) -> dict[str, np.ndarray]:
        feeds = {"input_ids": self.ids, "attention_mask": self.mask}
        if self.with_positions:
            feeds["position_ids"] = positions(self.mask)
        return feeds

    def update(self, outputs: Mapping[str, Any]) -> None:
        pass

    def shared_outputs(self) -> dict[str, Any]:
        return {}

    def last_logits(self, logits: np.ndarray) -> np.ndarray:
        return logits[:, -1]


class Decoding:
    """One batch's decode state, the step of every decode loop of the package: `prefill(ids, mask)` runs the
    prompts, `step(tokens)` one new token per row; each returns the run's outputs ({name: array or OrtValue}).
    `last_logits(outputs)` -> [rows, vocab], each row's last real token; `aligned`: whether that is the logits' last
    position for every row (`KVCache.aligned`).

    A run's outputs reach the cache (present -> past, `KVCache.update`) when the next step needs them, or when
    `cache` is read (to move rows: `keep`, `KVCache.extend`), never after the last run nor at a recompute.
    `run` / `step_run`: the `Run` of the prefill and of the steps (one session, or for an encoder-decoder the
    decoder and the decoder with past); `cache`: the key/value strategy (`road_export.runtime.kvcache.KVCache`, or an
    object with its prefill/step/update/shared_outputs/last_logits/aligned, e.g. the seq2seq decoder's); None: `Rerun`
    (`positions`: the file takes position_ids). `recompute_at` and `renew(mask, remaining new tokens)` -> a new
    cache: at that sequence length (padding included) the cache is dropped and the whole sequence runs again
    (Phi-3's longrope switch, see the module)."""

    def __init__(self, run: Run, cache: Any = None, *, step_run: Run | None = None, positions: bool = False,
                 recompute_at: int | None = None, renew: Callable[[np.ndarray, int], Any] | None = None):
        self.run, self.step_run = run, step_run or run
        self._cache = cache if cache is not None else Rerun(positions)
        self.recompute_at = recompute_at if cache is not None and renew is not None else None
        self.renew = renew
        self.sequence = self.mask = np.zeros((0, 0), np.int64)
        self._pending: Mapping[str, Any] | None = None  # the last run's outputs, not yet in the cache

    @property
    def cache(self) -> Any:
        """The cache strategy, holding every run's outputs so far."""
        if self._pending is not None:
            self._cache.update(self._pending)
            self._pending = None
        return self._cache

    @property
    def aligned(self) -> bool:
        return bool(self._cache.aligned)

    def prefill(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
        if self.recompute_at is not None:
            self.sequence, self.mask = ids, mask
        self._pending = None
        return self._run(self.run, self._cache.prefill(ids, mask))

    def step(self, tokens: np.ndarray, remaining: int = 1) -> dict[str, Any]:
        """One token per row [rows] int64; `remaining`: the new tokens still to come, this one included (the size
        of a renewed cache's buffer)."""
        if self.recompute_at is not None:
            rows = self.sequence.shape[0]
            self.mask = np.concatenate([self.mask, np.ones((rows, 1), np.int64)], 1)
            self.sequence = np.concatenate([self.sequence, np.asarray(tokens, np.int64).reshape(rows, 1)], 1)
            if self.mask.shape[1] == self.recompute_at:  # the whole sequence again from an empty cache
                assert self.renew is not None
                self._cache, self._pending = self.renew(self.mask, remaining), None
                return self._run(self.run, self._cache.prefill(self.sequence, self.mask))
        return self._run(self.step_run, self.cache.step(tokens))

    def _run(self, run: Run, feeds: dict[str, Any]) -> dict[str, Any]:
        outputs = run(feeds, self._cache.shared_outputs())
        self._pending = outputs
        return outputs

    def last_logits(self, outputs: Mapping[str, Any]) -> np.ndarray:
        return self._cache.last_logits(outputs["logits"])

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only these rows (continuous batching); rows join through `self.cache.extend`."""
        self.cache.keep(indices)


Pick = Callable[[Mapping[str, Any]], tuple[np.ndarray, np.ndarray | None]]
"""How a loop chooses each row's token from a run's outputs: (tokens [rows], the logits [rows, vocab] float32 they
were chosen from, or None when chosen on the device)."""


def host_pick(decoding: Decoding, sampling: Sampling, rng: np.random.Generator) -> Pick:
    """Choose on the host: each row's last real logits (`Decoding.last_logits`), float32, then `sampling`."""

    def pick(outputs: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
        logits = decoding.last_logits(outputs).astype(np.float32)
        return sampling.choose(logits, rng), logits

    return pick


def decode(decoding: Decoding, ids: np.ndarray, mask: np.ndarray, *, max_new_tokens: int, pick: Pick,
           eos: np.ndarray, pad_token_id: int) -> Iterator[Step]:
    """The decode loop: prefill `ids` [rows, prompt] (0 in `mask` on padding), then one token per row per step;
    yields a `Step` per new token until `max_new_tokens` or every row has produced one of `eos` [n] int64; rows that
    finished get `pad_token_id`. Every generation of the package runs this: `stream` (RoadSession on the host),
    `road_export.runtime.gpu.generate` (IOBinding), `road_export.runtime.seq2seq.Seq2SeqSession.stream` (the decoder).
    The serving engine drives `Decoding` itself (rows join and leave between steps)."""
    outputs = decoding.prefill(ids, mask)
    unfinished = np.ones(ids.shape[0], dtype=bool)
    for count in range(1, max_new_tokens + 1):
        chosen, logits = pick(outputs)
        tokens = np.where(unfinished, chosen, pad_token_id).astype(np.int64)
        yield Step(tokens, logits)
        unfinished &= ~np.isin(tokens, eos)
        if not unfinished.any() or count == max_new_tokens:
            return
        outputs = decoding.step(tokens, max_new_tokens - count)


def stream(
    session: Session,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int = 20,
    adapter: str | None = None,
    adapter_names: Sequence[str] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
) -> Iterator[Step]:
    """Yield one `Step` per new token until `max_new_tokens` or every row has produced an EOS token.

    `input_ids` [batch, prompt] is left padded where `attention_mask` is 0. `adapter` runs every row through
    one adapter, `adapter_names` gives each row its own (a mixed-adapter export); see `RoadSession.run`.
    """
    ids, mask, rng, eos = check_request(session, input_ids, attention_mask, max_new_tokens, pad_token_id, seed,
                                        eos_token_id)
    sampling = Sampling(do_sample, temperature, top_k, top_p)
    extra, options = session.route(ids.shape[0], adapter=adapter, adapter_names=adapter_names)
    decoding = new_decoding(session, host_run(session, extra, options), mask, max_new_tokens)
    yield from decode(decoding, ids, mask, max_new_tokens=max_new_tokens, pick=host_pick(decoding, sampling, rng),
                      eos=eos, pad_token_id=pad_token_id)


def new_decoding(session: Session, run: Run, mask: np.ndarray, max_new_tokens: int, **options) -> Decoding:
    """The `Decoding` of a decoder file for prompts with attention `mask` [batch, prompt]: its cache strategy
    (`decode_cache`; `options` go to `kvcache.new_cache`, e.g. the GPU loop's `memory`), the longrope recompute
    (`recompute_length`) with a cache, else the whole sequence each step."""
    cache = decode_cache(session, mask, max_new_tokens, **options)
    return Decoding(run, cache, positions="position_ids" in session.input_names,
                    recompute_at=recompute_length(session) if cache is not None else None,
                    renew=lambda grown, remaining: decode_cache(session, grown, remaining, **options))


def _rope_value(session: Session, key: str) -> int | None:
    """An integer field of the file's `road_export.rope` record (None when absent). Raises RoadError for a record
    that is not road-export's JSON or a field that is not a positive integer."""
    meta = session.session.get_modelmeta().custom_metadata_map
    if METADATA_ROPE not in meta:
        return None
    try:
        value = json.loads(meta[METADATA_ROPE]).get(key)
    except (ValueError, AttributeError) as e:
        raise RoadError(f"{session.path.name}: its {METADATA_ROPE} metadata is not road-export's record ({e}); "
                        "export the model again") from e
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise RoadError(f"{session.path.name}: {METADATA_ROPE} {key} must be a positive integer, got {value!r}; "
                        "export the model again")
    return value


def recompute_length(session: Session) -> int | None:
    """The sequence length (padding included) at which generation drops the cache and re-runs the whole sequence:
    the file's `road_export.rope` record's `recompute_cache_at` (transformers' Phi-3 generation does this when the
    length first passes `original_max_position_embeddings`, so that every key uses the long rope factors); None for
    any other file. Raises RoadError for a record that is not road-export's JSON."""
    return _rope_value(session, "recompute_cache_at")


def rope_switch(session: Session) -> int | None:
    """The longrope switch of the file: past this many tokens (the largest position + 1 in a run, over the whole
    batch, as transformers' `longrope_frequency_update`) the graph uses the long factors; None for other files."""
    return _rope_value(session, "original_max_position_embeddings")


def decode_cache(session: Session, mask: np.ndarray, max_new_tokens: int, *, bucketed: bool = False,
                 **options) -> KVCache | None:
    """The key/value cache strategy (`road_export.runtime.kvcache`) for generating `max_new_tokens` after prompts with
    attention `mask` [batch, prompt]; None for a file without a cache. A GroupQueryAttention graph's shared buffer
    holds the longest prompt plus the new tokens (`bucketed`: that rounded up by `kvcache.bucket`, at most the
    context length, so that calls of similar lengths share a size: a static buffer set's, `runtime.graphs`); prompt
    + new tokens past the file's context length (its rotary tables, genai_config.json's `context_length`) raise
    RoadError. `options` go to `kvcache.new_cache`."""
    layout = session.cache_layout  # required by the Session protocol: a missing one must not mean "no cache"
    if layout is None:
        return None
    need = int(mask.sum(-1).max()) + max_new_tokens - 1
    if layout.gqa and layout.context_length and need > layout.context_length:
        raise RoadError(f"a prompt of {int(mask.sum(-1).max())} tokens and max_new_tokens {max_new_tokens} need "
                        f"{need} positions; {session.path.name} holds {layout.context_length} (its context length): "
                        "shorten the prompt or generate fewer tokens")
    if bucketed:
        need = max(need, min(layout.context_length or bucket(need), bucket(need)))
    return new_cache(layout, capacity=need if layout.share_buffer else None, **options)


def generate(session: Session, input_ids, attention_mask=None, **options) -> np.ndarray:
    """The prompt followed by the new tokens, [batch, prompt + new] int64 (options as for `stream`)."""
    ids, _ = _prompt(input_ids, attention_mask)
    new = [step.tokens[:, None] for step in stream(session, input_ids, attention_mask, **options)]
    return np.concatenate([ids, *new], 1)


def _prompt(input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise RoadError(f"input_ids must be integer token ids of shape [batch, prompt], got {ids.dtype} "
                        f"{list(ids.shape)}")
    if 0 in ids.shape:
        raise RoadError(f"input_ids has shape {list(ids.shape)}; give at least one row and one prompt token")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise RoadError(f"attention_mask shape {list(mask.shape)} differs from input_ids shape {list(ids.shape)}; "
                        "give one mask entry per token")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_) or not np.isin(mask, (0, 1)).all():
        raise RoadError(f"attention_mask must hold 0 (padding) and 1 (token) as integers, got {mask.dtype}")
    if not mask.any(-1).all():
        raise RoadError("every row needs at least one token with attention_mask 1")
    return ids.astype(np.int64), mask.astype(np.int64)


def _empty_cache(session: Session, batch: int) -> dict[str, np.ndarray]:
    """Past length 0 for every past_key_values input: the first run is the prefill (`kvcache.KVCache.empty`)."""
    layout = session.cache_layout  # required by the Session protocol: a missing one must not mean "no cache"
    if layout is None:
        return {}
    return new_cache(layout, batch).empty(batch, 0)
