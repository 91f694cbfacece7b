"""Continuous batching over one onnxruntime session: requests for different adapters decode together.

`Engine` is plain Python (numpy, onnxruntime through `RoadSession`; no torch, no Ray, no asyncio). Each `step()`:

1. admits waiting requests while there are free rows (`max_batch_size`): their prompts run as one prefill (left
   padded, an empty cache, each row's `adapter_ids`), which chooses their first token; their `present.*` cache rows
   are then merged into the running batch, the shorter side left padded with zeros and attention_mask 0;
2. runs one decode step for every running row: one token per row, `position_ids` per row (its own count of real
   tokens), `adapter_ids` per row (0: the base, peft's "__base__"), the whole cache as `past_key_values.*`;
3. drops the rows that finished (EOS, `max_tokens`, a stop string, the context length) or were cancelled, and the
   leading cache columns that no remaining row attends to.

Rows join and leave between steps, so a short request never waits for a long one. On CUDA (`io_binding`) each
batch's cache stays in device memory as onnxruntime OrtValues, the run's `present.*` bound as the next `past`.
Each batch is the runtime's decode state (`road_export.runtime.generation.Decoding`: prefill, step, present ->
past) over its `road_export.runtime.kvcache` cache, in the file's layout: road-export's (past [batch, kv_heads, past,
head_dim], attention_mask [batch, past + new] with 0 on left padding, positions from `names.positions`), or a model
builder graph's GroupQueryAttention rows (each row's tokens from position 0, one shared buffer that grows by doubling
up to the context length, `Engine._decoding`). On CUDA a builder graph's decode steps run on static buffers that
onnxruntime records and replays as CUDA graphs (`road_export.runtime.graphs`; on by default there, `cuda_graph`):
each batch leases a buffer set for its rows and buffer size, copied into once when its rows or size change.

A longrope file (Phi-3; the `road_export.rope` record) chooses its rope factors from the largest position of a run,
over the whole batch, as transformers does: every request is generated as transformers' `generate` would generate
it alone, so rows at or below the switch and rows past it run in separate batches, and a row whose sequence reaches
`recompute_cache_at` tokens re-runs its whole sequence with an empty cache, as Phi-3's generation does (a longrope
file without that field moves the row with its cache). A mixed-adapter export (`adapter_ids`) runs all rows in one
onnxruntime run per step; a single-adapter swappable export (`.onnx_adapter` files) runs one batch per adapter,
since onnxruntime activates one adapter set per Run.

Thread safety: `submit` and `cancel` may be called from any thread; `step` from one thread at a time.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from road_export.core.errors import RoadError
from road_export.runtime.generation import Decoding, Run, Sampling, recompute_length, rope_switch
from road_export.runtime.kvcache import KVCache, new_cache
from road_export.core.names import BASE_NAME, PAST
from road_export.app.serving.text import Detokenizer, TextTokenizer

__all__ = ["Engine", "GenerationRequest", "Output", "Recorder", "SamplingParams", "Stats"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates: `max_tokens` new tokens at most; `temperature` 0 is greedy (argmax), above 0 a
    draw from the tempered distribution cut to `top_p` (road_export.runtime.generation.Sampling) with its own
    `numpy.random.default_rng(seed)`, and to the `top_k` likeliest tokens when above 0; `stop` strings end the
    text before them; `ignore_eos` generates past EOS tokens (vLLM's extension, for benchmarks that need a fixed
    length)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    top_k: int = 0  # 0: no limit

    def sampling(self) -> Sampling | None:
        return None if self.temperature == 0 else Sampling(True, self.temperature, self.top_k, self.top_p)


@dataclass
class GenerationRequest:
    """One sequence to generate: `prompt_ids` (token ids, BOS included where the tokenizer adds it) through the
    adapter `model` (an adapter name, or the engine's base name).

    `stream`: True, an `Output` every step (the new token and the text that became certain); False, one `Output`
    when the request finishes, holding all its tokens and text (vLLM's FINAL_ONLY: a non-streaming response has
    nothing to send before, so nothing is delivered and, without stop strings, the text is decoded once)."""

    model: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    arrival: float = field(default_factory=time.perf_counter)
    stream: bool = True


@dataclass
class Output:
    """What one step produced for one request: the new tokens and the text that became certain (for a request with
    `stream=False`, everything, once); `finish_reason` ("stop", "length", "cancelled", or "error" with `error`) on
    the last output of a request."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Recorder(Protocol):
    """Where the engine reports what it does (road_export.app.serving.app's Ray Serve metrics, `Stats` in memory)."""

    def on_step(self, batch_size: int, adapters: int, seconds: float) -> None: ...

    def on_finish(self, model: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None: ...


class Stats:
    """Counters kept in memory: requests and tokens per adapter, decode steps by batch size and adapters per batch."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.finish_reasons: dict[str, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.steps = 0
        self.batch_sizes: dict[int, int] = {}  # rows in a decode run -> how many runs
        self.adapters_per_batch: dict[int, int] = {}  # distinct adapters in a decode run -> how many runs

    def on_step(self, batch_size: int, adapters: int, seconds: float) -> None:
        with self.lock:
            self.steps += 1
            self.batch_sizes[batch_size] = self.batch_sizes.get(batch_size, 0) + 1
            self.adapters_per_batch[adapters] = self.adapters_per_batch.get(adapters, 0) + 1

    def on_finish(self, model: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        with self.lock:
            self.requests[model] = self.requests.get(model, 0) + 1
            self.finish_reasons[finish_reason] = self.finish_reasons.get(finish_reason, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens

    def snapshot(self) -> dict[str, Any]:
        """The counters as JSON-ready dicts (keys as strings)."""
        with self.lock:
            return {"requests": dict(self.requests), "finish_reasons": dict(self.finish_reasons),
                    "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                    "steps": self.steps, "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                    "adapters_per_batch": {str(k): v for k, v in sorted(self.adapters_per_batch.items())}}


@dataclass
class _Row:
    """A running request: its state between steps."""

    request: GenerationRequest
    detok: Detokenizer
    rng: np.random.Generator
    sampling: Sampling | None
    generated: list[int] = field(default_factory=list)
    last: int = 0  # the token fed to the next decode step
    length: int = 0  # real tokens in the cache after the next step's input: prompt + generated
    finish_reason: str | None = None


def _has_cuda() -> bool:
    """Whether this onnxruntime has the CUDA execution provider (without it a CUDA session runs on the CPU)."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _shares_buffer(directory: Path) -> bool:
    """Whether `directory`'s genai_config.json (a model builder directory) shares the past/present buffer
    (`search.past_present_share_buffer`, as onnxruntime-genai reads it): a graph CUDA graphs can replay."""
    import json

    try:
        config = json.loads((directory / "genai_config.json").read_text())
    except (OSError, ValueError):
        return False
    search = config.get("search") if isinstance(config, dict) else None
    return isinstance(search, dict) and search.get("past_present_share_buffer") is True


@dataclass
class _Batch:
    """Rows that run together and their decode state (`road_export.runtime.generation.Decoding` over the file's
    `road_export.runtime.kvcache.KVCache`, one cache row per row)."""

    route: str | None  # None: a mixed-adapter session (adapter_ids per row); else the adapter of every row
    rows: list[_Row] = field(default_factory=list)
    decoding: Decoding | None = None
    selection: tuple | None = None  # (extra feeds, run options, IOBinding run) for these rows; None when they changed


class Engine:
    """Continuous batching of generation requests for many adapters over one model directory (see the module).

    model_dir: a directory written by `road-export ... --mode rotate OUT_DIR` for a decoder with a KV cache
    (text-generation-with-past), with the base model's `tokenizer.json`. `max_batch_size`: rows decoded together.
    `threads`, `native`, `providers`, `session_config`: RoadSession's. `served_model_name`: the name that selects
    the base (default: the directory's name). `recorders`: told about every step and finished request.
    `io_binding`: keep every batch's key/value cache where the session runs, as onnxruntime OrtValues bound through
    IOBinding (`road_export.runtime.gpu.bound_run`), so a step moves only its token ids in and its logits out, not
    the cache; rows joining or leaving a batch move in device memory too (`DeviceMemory`). Default: on for a CUDA
    session (otherwise every step would copy the whole cache to the GPU and back) and for a model builder graph's
    shared buffer on the CPU (`InferenceSession.run` would return a copy of the whole buffer each step: bound, the
    engine decodes 3-10% faster there, at genai's speed; tools/bench_builder.py --engine); off for road-export's own
    decoder files on the CPU, where binding costs 1-6% (it gives the same tokens either way).
    `cuda_graph` (CUDA only): open the session with onnxruntime's CUDA graphs (`enable_cuda_graph`); None (the
    default): for a model builder directory whose genai_config.json shares the past/present buffer
    (`past_present_share_buffer`, GroupQueryAttention: 1.28-1.31x the tokens/s on an H100 at batch 1 and 8,
    docs/builder.md), not for road-export's own files, which onnxruntime cannot record.
    `static_buffers`: each batch's decode steps run on a static buffer set (`road_export.runtime.graphs`), which
    onnxruntime records and replays as CUDA graphs when the session was opened with them; None (the default): on for
    such a session over a builder graph's shared buffer; True elsewhere (the CPU) runs the same steps unrecorded.
    Raises RoadError when the directory cannot be served (one line saying why).
    """

    def __init__(self, model_dir: str | Path, *, max_batch_size: int = 16, threads: int | None = None,
                 native: bool | None = None, providers: Sequence[str] | None = None,
                 served_model_name: str | None = None, recorders: Sequence[Recorder] = (),
                 session_config: dict[str, str] | None = None, io_binding: bool | None = None,
                 static_buffers: bool | None = None, cuda_graph: bool | None = None):
        from road_export.graph.ort_session import CUDA, provider_name
        from road_export.runtime.session import RoadSession

        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise RoadError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        self.directory = Path(model_dir)
        on_cuda = bool(providers) and provider_name(list(providers)[0]) == CUDA
        if cuda_graph and not on_cuda:
            raise RoadError("cuda_graph needs the CUDA execution provider first in providers (serve --device cuda)")
        if on_cuda and (cuda_graph if cuda_graph is not None else _shares_buffer(self.directory) and _has_cuda()):
            from road_export.runtime.gpu import with_cuda_graph

            providers = with_cuda_graph(list(providers or []))
        self.session = RoadSession(self.directory, threads=threads, native=native, providers=providers,
                                   session_config=session_config)
        names = self.session.input_names
        if "input_ids" not in names or "logits" not in self.session.output_names or \
                not any(n.startswith(PAST) for n in names):
            raise RoadError(f"{self.directory}: serving needs a decoder with a KV cache; export it with --task "
                            "text-generation-with-past (a model directory gets it by default)")
        self.tokenizer = TextTokenizer(self.directory)
        config = self._json("config.json")
        generation = self._json("generation_config.json")
        genai = self._json("genai_config.json")
        genai = genai.get("model") if isinstance(genai, dict) else None
        self.context_length = int(config.get("max_position_embeddings") or config.get("n_positions")
                                  or (genai.get("context_length") if isinstance(genai, dict) else None) or 2048)
        eos = generation.get("eos_token_id", config.get("eos_token_id",
                                                        genai.get("eos_token_id") if isinstance(genai, dict) else None))
        if eos is None:
            eos = self.tokenizer.token_id(self.tokenizer.special["eos_token"])
        self.eos_token_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
        self.base_name = served_model_name or self.directory.resolve().name
        self.adapters = list(self.session.adapters)
        if self.base_name in self.adapters:
            raise RoadError(f"the served model name {self.base_name!r} is also an adapter's name; choose another "
                            "with --served-model-name")
        # a mixed export serves the base (adapter id 0); a swappable one its adapters; a merged one the model itself
        self.serves_base = self.session.mixed or not self.adapters
        self.max_batch_size = max_batch_size
        self.recorders = list(recorders)
        self._layout = self.session.cache_layout
        if io_binding is None:
            io_binding = self.session.device == "cuda" or bool(self._layout and self._layout.share_buffer)
        self.io_binding = bool(io_binding)
        self._memory = None
        if self.io_binding:
            from road_export.runtime.gpu import DeviceMemory

            self._memory = DeviceMemory(self.session)
        self._switch, self._recompute_at = rope_switch(self.session), recompute_length(self.session)
        takes = bool(self.io_binding and self._layout and self._layout.share_buffer and self._switch is None)
        from road_export.runtime.graphs import graph_pool, use_static_buffers

        static_buffers = use_static_buffers(
            static_buffers, takes, getattr(self.session, "cuda_graph", False),
            f"{self.directory}: static_buffers needs a model builder graph's shared key/value buffer (no longrope) "
            "and io_binding; leave it unset")
        self._pool = None  # runtime.graphs.GraphPool: each batch's decode steps on static buffers (CUDA graphs)
        if static_buffers:
            assert self._memory is not None
            self._pool = graph_pool(self.session, self._memory.kind, self._memory.device)
        self._waiting: deque[GenerationRequest] = deque()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._batches: dict[tuple[str | None, bool], _Batch] = {}  # (route, past the longrope switch)
        self._ids = itertools.count()

    def _json(self, name: str) -> dict[str, Any]:
        from road_export.graph.files import read_json_object

        path = self.directory / name
        return read_json_object(path, "export the model directory again") if path.is_file() else {}

    # ---- what a server asks before submitting ----

    @property
    def model_names(self) -> list[str]:
        """The names a request may give as `model`: the base (when served) and every adapter."""
        return ([self.base_name] if self.serves_base else []) + self.adapters

    def check(self, request: GenerationRequest) -> None:
        """Raise RoadError when `request` cannot run: unknown model, empty prompt, token ids outside the vocabulary,
        prompt + max_tokens over the context length."""
        if request.model not in self.model_names:
            raise RoadError(f"The model `{request.model}` does not exist; this server has {self.model_names}")
        if not request.prompt_ids:
            raise RoadError("the prompt is empty; give at least one token")
        vocab = self.session.session.get_outputs()[self.session.output_names.index("logits")].shape[-1]
        if isinstance(vocab, int) and not all(0 <= t < vocab for t in request.prompt_ids):
            raise RoadError(f"prompt token ids must lie in [0, {vocab})")
        total = len(request.prompt_ids) + request.params.max_tokens
        if total > self.context_length:
            raise RoadError(f"This model's maximum context length is {self.context_length} tokens. However, you "
                            f"requested {total} tokens ({len(request.prompt_ids)} in the prompt, "
                            f"{request.params.max_tokens} for the completion). Please reduce the prompt or "
                            "max_tokens.")

    # ---- thread-safe entry points ----

    def submit(self, request: GenerationRequest) -> str:
        """Queue `request` (checked first, see `check`); returns its id. Its outputs come from later `step`s."""
        self.check(request)
        if not request.request_id:
            request.request_id = f"req-{next(self._ids)}"
        with self._lock:
            self._waiting.append(request)
        return request.request_id

    def cancel(self, request_id: str) -> None:
        """Stop a request (a client that went away): its row leaves the batch at the next step, freeing the slot."""
        with self._lock:
            self._cancelled.add(request_id)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting) or any(b.rows for b in self._batches.values())

    @property
    def running(self) -> int:
        return sum(len(b.rows) for b in self._batches.values())

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    # ---- the loop ----

    def step(self) -> list[Output]:
        """Admit, decode one token for every running row, drop finished rows; returns this step's outputs."""
        outputs: list[Output] = []
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            kept = deque(r for r in self._waiting if r.request_id not in cancelled)
            outputs += [self._cancel_output(r) for r in self._waiting if r.request_id in cancelled]
            admitted = []
            while kept and self.running + len(admitted) < self.max_batch_size:
                admitted.append(kept.popleft())
            self._waiting = kept
        for batch in self._batches.values():
            for row in batch.rows:
                if row.request.request_id in cancelled:
                    outputs.append(self._finish(row, "cancelled", []))
        for route, group in self._by_route(admitted).items():
            by_phase: dict[bool, list[GenerationRequest]] = {}
            for request in group:
                by_phase.setdefault(self._long(len(request.prompt_ids)), []).append(request)
            for phase, requests in by_phase.items():
                outputs += self._prefill(route, requests, phase)
        crossing = []
        for (route, phase), batch in list(self._batches.items()):
            self._drop_finished(batch)
            if not phase and self._switch is not None:
                crossing += [(route, *moved) for moved in [self._take(batch, self._long)] if moved[0]]
            if batch.rows:
                outputs += self._decode(batch)
                self._drop_finished(batch)
        for route, rows, cache in crossing:  # after the decode: one step per row per call
            outputs += self._cross(route, rows, cache)
        self._batches = {k: b for k, b in self._batches.items() if b.rows}
        return outputs

    def _long(self, length: int) -> bool:
        """Whether a row whose next run ends at `length` tokens runs past the longrope switch (its own batch)."""
        return self._switch is not None and length > self._switch

    def _take(self, batch: _Batch, leaving) -> tuple[list[_Row], KVCache | None]:
        """Remove the rows for which `leaving(row.length)` holds from `batch`: (rows, their cache)."""
        out = [i for i, r in enumerate(batch.rows) if leaving(r.length)]
        if not out:
            return [], None
        keep = [i for i in range(len(batch.rows)) if i not in out]
        assert batch.decoding is not None
        rows, cache = [batch.rows[i] for i in out], copy.copy(batch.decoding.cache)
        cache.keep(out)  # keep() rebinds its arrays: the copy and the batch's cache share nothing after it
        batch.rows, batch.selection = [batch.rows[i] for i in keep], None
        batch.decoding.keep(keep)
        return rows, cache

    def _join(self, route: str | None, phase: bool, rows: list[_Row], cache: KVCache) -> None:
        """Add rows with their cache to the batch of (route, phase)."""
        batch = self._batches.setdefault((route, phase), _Batch(route))
        if batch.decoding is None or not batch.rows:
            batch.decoding = Decoding(self._runner(route, batch=batch), cache)
        else:
            batch.decoding.cache.extend(cache)
        batch.rows, batch.selection = batch.rows + rows, None

    def _cross(self, route: str | None, rows: list[_Row], cache: KVCache) -> list[Output]:
        """Rows whose next step passes the longrope switch join the long batch: with `recompute_cache_at` (Phi-3) by
        running their whole sequence with an empty cache (that run chooses their next token), else with their cache."""
        if self._recompute_at is None or any(r.length != self._recompute_at for r in rows):
            self._join(route, True, rows, cache)
            return []
        ids = np.array([list(r.request.prompt_ids) + r.generated for r in rows], np.int64)
        decoding = self._decoding(self._runner(route, rows))
        try:
            outputs = decoding.prefill(ids, np.ones_like(ids))
        except RoadError as e:
            return [self._finish(r, "error", [], error=str(e)) for r in rows]
        self._join(route, True, rows, decoding.cache)
        return self._advance(rows, *self._chosen(decoding, outputs, rows))

    def _decoding(self, run: Run) -> Decoding:
        """A decode state over a new cache in the file's layout; a shared buffer (a builder graph's) starts at the
        prompts' width rounded up and doubles as rows grow, up to the context length (`runtime.kvcache.bucket`):
        onnxruntime's CUDA GroupQueryAttention pays per step for the whole buffer, so one of the context length would
        cost every step of short rows; rows that join a batch are padded to the wider buffer."""
        limit = self.context_length if self._layout.share_buffer else None
        return Decoding(run, new_cache(self._layout, limit=limit, memory=self._memory))

    def _by_route(self, requests: list[GenerationRequest]) -> dict[str | None, list[GenerationRequest]]:
        groups: dict[str | None, list[GenerationRequest]] = {}
        for request in requests:
            route = None if self.session.mixed else request.model
            groups.setdefault(route, []).append(request)
        return groups

    def _route(self, route: str | None, rows: Sequence[_Row | GenerationRequest]):
        """(extra feeds, run options) for rows: adapter_ids per row, or the swapped adapter of the batch."""
        if route == self.base_name:
            return {}, None  # a merged or base-only export: the model itself
        names = None if route is not None else \
            [self._adapter_name(r.request.model if isinstance(r, _Row) else r.model) for r in rows]
        if self.io_binding:  # a swapped adapter's coefficients as bound inputs (IOBinding takes no run options)
            from road_export.runtime.gpu import route as device_route

            return device_route(self.session, len(rows), adapter=route, adapter_names=names), None
        return self.session.route(len(rows), adapter=route, adapter_names=names)

    def _selection(self, route: str | None, rows: Sequence[_Row | GenerationRequest]):
        """(extra feeds, run options, the IOBinding run or None) for rows (`_route`): one IOBinding while a batch's
        rows stay, so that the values bound last step and bound again unchanged (a shared buffer) are not rebound."""
        extra, options = self._route(route, rows)
        if not self.io_binding:
            return extra, options, None
        from road_export.runtime.gpu import bound_run

        assert self._memory is not None
        return extra, options, bound_run(self.session, extra, self._memory.kind, self._memory.device, pool=self._pool)

    def _adapter_name(self, model: str) -> str:
        return BASE_NAME if model == self.base_name else model

    def _runner(self, route: str | None, rows: Sequence[_Row | GenerationRequest] = (), *,
                batch: _Batch | None = None) -> Run:
        """The decode loop's run (`road_export.runtime.generation.Run`) for `rows`, or for whatever rows `batch` holds
        at each run (their adapter selection kept in `batch.selection` while the rows stay): the adapters' feeds and run
        options added, each run told to the recorders."""

        def run(feeds: dict[str, Any], shared=None) -> dict[str, Any]:
            if batch is not None:
                batch.selection = batch.selection or self._selection(route, batch.rows)
                extra, options, bound = batch.selection
                now: Sequence[_Row | GenerationRequest] = batch.rows
            else:
                (extra, options, bound), now = self._selection(route, rows), rows
            started = time.perf_counter()
            if bound is not None:
                outputs = bound(feeds, shared or {})
            else:
                feeds.update(extra)
                values = self.session.run_feeds(None, feeds, options)
                outputs = dict(zip(self.session.output_names, values, strict=True))
            adapters = len({r.request.model if isinstance(r, _Row) else r.model for r in now})
            for recorder in self.recorders:
                recorder.on_step(len(now), adapters, time.perf_counter() - started)
            return outputs

        return run

    def _prefill(self, route: str | None, requests: list[GenerationRequest], phase: bool = False) -> list[Output]:
        """One run over the new prompts (left padded), first tokens chosen, cache rows merged into the batch."""
        width = max(len(r.prompt_ids) for r in requests)
        ids = np.zeros((len(requests), width), np.int64)
        mask = np.zeros((len(requests), width), np.int64)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt_ids):] = r.prompt_ids
            mask[i, width - len(r.prompt_ids):] = 1
        rows = [_Row(r, Detokenizer(self.tokenizer, r.params.stop, incremental=r.stream, prompt=r.prompt_ids),
                     np.random.default_rng(r.params.seed), r.params.sampling(), length=len(r.prompt_ids))
                for r in requests]
        decoding = self._decoding(self._runner(route, requests))
        try:
            outputs = decoding.prefill(ids, mask)
        except RoadError as e:
            return [Output(r.request_id, [], "", "error", len(r.prompt_ids), 0, error=str(e)) for r in requests]
        self._join(route, phase, rows, decoding.cache)
        return self._advance(rows, *self._chosen(decoding, outputs, rows))

    def _decode(self, batch: _Batch) -> list[Output]:
        """One token for every row of `batch`."""
        rows = batch.rows
        assert batch.decoding is not None
        try:
            outputs = batch.decoding.step(np.array([r.last for r in rows], np.int64))
        except RoadError as e:
            return [self._finish(r, "error", [], error=str(e)) for r in rows]
        return self._advance(rows, *self._chosen(batch.decoding, outputs, rows))

    def _chosen(self, decoding: Decoding, outputs: dict[str, Any], rows: Sequence[_Row]
                ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(each row's last logits [rows, vocab] on the host, None), or, on CUDA when every row is greedy and the
        logits' last position is every row's last token, (None, the greedy ids [rows]) chosen on the GPU
        (`runtime.gpu.GreedySelector`: the logits stay there)."""
        logits = outputs["logits"]
        if isinstance(logits, np.ndarray):
            return decoding.last_logits(outputs), None
        if (self._memory is not None and self._memory.kind == "cuda" and decoding.aligned
                and all(r.sampling is None for r in rows)):
            from road_export.runtime.gpu import greedy_selector

            return None, greedy_selector(self.session)(logits)
        return decoding.last_logits({"logits": logits.numpy()}), None

    def _advance(self, rows: list[_Row], logits: np.ndarray | None, greedy: np.ndarray | None = None
                 ) -> list[Output]:
        """Choose each row's next token from its logits [rows, vocab] (or take `greedy`, the ids [rows] chosen where
        the logits are); emit text; finish rows that are done."""
        if greedy is None:
            assert logits is not None
            logits = logits.astype(np.float32, copy=False)
            greedy = logits.argmax(-1)
        outputs = []
        for i, row in enumerate(rows):
            try:
                token = int(greedy[i]) if row.sampling is None else \
                    int(row.sampling.choose(logits[i:i + 1], row.rng)[0])
            except Exception as e:  # this row's sampling (its parameters): it alone fails, the batch goes on
                outputs.append(self._finish(row, "error", [], error=f"sampling failed: {type(e).__name__}: {e}"))
                continue
            row.generated.append(token)
            row.last = token
            row.length += 1
            if token in self.eos_token_ids and not row.request.params.ignore_eos:
                outputs.append(self._finish(row, "stop", [token]))
                continue
            text = row.detok.add(token)
            if row.detok.stopped:
                outputs.append(self._finish(row, "stop", [token], text))
            elif len(row.generated) >= row.request.params.max_tokens or row.length >= self.context_length:
                outputs.append(self._finish(row, "length", [token], text))
            elif row.request.stream:
                outputs.append(Output(row.request.request_id, [token], text))
        return outputs

    def _finish(self, row: _Row, reason: str, tokens: list[int], text: str = "", error: str | None = None
                ) -> Output:
        row.finish_reason = reason  # _drop_finished removes the row
        if reason in ("stop", "length"):
            text += row.detok.finish()
        if not row.request.stream:  # the one output of the request: all of it
            tokens, text = list(row.generated), row.detok.text
        for recorder in self.recorders:
            recorder.on_finish(row.request.model, reason, len(row.request.prompt_ids), len(row.generated))
        return Output(row.request.request_id, tokens, text, reason, len(row.request.prompt_ids), len(row.generated),
                      error)

    def _cancel_output(self, request: GenerationRequest) -> Output:
        for recorder in self.recorders:
            recorder.on_finish(request.model, "cancelled", len(request.prompt_ids), 0)
        return Output(request.request_id, [], "", "cancelled", len(request.prompt_ids), 0)

    def _drop_finished(self, batch: _Batch) -> None:
        keep = [i for i, r in enumerate(batch.rows) if r.finish_reason is None]
        if len(keep) == len(batch.rows):
            return
        batch.rows, batch.selection = [batch.rows[i] for i in keep], None
        assert batch.decoding is not None
        batch.decoding.keep(keep)
