"""RoadSession on onnxruntime's CUDA execution provider: the road kernels on the GPU, and runs and generation
that keep the KV cache and the logits in GPU memory through onnxruntime's IOBinding.

`RoadSession(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])` registers the road kernel
library, whose CUDA kernels (road_export/graph/native/road_cuda.h) then run every `road.Rotate` / `road.RotateTied`
node as one launch on onnxruntime's stream. `RoadSession.generate` then comes here: each step binds the previous
step's `present.*` OrtValues (device memory) as `past_key_values.*`, and picks the next token with an ArgMax run
on the GPU, so only the token ids [batch] cross to the host per step (sampling, which is done on the host, copies
the last position's logits [batch, vocab]).

Each MatMul that feeds a rotation runs with it as one node: the session opens the graph rewritten by
`road_export.passes.matmul_rotate` (in memory; the file is not changed), whose `road.MatMulRotate` kernel is one
GEMV launch for decode-sized products, else cuBLAS's GEMM and the rotation in place. A decode step on the GPU is
bound by onnxruntime's per-node host cost, so this, not the rotation's arithmetic, is what brings a rotate export
to the base model's step time; in a mixed-adapter export the per-row coefficient gathers fold into the same node
(`road.MatMulRotateRows`).

A swapped adapter (`.onnx_adapter`) is bound as inputs, its coefficients copied to the GPU once: onnxruntime
applies `RunOptions.add_active_adapter` in `InferenceSession.run` only, not with IOBinding.

CUDA graphs: onnxruntime's `enable_cuda_graph` (`cuda_providers(cuda_graph=True)`) replays a recorded run only
when every node runs on the CUDA provider and every input and output is bound to the same device buffer, with the
same shape, on every run. A model builder graph (GroupQueryAttention with a shared key/value buffer) allows it:
`generate` (and serve's engine) then run its decode steps on static buffers that onnxruntime records and replays
(`road_export.runtime.graphs`), as onnxruntime-genai does; the prefill runs without a graph. road-export's own decoder
files do not: onnxruntime 1.31 places their shape computations (int64 Shape / Gather / Concat feeding the attention
mask and cache) on the CPU provider and refuses such a session ("all compute graph nodes have not been partitioned
to the CUDAExecutionProvider"), and their cache grows by one position per step, so each step has new shapes. The
road kernels themselves are graph safe: after their first run on a context they allocate, synchronise and compile
nothing, only launch on onnxruntime's stream.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from road_export.core.errors import RoadError, first_line, is_onnxruntime_error
from road_export.graph.ort_session import run_failure, value_shape
from road_export.runtime.kvcache import HostMemory

if TYPE_CHECKING:
    from road_export.runtime.generation import Session

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"


EXTERNAL_FOLDER = "session.model_external_initializers_file_folder_path"  # onnxruntime session config key


def fused_model(path, options) -> tuple[bytes | None, int]:
    """The model at `path` with MatMul + rotation pairs fused (road_export/passes/matmul_rotate.py) and MatMulNBits +
    rotation pairs too (an int4/int8 base: road.MatMulNBitsRotate, passes/linear_rotate.py), serialized, and the
    number of fused nodes; (None, 0) when nothing fuses or the MatMul kernels are unavailable
    (`road_export.graph.native.matmul_kernels`). Weights in external data stay there: `options` (onnxruntime
    SessionOptions) gets the model's folder as `session.model_external_initializers_file_folder_path`, so
    onnxruntime reads them from the original files. Raises RoadError when the file cannot be read as ONNX."""
    from pathlib import Path

    import onnx_ir as ir

    from road_export.graph import native as road_native
    from road_export.passes.linear_rotate import LinearRotatePass
    from road_export.passes.matmul_rotate import MatMulRotatePass

    why = road_native.matmul_kernels()
    if why is not None:
        logger.info("road.MatMulRotate unavailable (%s); MatMul and rotation stay two nodes", why)
        return None, 0
    try:
        model = ir.load(path)
    except Exception as e:
        raise RoadError(f"{path}: cannot read it as ONNX ({first_line(e)})") from e
    fused = MatMulRotatePass()(model).fused
    fused += LinearRotatePass(forms=("nbits",))(model).nbits
    if not fused:
        return None, 0
    proto = ir.serde.serialize_model(model)
    # absolute(), not resolve(): a symlinked model (a Hugging Face cache's snapshots/ -> blobs/) keeps its data
    # file beside the link, not beside the link's target
    options.add_session_config_entry(EXTERNAL_FOLDER, str(Path(path).absolute().parent))
    return proto.SerializeToString(), fused


def cuda_providers(device_id: int = 0, *, cuda_graph: bool = False, tf32: bool = True) -> list:
    """The providers argument for a GPU RoadSession: CUDA (on `device_id`, CUDA graphs on request), then CPU.
    `tf32=False` turns off onnxruntime's TF32 matmuls (on by default) for float32 results within 1e-5."""
    options = {"device_id": str(device_id)}
    if cuda_graph:
        options["enable_cuda_graph"] = "1"
    if not tf32:
        options["use_tf32"] = "0"
    return [(CUDA, options), "CPUExecutionProvider"]


def with_cuda_graph(providers: list) -> list:
    """`providers` (a CUDA provider first, by name or (name, options)) with onnxruntime's CUDA graphs on for it."""
    from road_export.graph.ort_session import provider_name

    first = providers[0] if providers else None
    options = dict(first[1]) if isinstance(first, tuple) else {}
    if first is None or provider_name(first) != CUDA:
        raise RoadError("CUDA graphs need the CUDA execution provider first, got "
                        f"{provider_name(first) if first is not None else 'no providers'}")
    return [(CUDA, {**options, "enable_cuda_graph": "1"}), *providers[1:]]


def device_id(session: Session) -> int:
    """The CUDA device the session runs on."""
    options = session.session.get_provider_options().get(CUDA)
    if options is None:
        raise RoadError(f"{session.path.name} does not run on CUDA (providers {session.session.get_providers()}); "
                        "pass providers=['CUDAExecutionProvider', 'CPUExecutionProvider']")
    return int(options.get("device_id", 0))


_DEVICE_ADAPTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""session -> {adapter: ((its file, mtime, size), {input name: OrtValue})}: read again when the name's file changes."""


def route(session: Session, batch: int, *, adapter: str | None = None,
          adapter_names: Sequence[str] | None = None) -> dict[str, object]:
    """The extra inputs that select the adapters on the GPU: `adapter_ids` (mixed export), or a swapped adapter's
    coefficients as OrtValues in device memory (copied there once per session and adapter).

    onnxruntime applies `RunOptions.add_active_adapter` in `InferenceSession.run` only, not in
    `run_with_iobinding`, so a swap is bound here as inputs: the overridable initializers it overrides."""
    import onnxruntime as ort

    extra, options = session.route(batch, adapter=adapter, adapter_names=adapter_names)
    if options is None:
        return extra
    name = list(adapter_names)[0] if adapter_names is not None else adapter or session.default_adapter()
    own = session.path.with_name(f"{session.path.stem}.{name}.onnx_adapter")
    if name == session.adapters[0] and session.adapter_file(name) == own:
        return extra  # the adapter the file was exported with: its initializers already hold these values
    cached = _DEVICE_ADAPTERS.setdefault(session, {})
    file = session.adapter_file(name)
    stat = file.stat() if file is not None else None
    version = (str(file), stat.st_mtime_ns, stat.st_size) if stat is not None else None
    if name not in cached or cached[name][0] != version:  # an adapter loaded again under its name: read it again
        kind, dev = _memory(session)
        from road_export.graph.swap import read_adapter_values

        cached[name] = (version, {k: ort.OrtValue.ortvalue_from_numpy(v, kind, dev)
                                  for k, v in read_adapter_values(file).items()})
    return {**extra, **cached[name][1]}


def _memory(session: Session) -> tuple[str, int]:
    """Where the bound loop keeps its values: ("cuda", device id) for a CUDA session, ("cpu", 0) otherwise."""
    return ("cuda", device_id(session)) if getattr(session, "device", "cuda") == "cuda" else ("cpu", 0)


def run_on_device(session: Session, inputs: Mapping[str, object], *, adapter: str | None = None,
                  adapter_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                  outputs: Mapping[str, object] | None = None) -> dict[str, object]:
    """One run whose outputs stay on the GPU: {name: onnxruntime.OrtValue in device memory}.

    `inputs` are numpy arrays (copied to the device) or OrtValues (bound as they are, on the device or not).
    `outputs` binds preallocated OrtValues (then onnxruntime writes into them: what CUDA-graph replay needs);
    other outputs are allocated by onnxruntime on the device. Adapters as for `RoadSession.run`.
    """
    import onnxruntime as ort

    dev = device_id(session)
    arrays = {k: v for k, v in inputs.items() if k in session.input_names and k != "adapter_ids"}
    first = next(iter(arrays.values()), None)
    batch = int(value_shape(first)[0]) if arrays else 1
    arrays.update(route(session, batch, adapter=adapter, adapter_names=adapter_names))
    missing = [n for n in session.input_names if n not in arrays]
    if missing:
        raise RoadError(f"missing inputs {missing}; the model takes {session.input_names}")
    io = session.session.io_binding()
    for name, value in arrays.items():
        if isinstance(value, ort.OrtValue):
            io.bind_ortvalue_input(name, value)
        else:
            io.bind_cpu_input(name, np.ascontiguousarray(value))
    wanted = list(output_names or session.output_names)
    for name in wanted:
        if outputs and name in outputs:
            io.bind_ortvalue_output(name, outputs[name])
        else:
            io.bind_output(name, "cuda", dev)
    from road_export.runtime.graphs import without_graph

    session.session.run_with_iobinding(io, without_graph() if getattr(session, "cuda_graph", False) else None)
    return dict(zip(wanted, io.get_outputs(), strict=True))


@functools.cache
def _selector_model(logits_type: int) -> bytes:
    """tokens [batch, 1] int64 = ArgMax over the vocabulary of logits[:, -1] (logits [batch, sequence, vocab])."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Constant", [], ["last"], value=helper.make_tensor("last", TensorProto.INT64, [], [-1])),
        helper.make_node("Gather", ["logits", "last"], ["final"], axis=1),
        helper.make_node("ArgMax", ["final"], ["tokens"], axis=-1, keepdims=1),
    ]
    graph = helper.make_graph(nodes, "select", [helper.make_tensor_value_info("logits", logits_type, ["b", "s", "v"])],
                              [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["b", 1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


class GreedySelector:
    """Greedy choice where a session's logits are: `selector(logits)` with logits an OrtValue [batch, sequence,
    vocab] where `session` runs (the GPU for a CUDA session) returns the token ids [batch] int64 of ArgMax over
    logits[:, -1] (numpy), so only the ids leave the device; the batch may change from call to call. One tiny
    onnxruntime session (Gather + ArgMax) on the session's device; float16, float32 or float64 logits (the element
    type the session's `logits` output declares)."""

    def __init__(self, session: Session):
        from onnx import TensorProto

        from road_export.graph.ort_session import new_session

        logits = session.session.get_outputs()[session.output_names.index("logits")]
        element = {"tensor(float16)": TensorProto.FLOAT16, "tensor(double)": TensorProto.DOUBLE}.get(
            logits.type, TensorProto.FLOAT)
        kind, dev = _memory(session)
        providers = cuda_providers(dev) if kind == "cuda" else ["CPUExecutionProvider"]
        self.session = new_session(_selector_model(element), providers=providers, log_severity=3,
                                   what="the token selector").session
        self.io = self.session.io_binding()
        self.lock = threading.Lock()  # one IOBinding: one call at a time

    def __call__(self, logits) -> np.ndarray:
        with self.lock:
            self.io.bind_ortvalue_input("logits", logits)
            self.io.clear_binding_outputs()  # a fresh host output each call: a bound one keeps its first call's shape
            self.io.bind_output("tokens", "cpu")
            self.session.run_with_iobinding(self.io)
            return self.io.copy_outputs_to_cpu()[0][:, 0]


_SELECTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # session -> GreedySelector


def greedy_selector(session: Session) -> GreedySelector:
    """The session's `GreedySelector`, made on first use (opening its onnxruntime session costs milliseconds, a
    noticeable part of a short generation)."""
    selector = _SELECTORS.get(session)
    if selector is None:
        selector = _SELECTORS[session] = GreedySelector(session)
    return selector


def generate(session: Session, input_ids, attention_mask=None, *, max_new_tokens: int = 20,
             adapter: str | None = None, adapter_names: Sequence[str] | None = None, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
             static_buffers: bool | None = None) -> np.ndarray:
    """`road_export.runtime.generation.generate` on the GPU: the prompt followed by the new tokens, [batch, prompt +
    new] int64, the same tokens (options as there), with the KV cache and logits kept in device memory. On a CPU
    session the same IOBinding loop runs in host memory (the shared buffer then is written in place too).

    The cache is `road_export.runtime.kvcache`'s strategy for the file (`generation.decode_cache`): a growing past whose
    `present.*` OrtValues are bound as the next step's past, or a model builder graph's shared buffer, allocated
    once in device memory and bound as both `past_key_values.*` and `present.*`, which GroupQueryAttention then
    writes in place.

    `static_buffers`: run the decode steps on a static buffer set of the session's `runtime.graphs.GraphPool`, which
    onnxruntime records and replays as CUDA graphs on a session opened with them (`cuda_providers(cuda_graph=True)`);
    None (the default): when the session records CUDA graphs and the file is a builder graph with a shared buffer
    (not a longrope file, whose cache is renewed mid-generation); True on any session with a shared buffer (on the
    CPU: the same steps, not recorded), else RoadError. The shared buffer then holds prompt + new tokens rounded up
    (`kvcache.bucket`), so that calls of similar lengths replay one graph."""
    from road_export.runtime.generation import (Sampling, check_request, decode, new_decoding,
                                                recompute_length)
    from road_export.runtime.graphs import graph_pool, use_static_buffers

    ids, mask, rng, eos = check_request(session, input_ids, attention_mask, max_new_tokens, pad_token_id, seed,
                                        eos_token_id)
    sampling = Sampling(do_sample, temperature, top_k, top_p)
    kind, dev = _memory(session)
    layout = session.cache_layout
    takes = layout is not None and layout.share_buffer and recompute_length(session) is None
    static_buffers = use_static_buffers(
        static_buffers, takes, getattr(session, "cuda_graph", False),
        f"{session.path.name}: static_buffers needs a model builder graph's shared key/value buffer "
        "(GroupQueryAttention, no longrope recompute); leave static_buffers unset")
    pool = graph_pool(session, kind, dev) if static_buffers else None
    selected = route(session, ids.shape[0], adapter=adapter, adapter_names=adapter_names)
    decoding = new_decoding(session, bound_run(session, selected, kind, dev, pool=pool), mask, max_new_tokens,
                            memory=DeviceMemory(session), bucketed=pool is not None)
    select = None if do_sample or kind != "cuda" else greedy_selector(session)

    def pick(outputs):
        if select is not None and decoding.aligned:
            return select(outputs["logits"]), None  # the logits stay on the device
        logits = decoding.last_logits({"logits": outputs["logits"].numpy()}).astype(np.float32)
        return sampling.choose(logits, rng), logits

    new = [step.tokens[:, None] for step in decode(decoding, ids, mask, max_new_tokens=max_new_tokens, pick=pick,
                                                   eos=eos, pad_token_id=pad_token_id)]
    return np.concatenate([ids, *new], 1)


@functools.cache
def _mover_model(kind: str, element_type: int) -> bytes:
    """The cache's row moves as one onnxruntime model each (`DeviceMemory`), for past values of ONNX `element_type`:
    "take": y = Slice(Gather(x, rows, axis 0), start, stop, axis 2); "join": y = Concat(Pad(a, pads_a), Pad(b,
    pads_b), axis 0); "grow": y = Pad(x, pads); zeros padded."""
    from onnx import TensorProto, helper

    def value(name, element, dims):
        return helper.make_tensor_value_info(name, element, dims)

    if kind == "take":
        nodes = [helper.make_node("Gather", ["x", "rows"], ["picked"], axis=0),
                 helper.make_node("Constant", [], ["axis"], value=helper.make_tensor("axis", TensorProto.INT64, [1],
                                                                                     [2])),
                 helper.make_node("Slice", ["picked", "start", "stop", "axis"], ["y"])]
        inputs = [value("x", element_type, ["b", "h", "s", "d"]), value("rows", TensorProto.INT64, ["n"]),
                  value("start", TensorProto.INT64, [1]), value("stop", TensorProto.INT64, [1])]
    elif kind == "grow":
        nodes = [helper.make_node("Pad", ["x", "pads"], ["y"])]
        inputs = [value("x", element_type, ["b", "h", "s", "d"]), value("pads", TensorProto.INT64, [8])]
    else:
        nodes = [helper.make_node("Pad", ["a", "pads_a"], ["wide_a"]),
                 helper.make_node("Pad", ["b", "pads_b"], ["wide_b"]),
                 helper.make_node("Concat", ["wide_a", "wide_b"], ["y"], axis=0)]
        inputs = [value("a", element_type, ["b1", "h", "s1", "d"]), value("b", element_type, ["b2", "h", "s2", "d"]),
                  value("pads_a", TensorProto.INT64, [8]), value("pads_b", TensorProto.INT64, [8])]
    graph = helper.make_graph(nodes, kind, inputs, [value("y", element_type, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


class DeviceMemory(HostMemory):
    """`road_export.runtime.kvcache.HostMemory` for a decode loop on IOBinding: past values are onnxruntime OrtValues
    where `session` runs (device memory on CUDA, host memory on the CPU), and rows move there, by two small
    onnxruntime sessions on the same device (`_mover_model`), never through host memory. A zero-element value stays
    numpy (onnxruntime binds it as it is). `kind`, `device`: where, as `bound_run` takes them."""

    def __init__(self, session: Session):
        self.kind, self.device = _memory(session)
        self._sessions: dict[tuple[str, int], object] = {}
        self._shrink = True

    def zeros(self, shape: tuple[int, ...], dtype) -> object:
        import onnxruntime as ort

        array = np.zeros(shape, dtype)
        return ort.OrtValue.ortvalue_from_numpy(array, self.kind, self.device) if array.size else array

    def take(self, value, rows: Sequence[int], start: int = 0, stop: int | None = None) -> object:
        last = self.shape(value)[2] if stop is None else stop
        return self._run("take", value, {"x": value, "rows": np.asarray(list(rows), np.int64),
                                         "start": np.array([start], np.int64), "stop": np.array([last], np.int64)})

    def grow(self, value, width: int) -> object:
        more = width - self.shape(value)[2]
        return self._run("grow", value, {"x": value, "pads": np.array([0, 0, 0, 0, 0, 0, more, 0], np.int64)})

    def join(self, first, second, width: int, *, left: bool) -> object:
        def pads(value) -> np.ndarray:
            more = width - self.shape(value)[2]
            return np.array([0, 0, more if left else 0, 0, 0, 0, 0 if left else more, 0], np.int64)

        return self._run("join", first, {"a": first, "b": second, "pads_a": pads(first), "pads_b": pads(second)})

    def _run(self, kind: str, like, inputs: Mapping[str, object]) -> object:
        import onnxruntime as ort
        from onnx import helper

        from road_export.graph.ort_session import new_session, session_options

        if isinstance(like, ort.OrtValue):
            element = _ELEMENT_TYPES[like.data_type()]
        else:
            element = helper.np_dtype_to_tensor_dtype(np.asarray(like).dtype)
        key = (kind, element)
        if key not in self._sessions:
            # no arena of their own to keep what they moved: on the CPU none (malloc and free), on CUDA one that
            # allocates what is asked and is shrunk after every run (`_shrink`)
            options = session_options(threads=1, log_severity=3)
            options.enable_cpu_mem_arena = False
            providers = ([(CUDA, {"device_id": str(self.device), "arena_extend_strategy": "kSameAsRequested"})]
                         if self.kind == "cuda" else ["CPUExecutionProvider"])
            self._sessions[key] = new_session(_mover_model(kind, element), providers=providers, options=options,
                                              what="the key/value cache's row moves").session
        session = self._sessions[key]
        io = session.io_binding()
        for name, value in inputs.items():
            if isinstance(value, ort.OrtValue):
                io.bind_ortvalue_input(name, value)
            else:
                io.bind_cpu_input(name, np.ascontiguousarray(value))
        io.bind_output("y", self.kind, self.device)
        if self.kind == "cuda" and self._shrink:
            try:
                session.run_with_iobinding(io, _shrink(self.device))
                return io.get_outputs()[0]
            except Exception as e:  # an onnxruntime without that arena: the moves run on, unshrunk
                if not is_onnxruntime_error(e):
                    raise
                logger.info("the cache moves' arena is not shrunk (%s)", first_line(e))
                self._shrink = False
        session.run_with_iobinding(io)
        return io.get_outputs()[0]


@functools.cache
def _shrink(device: int):
    """Run options that hand the CUDA arena's unused memory on `device` back at the end of each run (onnxruntime's
    `memory.enable_memory_arena_shrinkage`; the CPU sessions here have no arena)."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", f"gpu:{device}")
    return options


_ELEMENT_TYPES = {"tensor(float)": 1, "tensor(float16)": 10, "tensor(bfloat16)": 16, "tensor(double)": 11}
"""onnxruntime's type strings (`OrtValue.data_type()`) of a cache -> ONNX element types (onnx.TensorProto)."""


class BoundRun:
    """The decode loop's run (`road_export.runtime.generation.Run`) through one IOBinding (see `bound_run`); with a
    `road_export.runtime.graphs.GraphPool`, decode steps run on a static buffer set leased from it (CUDA graphs where
    the pool records them), and the prefill and anything the pool cannot take run as here."""

    def __init__(self, session: Session, selected: Mapping[str, object], kind: str | None = None, dev: int = 0,
                 pool=None):
        import onnxruntime as ort

        from road_export.runtime.graphs import without_graph

        if kind is None:
            kind, dev = _memory(session)
        self.session, self.selected, self.kind, self.dev, self.pool = session, dict(selected), kind, dev, pool
        self.lease = None  # the pool's StaticStep this run holds
        self.refused: tuple | None = None  # the (rows, capacity) the pool had no set for
        # on a session that records CUDA graphs, a run with default options would be recorded as graph 0
        self.options = without_graph() if getattr(session, "cuda_graph", False) else None
        self.io = session.session.io_binding()
        for name, value in self.selected.items():
            if isinstance(value, ort.OrtValue):
                self.io.bind_ortvalue_input(name, value)
            else:
                self.io.bind_cpu_input(name, value)
        self.bound_inputs: dict[str, object] = {}  # the OrtValues bound now, by name: rebound only when another comes
        self.bound_outputs: dict[str, object] = {}

    def __call__(self, feeds, shared) -> dict[str, object]:
        if self.pool is not None and self._decode_step(feeds, shared):
            shape = (feeds["input_ids"].shape[0], value_shape(next(iter(shared.values())))[2])  # rows, capacity
            if self.lease is not None and self.lease.key[:2] != shape:
                self.pool.give_back(self.lease)
                self.lease = None
            if self.lease is None and self.refused != shape:
                self.lease = self.pool.lease(self, feeds, shared, self.selected)
                self.refused = None if self.lease is not None else shape  # a full pool: not asked again each step
            if self.lease is not None:
                return self.lease.run(feeds, shared)
        return self._run(feeds, shared)

    def _decode_step(self, feeds, shared) -> bool:
        """Whether a run is a decode step a static set takes: one new token per row after at least one cached
        (input_ids [rows, 1], a mask wider than 1), the shared buffer as OrtValues, and no output but the logits and
        the buffer."""
        import onnxruntime as ort

        ids, mask = feeds.get("input_ids"), feeds.get("attention_mask")
        return (isinstance(ids, np.ndarray) and ids.shape[1] == 1 and isinstance(mask, np.ndarray)
                and mask.shape[1] > 1 and bool(shared) and all(isinstance(v, ort.OrtValue) for v in shared.values())
                and set(self.session.output_names) == {"logits", *shared})

    def _run(self, feeds, shared) -> dict[str, object]:
        import onnxruntime as ort

        io, session = self.io, self.session
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                if self.bound_inputs.get(name) is not value:
                    io.bind_ortvalue_input(name, value)
                    self.bound_inputs[name] = value
            else:
                io.bind_cpu_input(name, np.ascontiguousarray(value))
                self.bound_inputs.pop(name, None)
        for name in session.output_names:
            if name in shared:  # the past buffer, written in place: bound again only when it is another buffer
                if self.bound_outputs.get(name) is not shared[name]:
                    io.bind_ortvalue_output(name, shared[name])
                    self.bound_outputs[name] = shared[name]
            else:  # a fresh device output (binding the name again drops the last run's value, which a padded
                # cache now holds as this run's past)
                io.bind_output(name, self.kind, self.dev)
                self.bound_outputs.pop(name, None)
        try:
            if self.pool is not None:  # a session that replays graphs: one run at a time (the pool's steps too)
                with self.pool.lock:
                    session.session.run_with_iobinding(io, self.options)
            else:
                session.session.run_with_iobinding(io, self.options)
        except Exception as e:  # as RoadSession.run_feeds: the callers end that batch's rows, not every request
            if not is_onnxruntime_error(e):
                raise
            raise run_failure(session.path.name, feeds, e) from e
        outputs = dict(zip(session.output_names, io.get_outputs(), strict=True))
        return outputs | {name: shared[name] for name in shared if name in outputs}  # the buffers themselves


def bound_run(session: Session, selected: Mapping[str, object], kind: str | None = None, dev: int = 0, *,
              pool=None) -> BoundRun:
    """The decode loop's run (`road_export.runtime.generation.Run`) through one IOBinding: `selected` (the adapter
    inputs, `route`) bound once; each run binds its feeds (OrtValues as they are, numpy arrays copied), the shared
    outputs (the cache's past buffer, written in place, and returned as the same objects) and fresh outputs in
    `kind` memory on device `dev` (default: where the session runs), so the last step's present.* OrtValues, now the
    cache's past, stay untouched; an OrtValue input or shared output that is the one already bound is not bound
    again (a shared buffer's 2 x layers values a step); returns {output name: OrtValue}. `pool`: a
    `road_export.runtime.graphs.GraphPool` whose static buffers (CUDA graphs) the decode steps run on."""
    return BoundRun(session, selected, kind, dev, pool)
