"""CUDA graphs for the decode steps of a model builder graph, as onnxruntime-genai's generator replays them.

onnxruntime's CUDA provider (`enable_cuda_graph`, `road_export.runtime.gpu.cuda_providers(cuda_graph=True)`) records
a run as one CUDA graph and replays it, skipping the host's per-node work, when the run option `gpu_graph_id` names
a graph (-1: run without one; each id is recorded after its own warm-up runs). A replay reads and writes the very
device buffers the recording saw, so every input and output must be bound to the same OrtValue, of the same shape,
on every run of that id. A decode step of a builder graph (GroupQueryAttention with one past/present buffer) can be
given that form, which is what genai does with `enable_cuda_graph`:

- `input_ids` [rows, 1] (and any other per-token input) in a buffer written in place each step;
- `attention_mask` [rows, capacity]: each row's tokens then zeros, written in place. GroupQueryAttention takes
  the rows' lengths from its sum (`seqlens_k`) and the buffer's size from its width (`total_sequence_length`),
  so the positions after a row's tokens are never read;
- `adapter_ids` [rows] (a mixed export) in a buffer, and a swapped adapter's coefficients (OrtValues already on
  the device, `road_export.runtime.gpu.route`) bound as they are;
- the key/value buffers [rows, kv_heads, capacity, head_size], bound as `past_key_values.*` and as `present.*`;
- `logits` [rows, 1, vocab].

`GraphPool` keeps such buffer sets (`StaticStep`), one graph id each, by (rows, capacity, adapters). A decode loop
leases one (`StaticStep` is its holder's while the holder lives or until it leases another), copies its cache
into the set's key/value buffers when they are not already its past (once, after the prefill or after rows moved:
one onnxruntime run of Identity nodes on the device), and from then on the set's buffers are its past
(`KVCache.update` takes the returned `present.*`). The prefill, whose width changes, runs without a graph.

On a CPU session (or CUDA without `enable_cuda_graph`), the same static-buffer steps run without recording
(`capture=False`): the tests drive every step of this module on the CPU that way.

The pool keeps at most `most` buffer sets per session (16), dropping the least recently used free one for a new
shape, and makes at most `recorded` sets in all (64): onnxruntime keeps a recorded graph for the session's life (its
CUDA provider has no call to drop one), so a dropped set's graph stays recorded; past that, new shapes decode without
a graph. Thread safety: the pool's lock serialises the runs of its session that go through `bound_run` (onnxruntime's
graph replay is not thread safe), and a set is its holder's alone.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np

from road_export.core.errors import RoadError, is_onnxruntime_error
from road_export.graph.ort_session import CUDA, NUMPY_TYPES, run_failure, value_shape

logger = logging.getLogger(__name__)

GRAPH_ID = "gpu_graph_id"
"""onnxruntime's run config key naming the CUDA graph a run records or replays; "-1" runs without one."""

MOST_GRAPHS = 16
"""The most static buffer sets a session's `GraphPool` keeps; past it, the least recently used free set is dropped."""

MOST_RECORDED = 64
"""The most sets (so recorded CUDA graphs) a session's `GraphPool` ever makes: onnxruntime's CUDA provider keeps a
recorded graph for the session's life (it has no call to drop one), so a dropped set's graph stays recorded."""


def asks_graphs(options: Mapping[str, Any]) -> bool:
    """Whether CUDA provider options ({name: value}, as given or as onnxruntime reports them) turn on its CUDA graphs
    (`enable_cuda_graph`)."""
    return str(options.get("enable_cuda_graph", "0")).lower() in ("1", "true")


def graphs_enabled(session) -> bool:
    """Whether `session` (a RoadSession) was opened with onnxruntime's CUDA graphs (`enable_cuda_graph` in the CUDA
    provider's options); `RoadSession.cuda_graph` holds the answer for a session on CUDA."""
    return asks_graphs(session.session.get_provider_options().get(CUDA) or {})


def use_static_buffers(static_buffers: bool | None, takes: bool, records: bool, refusal: str) -> bool:
    """Whether a decode loop runs on static buffer sets: `static_buffers` as asked (None: where the session `records`
    CUDA graphs and the loop `takes` them). Raises RoadError for anything but a bool or None, and, with `refusal` (the
    line saying what is missing), for True where the loop does not take them."""
    if static_buffers is not None and not isinstance(static_buffers, bool):
        raise RoadError(f"static_buffers must be True, False or None, got {static_buffers!r}")
    if static_buffers is None:
        return takes and records
    if static_buffers and not takes:
        raise RoadError(refusal)
    return static_buffers


def without_graph(options=None):
    """`options` (onnxruntime RunOptions, or None for new ones) set to run without recording or replaying a CUDA
    graph (`gpu_graph_id` -1): on a session with `enable_cuda_graph`, a run with default options is recorded as
    graph 0 on whatever buffers it had, and later runs would replay it on those."""
    import onnxruntime as ort

    options = options if options is not None else ort.RunOptions()
    options.add_run_config_entry(GRAPH_ID, "-1")
    return options


@functools.cache
def _copy_model(count: int, element_type: int) -> bytes:
    """y_i = Identity(x_i) for i < count, tensors of ONNX `element_type` and any shape: one run copies a cache's
    key/value buffers into a static set's (outputs bound to them)."""
    from onnx import helper

    nodes = [helper.make_node("Identity", [f"x{i}"], [f"y{i}"]) for i in range(count)]
    inputs = [helper.make_tensor_value_info(f"x{i}", element_type, ["b", "h", "s", "d"]) for i in range(count)]
    outputs = [helper.make_tensor_value_info(f"y{i}", element_type, ["b", "h", "s", "d"]) for i in range(count)]
    graph = helper.make_graph(nodes, "copy", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


class StaticStep:
    """One static buffer set of a `GraphPool` (see the module): the decode step's inputs, key/value buffers and logits
    as OrtValues where the session runs, bound once to their own IOBinding, and the graph id its runs replay.

    `key`: (rows, capacity, the other feeds' names and shapes, the adapter inputs' names and identities).
    `past`: {present output: its buffer [rows, kv_heads, capacity, head_size]}, also bound as the matching past
    input."""

    def __init__(self, pool: GraphPool, key: tuple, feeds: Mapping[str, Any], shared: Mapping[str, Any],
                 selected: Mapping[str, Any], graph_id: int):
        import onnxruntime as ort

        kind, dev = pool.kind, pool.device
        self.pool, self.key, self.graph_id = pool, key, graph_id
        self.holder: weakref.ref | None = None
        self.used = 0  # the pool's lease count when it was last leased (least recently used goes first)
        rows, capacity = key[0], key[1]
        types = pool.input_types

        def zeros(shape, dtype) -> Any:
            return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), kind, dev)

        layout = pool.layout
        self.pairs = list(layout.pairs)
        self.past = {present: zeros(value_shape(shared[present]), layout.dtype) for _, present in self.pairs}
        past_names = {past for past, _ in self.pairs}
        self.mask = np.zeros((rows, capacity), types.get("attention_mask", np.int64))
        self.inputs = {name: zeros((rows, capacity) if name == "attention_mask" else np.shape(value), types[name])
                       for name, value in feeds.items() if name not in past_names}
        self.inputs |= {name: zeros(np.shape(value), types[name]) for name, value in selected.items()
                        if not isinstance(value, ort.OrtValue)}
        self.dtypes = {name: types[name] for name in self.inputs}
        self.logits = zeros((rows, 1, pool.vocab_size), pool.logits_type)
        self.kept = [v for v in selected.values() if isinstance(v, ort.OrtValue)]  # their ids are in the key
        self.io = pool.ort.io_binding()
        for name, value in self.inputs.items():
            self.io.bind_ortvalue_input(name, value)
        for name, value in selected.items():
            if isinstance(value, ort.OrtValue):
                self.io.bind_ortvalue_input(name, value)
        for past, present in self.pairs:
            self.io.bind_ortvalue_input(past, self.past[present])
            self.io.bind_ortvalue_output(present, self.past[present])
        self.io.bind_ortvalue_output("logits", self.logits)
        self.options = ort.RunOptions()
        if pool.capture:
            self.options.add_run_config_entry(GRAPH_ID, str(graph_id))

    def select(self, selected: Mapping[str, Any]) -> None:
        """Write the holder's host adapter inputs (`adapter_ids` [rows]) into their buffers."""
        for name, value in selected.items():
            if name in self.inputs:
                self.inputs[name].update_inplace(np.ascontiguousarray(value, self.dtypes[name]))

    def run(self, feeds: Mapping[str, Any], shared: Mapping[str, Any]) -> dict[str, Any]:
        """One decode step: `feeds` (numpy input_ids [rows, 1], attention_mask [rows, <= capacity], the past) written
        into the buffers, the cache's buffers (`shared`, {present: OrtValue}) copied in when they are not this set's;
        returns {"logits": [rows, 1, vocab], present: this set's buffer} (OrtValues, the same objects every step)."""
        if any(shared[present] is not self.past[present] for present in self.past):
            self.pool.copy(shared, self.past)
        for name, value in feeds.items():
            if name == "attention_mask":
                self.mask[:] = 0
                self.mask[:, :value.shape[1]] = value
                self.inputs[name].update_inplace(self.mask)
            elif name in self.inputs:
                self.inputs[name].update_inplace(np.ascontiguousarray(value, self.dtypes[name]))
        try:
            with self.pool.lock:
                self.pool.ort.run_with_iobinding(self.io, self.options)
        except Exception as e:  # as bound_run: the callers end that batch's rows
            if not is_onnxruntime_error(e):
                raise
            raise run_failure(self.pool.name, dict(feeds), e) from e
        return {"logits": self.logits, **self.past}


class GraphPool:
    """A session's static buffer sets for decode steps (see the module). `capture`: record and replay them as CUDA
    graphs (a CUDA session opened with `enable_cuda_graph`); False runs the same steps without graphs. `kind`,
    `device`: where the buffers live ("cuda" or "cpu", the device id), as `road_export.runtime.gpu.bound_run` takes
    them. `most`: the most sets (graphs) it makes."""

    def __init__(self, session, kind: str, device: int, *, capture: bool, most: int = MOST_GRAPHS,
                 recorded: int = MOST_RECORDED):
        layout = session.cache_layout
        if layout is None or not layout.share_buffer:
            raise RoadError(f"{session.path.name}: static decode buffers (CUDA graphs) need a model builder graph's "
                            "shared key/value buffer (GroupQueryAttention); run it without cuda_graph")
        if "logits" not in session.output_names or session.vocab_size is None:
            raise RoadError(f"{session.path.name}: static decode buffers need a `logits` output of a fixed "
                            "vocabulary size")
        # what the sets need of the RoadSession, not the session itself (`_POOLS` keys it weakly)
        self.ort, self.name, self.layout, self.vocab_size = session.session, session.path.name, layout, \
            session.vocab_size
        self.input_types = {i.name: NUMPY_TYPES.get(i.type, np.int64) for i in self.ort.get_inputs()}
        logits = self.ort.get_outputs()[session.output_names.index("logits")]
        self.logits_type = NUMPY_TYPES.get(logits.type, np.float32)
        self.kind, self.device, self.capture, self.most, self.recorded = kind, device, capture, most, recorded
        self.sets: list[StaticStep] = []
        self.made = 0  # sets made (graph ids taken) so far
        self._leases = 0
        self._past_names = {past for past, _ in layout.pairs}
        self.lock = threading.RLock()
        self._copier: Any = None  # an onnxruntime InferenceSession of `_copy_model`, made at the first copy
        self._warned = False

    def lease(self, holder: object, feeds: Mapping[str, Any], shared: Mapping[str, Any],
              selected: Mapping[str, Any]) -> StaticStep | None:
        """A free set for this step's shapes and adapters, now `holder`'s (made if there is none and fewer than `most`
        exist); None when the pool is full. A set is free when its holder is gone or gave it back."""
        import onnxruntime as ort

        ids = feeds["input_ids"]
        capacity = value_shape(next(iter(shared.values())))[2]
        key = (int(ids.shape[0]), int(capacity),
               tuple(sorted((n, tuple(np.shape(v))) for n, v in feeds.items()
                            if n != "attention_mask" and n not in self._past_names)),
               tuple(sorted((n, id(v) if isinstance(v, ort.OrtValue) else None) for n, v in selected.items())))
        with self.lock:
            for step in self.sets:
                if step.holder is not None and step.holder() is None:
                    step.holder = None
            chosen = next((s for s in self.sets if s.key == key and s.holder is None), None)
            if chosen is None:
                free = sorted((s for s in self.sets if s.holder is None), key=lambda s: s.used)
                if self.made >= self.recorded or (len(self.sets) >= self.most and not free):
                    if not self._warned:
                        logger.info("%s: %d static decode buffer sets (CUDA graphs) in use or %d recorded; this "
                                    "shape decodes without a graph", self.name, len(self.sets), self.made)
                        self._warned = True
                    return None
                if len(self.sets) >= self.most:  # the least recently used free set goes, and its graph with it
                    self.sets.remove(free[0])
                self.made += 1
                chosen = StaticStep(self, key, feeds, shared, selected, self.made)
                self.sets.append(chosen)
            self._leases += 1
            chosen.used, chosen.holder = self._leases, weakref.ref(holder)
            chosen.select(selected)
            return chosen

    def give_back(self, step: StaticStep) -> None:
        """Free `step` for another holder (its buffers are no longer the giver's cache)."""
        with self.lock:
            step.holder = None

    def copy(self, source: Mapping[str, Any], target: Mapping[str, Any]) -> None:
        """target[name] = source[name] for every name, device to device: one run of `_copy_model`."""
        from onnx import helper

        from road_export.graph.ort_session import new_session, session_options

        names = list(target)
        if self._copier is None:
            element = helper.np_dtype_to_tensor_dtype(np.dtype(self.layout.dtype))
            options = session_options(threads=1, log_severity=3)
            providers = ([(CUDA, {"device_id": str(self.device)})] if self.kind == "cuda"
                         else ["CPUExecutionProvider"])
            self._copier = new_session(_copy_model(len(names), element), providers=providers, options=options,
                                       what="the key/value buffers' copy").session
        io = self._copier.io_binding()
        for i, name in enumerate(names):
            io.bind_ortvalue_input(f"x{i}", source[name])
            io.bind_ortvalue_output(f"y{i}", target[name])
        self._copier.run_with_iobinding(io)


_POOLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # session -> GraphPool
_POOLS_LOCK = threading.Lock()


def graph_pool(session, kind: str, device: int, *, capture: bool | None = None) -> GraphPool:
    """The session's `GraphPool` (made on first use, once however many threads ask; it goes with the session);
    `capture` None: record CUDA graphs when the session records them (`RoadSession.cuda_graph`). Raises RoadError
    for a file without a builder graph's shared buffer."""
    with _POOLS_LOCK:
        pool = _POOLS.get(session)
        if pool is None:
            capture = getattr(session, "cuda_graph", False) if capture is None else capture
            pool = _POOLS[session] = GraphPool(session, kind, device, capture=bool(capture))
        return pool
