"""The key/value cache of a decoder's decode loop, in the two layouts onnxruntime decoders take; torch-free.

A decode loop (`road_export.runtime.generation.stream`, the GPU loop in `road_export.runtime.gpu`, the serving engine's
continuous batching) asks its cache for each run's feeds and hands it each run's outputs; the cache knows how the
file wants the rows laid out. Two strategies:

- `PaddedCache`: road-export's and optimum's decoder exports (attention as ordinary ops over an explicit mask).
  Rows are left padded (attention_mask 0 on the padding), `position_ids` (where the file takes them) count each
  row's real tokens, the past grows by one column a step: each run's `present.*` is the next run's
  `past_key_values.*` (the graph concatenates).
- `GqaCache`: onnxruntime-genai model builder graphs, whose attention is `com.microsoft.GroupQueryAttention`. The
  graph derives `seqlens_k` (real tokens - 1 per row) and `total_sequence_length` (the mask's width) from
  `attention_mask` and places each row's new keys/values at its own length, with rotary positions from the same
  count. So a row's tokens start at position 0 and padding goes after them (right padding): a left-padded prompt
  is moved left before the prefill, and the logits of a row's last real token are read at its own length.
  With `past_present_share_buffer` (genai_config.json's `search` section; the builder's default) the past is one
  buffer of `capacity` positions that the run writes in place (`present.*` is the same buffer: bind it as the
  output on IOBinding, `shared_outputs`); otherwise the past grows to the longest row. A shared buffer given a
  `limit` instead of a fixed capacity (the serving engine: rows of unknown length join and leave) starts at the
  prompt's width rounded up (`bucket`) and doubles, zero-padded, when a row would pass its end, up to `limit`:
  onnxruntime's CUDA GroupQueryAttention pays per step for the buffer's positions, not only for the rows' tokens,
  so a buffer of the whole context costs a decode step more than one of the rows' lengths.
  onnxruntime's GroupQueryAttention refuses several new tokens per row on top of a past for batch > 1 ("batch_size
  must be 1 when sequence_length > 1 and past context is given"): `GQA_CHUNK_RULE` says so where a caller must skip.

`cache_layout(session)` reads which one a file takes, `new_cache(layout, ...)` makes one. Mirrors onnxruntime-genai's
`KV_Cache` (src/models/kv_cache.cpp: `past_present_share_buffer`, the buffer of `max_length`) and its position
inputs for models without `position_ids` (src/models/position_inputs.cpp), and onnxruntime's GroupQueryAttention
contract (docs/ContribOperators.md: `seqlens_k`, `total_sequence_length`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from road_export.core.errors import RoadError, first_line
from road_export.core.names import PAST, PRESENT, positions
from road_export.graph.ort_session import NUMPY_TYPES as ORT_TYPES, value_shape

__all__ = ["GQA_CHUNK_RULE", "CacheLayout", "GqaCache", "KVCache", "PaddedCache", "cache_layout", "file_layout",
           "HostMemory", "bucket", "host", "new_cache", "with_share_buffer"]

NUMPY_TYPES = {**ORT_TYPES, "tensor(bfloat16)": np.float32}  # a bfloat16 cache is fed as float32 here
GQA_CHUNK_RULE = ("onnxruntime's GroupQueryAttention takes several new tokens on top of a past for batch 1 only "
                  "(batch_size must be 1 when sequence_length > 1 and past context is given)")
GENAI_CONFIG = "genai_config.json"


@dataclass(frozen=True)
class CacheLayout:
    """How a decoder file takes its key/value cache.

    pairs: (past input, present output) names; shapes: {past input: (kv_heads, head_size)}; dtype: the cache's
    numpy type. gqa: GroupQueryAttention rows (right padding, see the module) rather than left-padded rows.
    share_buffer: past and present are one buffer of `capacity` positions (GQA only). positions: the file takes
    `position_ids`. context_length: the most positions the file's position tables hold (None if unknown).
    """

    pairs: tuple[tuple[str, str], ...]
    shapes: Mapping[str, tuple[int, int]]
    dtype: Any
    gqa: bool = False
    share_buffer: bool = False
    positions: bool = False
    context_length: int | None = None

    @property
    def name(self) -> str:
        return ("gqa-shared" if self.share_buffer else "gqa") if self.gqa else "padded"


def _genai_config(path: Path) -> dict:
    """The genai_config.json of the model file at `path`: beside it (the builder's directory), or above its `onnx/`
    folder (a model directory `road-export --graph builder` wrote, whose config names onnx/model.onnx); {} if none."""
    file = path.with_name(GENAI_CONFIG)
    if not file.is_file() and path.parent.name == "onnx":
        file = path.parent.with_name(GENAI_CONFIG)
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except ValueError as e:
        raise RoadError(f"{file}: not JSON ({e}); fix or remove it") from e
    return data if isinstance(data, dict) else {}


def _graph_facts(path: Path) -> tuple[list, Any]:
    """The GroupQueryAttention nodes and the graph of the file at `path` (weights not read)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise RoadError(f"{path}: cannot read it as ONNX ({first_line(e)})") from e
    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    return nodes, model.graph


def _gqa_head_size(path: Path, nodes: list, graph) -> int | None:
    """head_size from the first GroupQueryAttention: its query's producing MatMul (through a bias Add), whose output
    width is (num_heads + 2 kv_num_heads) * head_size packed, or num_heads * head_size unpacked."""
    import onnx

    node = nodes[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    heads, kv_heads = int(attrs.get("num_heads", 0)), int(attrs.get("kv_num_heads", 0))
    packed = len(node.input) < 3 or not node.input[1]
    producers = {o: n for n in graph.node for o in n.output}
    dims = {i.name: list(i.dims) for i in graph.initializer}
    current = producers.get(node.input[0])
    for _ in range(4):
        if current is None:
            return None
        if current.op_type == "MatMul" and current.input[1] in dims:
            width = dims[current.input[1]][-1]
            break
        if current.op_type == "MatMulNBits":
            width = next(int(onnx.helper.get_attribute_value(a)) for a in current.attribute if a.name == "N")
            break
        current = producers.get(current.input[0])
    else:
        return None
    parts = heads + 2 * kv_heads if packed else heads
    return width // parts if parts and width % parts == 0 else None


def cache_layout(session) -> CacheLayout | None:
    """The cache layout of `session` (a RoadSession: `path`, `session`), None without a cache: `file_layout`."""
    return file_layout(session.path, session.session)


def file_layout(path: str | Path, ort_session) -> CacheLayout | None:
    """The cache layout of the ONNX file at `path` opened as `ort_session` (onnxruntime.InferenceSession), None
    without a cache or with past inputs that have no present output of the same name (an encoder-decoder part).

    GroupQueryAttention in the graph makes it a `GqaCache` file; its `past_present_share_buffer` comes from
    genai_config.json beside the file (true when there is none: the builder's default), head_size from the
    config's `decoder.head_size` or the attention's query projection. Raises RoadError for a past input whose
    head counts or head size cannot be known."""
    path = Path(path)
    inputs = {i.name: i for i in ort_session.get_inputs()}
    past = [n for n in inputs if n.startswith(PAST)]
    if not past:
        return None
    outputs = {o.name for o in ort_session.get_outputs()}
    pairs = tuple((n, PRESENT + n[len(PAST):]) for n in past if PRESENT + n[len(PAST):] in outputs)
    if len(pairs) != len(past):
        return None  # an encoder-decoder part's cross-attention past has no present: Seq2SeqSession drives it
    nodes, graph = _graph_facts(path) if path.is_file() else ([], None)
    genai = _genai_config(path)
    model = genai.get("model", {}) if isinstance(genai.get("model"), dict) else {}
    decoder = model.get("decoder", {}) if isinstance(model.get("decoder"), dict) else {}
    search = genai.get("search", {}) if isinstance(genai.get("search"), dict) else {}
    head_size = decoder.get("head_size")
    if nodes and not isinstance(head_size, int):
        head_size = _gqa_head_size(path, nodes, graph)
    shapes = {}
    for name in past:
        shape = inputs[name].shape
        kv_heads = shape[1] if len(shape) == 4 else None
        size = shape[3] if len(shape) == 4 and isinstance(shape[3], int) else head_size
        if not isinstance(kv_heads, int) or not isinstance(size, int):
            raise RoadError(f"{name} has shape {shape}; expected [batch, kv_heads, past_sequence, head_dim] with "
                            "known kv_heads and head_dim (a builder graph: keep its genai_config.json beside it)")
        shapes[name] = (kv_heads, size)
    dtype = NUMPY_TYPES.get(inputs[past[0]].type, np.float32)
    context = model.get("context_length")
    return CacheLayout(pairs, shapes, dtype, gqa=bool(nodes),
                       share_buffer=bool(nodes) and bool(search.get("past_present_share_buffer", True)),
                       positions="position_ids" in inputs,
                       context_length=int(context) if isinstance(context, int) else None)


def _prompt_rows(ids: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    rows = []
    for row, m in zip(ids, mask, strict=True):
        real = np.flatnonzero(m)
        if real.size and real[-1] - real[0] + 1 != real.size:
            raise RoadError("attention_mask has padding between tokens of a row; give each row's tokens together "
                            "(left or right padded)")
        rows.append(row[real])
    return rows


class KVCache:
    """A batch's key/value cache and attention bookkeeping for a decode loop (see the module).

    `prefill(ids, mask)` -> the prompt's feeds (ids, mask [rows, prompt] int64, 0 on padding on either side);
    `step(tokens)` -> feeds for one new token per row [rows]; `update(outputs)` takes a run's `present.*`
    ({name: numpy array or OrtValue}); `last_logits(logits)` -> [rows, vocab], each row's last real token.
    `keep(indices)` and `extend(other)` drop and append rows (continuous batching). `past` holds the
    `past_key_values.*` values the next run takes; `lengths` [rows] the real tokens each row has in the cache after
    the next run.

    `memory` keeps the past values the cache makes (zeros) and moves rows (`keep`, `extend`): `HostMemory`, numpy
    arrays, by default; a decode loop on IOBinding gives `road_export.runtime.gpu.DeviceMemory`, onnxruntime
    OrtValues where the session runs, moved there."""

    def __init__(self, layout: CacheLayout, rows: int, *, capacity: int | None = None, limit: int | None = None,
                 memory: HostMemory | None = None):
        self.layout = layout
        self.rows = rows
        self.capacity = capacity
        self.limit = limit
        self.memory = memory or HostMemory()
        self.past: dict[str, Any] = {}
        self.lengths = np.zeros(rows, np.int64)
        self._new = 0  # tokens per row in the last feeds

    def empty(self, rows: int, width: int) -> dict[str, Any]:
        return {name: self.memory.zeros((rows, heads, width, size), self.layout.dtype)
                for name, (heads, size) in self.layout.shapes.items()}

    def update(self, outputs: Mapping[str, Any]) -> None:
        self.past = {past: outputs[present] for past, present in self.layout.pairs}

    @property
    def aligned(self) -> bool:
        """Whether every row's last real token of the last feeds is the logits' last position."""
        return True

    def shared_outputs(self) -> dict[str, Any]:
        """{present output: the value to bind as it} where the run writes into the past in place (IOBinding)."""
        return {}

    def prefill(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def step(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def last_logits(self, logits: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def keep(self, indices: Sequence[int]) -> None:
        raise NotImplementedError

    def extend(self, other: KVCache) -> None:
        raise NotImplementedError


class PaddedCache(KVCache):
    """Left-padded rows, an explicit attention mask, a past that grows by the graph's concatenation."""

    def __init__(self, layout: CacheLayout, rows: int, **options):
        super().__init__(layout, rows, **options)
        self.mask = np.zeros((rows, 0), np.int64)

    def prefill(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        rows = _prompt_rows(ids, mask)
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        self.mask = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = row
            self.mask[i, width - len(row):] = 1
        self.rows, self.lengths, self._new = len(rows), self.mask.sum(-1), width
        self.past = self.empty(len(rows), 0)
        return self._feeds(ids)

    def step(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        self.mask = np.concatenate([self.mask, np.ones((self.rows, 1), np.int64)], 1)
        self.lengths = self.lengths + 1
        self._new = 1
        return self._feeds(np.asarray(tokens, np.int64).reshape(self.rows, 1))

    def _feeds(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"input_ids": ids, "attention_mask": self.mask, **self.past}
        if self.layout.positions:
            feeds["position_ids"] = np.ascontiguousarray(positions(self.mask)[:, -ids.shape[1]:])
        return feeds

    def last_logits(self, logits: np.ndarray) -> np.ndarray:
        return logits[:, -1]

    def keep(self, indices: Sequence[int]) -> None:
        indices = list(indices)
        self.rows, self.lengths = len(indices), self.lengths[indices]
        if not indices:
            self.mask, self.past = np.zeros((0, 0), np.int64), {}
            return
        mask = self.mask[indices]
        start = int(np.argmax(mask.any(0)))  # leading columns no remaining row attends to
        self.mask = np.ascontiguousarray(mask[:, start:])
        self.past = {k: self.memory.take(v, indices, start) for k, v in self.past.items()}

    def extend(self, other: KVCache) -> None:
        assert isinstance(other, PaddedCache)
        if not self.rows:
            self.rows, self.mask, self.past, self.lengths = other.rows, other.mask, other.past, other.lengths
            return
        width = max(self.mask.shape[1], other.mask.shape[1])

        def pad(mask: np.ndarray) -> np.ndarray:  # left padding to `width`
            return np.pad(mask, [(0, 0), (width - mask.shape[1], 0)])

        self.past = {k: self.memory.join(v, other.past[k], width, left=True) for k, v in self.past.items()}
        self.mask = np.concatenate([pad(self.mask), pad(other.mask)], 0)
        self.rows, self.lengths = self.rows + other.rows, np.concatenate([self.lengths, other.lengths])


class GqaCache(KVCache):
    """GroupQueryAttention rows: tokens from position 0, padding after; a shared buffer or a growing past."""

    def _mask(self) -> np.ndarray:
        width = int(self.lengths.max(initial=0))
        return (np.arange(width)[None, :] < self.lengths[:, None]).astype(np.int64)

    def _make_room(self) -> None:
        """Make the shared buffer hold every row's next run: grow it (up to `limit`) or refuse (a fixed capacity)."""
        longest = int(self.lengths.max(initial=0))
        if not self.layout.share_buffer or self.capacity is None or longest <= self.capacity:
            return
        if self.limit is not None and longest <= self.limit:
            width = min(self.limit, bucket(longest))
            self.past = {k: self.memory.grow(v, width) for k, v in self.past.items()}
            self.capacity = width
            return
        held = self.capacity if self.limit is None else self.limit
        raise RoadError(f"a row needs {longest} cache positions; the shared key/value buffer holds {held} "
                        "(max_length): generate fewer tokens or give a larger capacity")

    def prefill(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        rows = _prompt_rows(ids, mask)
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
        self.rows, self.lengths, self._new = len(rows), np.array([len(r) for r in rows], np.int64), width
        if self.layout.share_buffer:
            if self.capacity is None:
                self.capacity = width if self.limit is None else min(self.limit, bucket(width + 1))
            self._make_room()
            self.past = self.empty(len(rows), self.capacity)
        else:
            self.past = self.empty(len(rows), 0)
        return {"input_ids": ids, "attention_mask": self._mask(), **self.past}

    def step(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        self.lengths = self.lengths + 1
        self._new = 1
        self._make_room()
        return {"input_ids": np.asarray(tokens, np.int64).reshape(self.rows, 1), "attention_mask": self._mask(),
                **self.past}

    def update(self, outputs: Mapping[str, Any]) -> None:
        if self.layout.share_buffer:
            # bound as the output (IOBinding, `shared_outputs`): the run wrote into the past buffer and returns it (the
            # same object: `road_export.runtime.gpu.bound_run`), or a static set's buffer it copied the past into and
            # wrote (`road_export.runtime.graphs`), the past from now on; from InferenceSession.run: a numpy copy of
            # the written buffer, the next run's past
            for past, present in self.layout.pairs:
                if present in outputs:
                    self.past[past] = outputs[present]
            return
        super().update(outputs)

    def shared_outputs(self) -> dict[str, Any]:
        if not self.layout.share_buffer:
            return {}
        return {present: self.past[past] for past, present in self.layout.pairs}

    @property
    def aligned(self) -> bool:
        return self._new == 1 or bool((self.lengths == self._new).all())

    def last_logits(self, logits: np.ndarray) -> np.ndarray:
        if self.aligned:
            return logits[:, -1]
        return np.asarray(logits)[np.arange(self.rows), self.lengths - 1]

    def keep(self, indices: Sequence[int]) -> None:
        indices = list(indices)
        self.rows, self.lengths = len(indices), self.lengths[indices]
        if not indices:
            self.past = {}
            return
        width = None if self.layout.share_buffer else int(self.lengths.max())
        self.past = {k: self.memory.take(v, indices, 0, width) for k, v in self.past.items()}

    def extend(self, other: KVCache) -> None:
        assert isinstance(other, GqaCache)
        if not self.rows:
            self.rows, self.past, self.lengths, self.capacity = other.rows, other.past, other.lengths, other.capacity
            return
        width = max(self.memory.shape(v)[2] for v in [*self.past.values(), *other.past.values()])
        self.past = {k: self.memory.join(v, other.past[k], width, left=False) for k, v in self.past.items()}
        self.rows, self.lengths = self.rows + other.rows, np.concatenate([self.lengths, other.lengths])
        if self.layout.share_buffer:
            self.capacity = width


def host(value: Any) -> np.ndarray:
    """A past value in host memory: a numpy array as it is, an onnxruntime OrtValue copied out (`.numpy()`)."""
    return value if isinstance(value, np.ndarray) else value.numpy() if hasattr(value, "numpy") else np.asarray(value)


class HostMemory:
    """Where a cache keeps its past values [rows, kv_heads, positions, head_dim] and how it moves their rows: numpy
    arrays in host memory (an OrtValue given to it is copied out first). `road_export.runtime.gpu.DeviceMemory` does
    the same on onnxruntime OrtValues where a session runs."""

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """A zero past value of `shape` and numpy `dtype`."""
        return np.zeros(shape, dtype)

    def shape(self, value: Any) -> tuple[int, ...]:
        """The shape of a past value (a numpy array or an OrtValue)."""
        return value_shape(value)

    def take(self, value: Any, rows: Sequence[int], start: int = 0, stop: int | None = None) -> Any:
        """value[rows][:, :, start:stop]: some rows, and the positions from `start` to `stop` (None: the end)."""
        return np.ascontiguousarray(host(value)[list(rows)][:, :, start:stop])

    def grow(self, value: Any, width: int) -> Any:
        """`value` with zeros after its positions, to `width` positions (a shared buffer grown)."""
        x = host(value)
        return np.pad(x, [(0, 0), (0, 0), (0, width - x.shape[2]), (0, 0)])

    def join(self, first: Any, second: Any, width: int, *, left: bool) -> Any:
        """The rows of `first` then of `second`, each padded with zeros to `width` positions, on the left (`left`) or
        the right."""

        def pad(x: np.ndarray) -> np.ndarray:
            more = width - x.shape[2]
            return np.pad(x, [(0, 0), (0, 0), (more, 0) if left else (0, more), (0, 0)]) if more else x

        return np.concatenate([pad(host(first)), pad(host(second))], 0)


def new_cache(layout: CacheLayout, rows: int = 0, *, capacity: int | None = None, limit: int | None = None,
              memory: HostMemory | None = None) -> KVCache:
    """A cache of `layout`'s strategy for `rows` rows. `capacity`: the shared buffer's positions (GQA with a shared
    buffer; default the prompt's width, or with `limit` its `bucket`); `limit`: the most positions the shared buffer
    grows to, doubling when a row would pass its end (None: a row past `capacity` is refused); `memory`: where its
    past values are kept and moved (default `HostMemory`; an IOBinding loop gives
    `road_export.runtime.gpu.DeviceMemory`)."""
    kind = GqaCache if layout.gqa else PaddedCache
    return kind(layout, rows, capacity=capacity, limit=limit, memory=memory)


SMALLEST_BUFFER = 128
"""The fewest positions `bucket` gives a growing shared buffer."""


def bucket(positions: int) -> int:
    """The shared buffer's size for `positions`: the next power of two, at least `SMALLEST_BUFFER` (so that a
    growing buffer doubles, and is copied O(log n) times over a row's life)."""
    return max(SMALLEST_BUFFER, 1 << max(0, positions - 1).bit_length())


def with_share_buffer(layout: CacheLayout, share: bool) -> CacheLayout:
    """`layout` with the shared buffer on or off (GroupQueryAttention takes both)."""
    if share and not layout.gqa:
        raise RoadError("only a GroupQueryAttention graph (onnxruntime-genai's builder) takes a shared past/present "
                        "buffer")
    return replace(layout, share_buffer=share)
