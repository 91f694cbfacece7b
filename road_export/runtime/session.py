"""RoadSession: run an exported model on onnxruntime by adapter name, hiding the `adapter_ids` plumbing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from road_export.runtime import generation, kvcache
from road_export.core.errors import RoadError, first_line, is_onnxruntime_error
from road_export.core.names import (BASE_NAME, METADATA_MODE, METADATA_SWAP, PAST_SEQUENCE, SEQUENCE, TOTAL_SEQUENCE,
                                    read_record, recorded_adapter_names)
from road_export.graph.ort_session import NUMPY_TYPES, run_failure



_UNREAD = object()  # RoadSession._cache_layout before its first read


def _show(shape: list) -> str:
    return "[" + ", ".join(str(d) if d not in (None, "") else "?" for d in shape) + "]"


class RoadSession:
    """An onnxruntime session over a road-export file.

    `run(inputs, adapter="name")` runs every row through one adapter; `run(inputs, adapter_names=[...])` gives each
    row its own ("__base__": no adapter). Both need a mixed-adapter export (several adapters, rotate mode) unless
    they name the file's only adapter. An encoder-decoder directory opens with
    `road_export.runtime.sessions.open_session` (a `Seq2SeqSession`), which opens anything else as a RoadSession.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, providers: Sequence[str] | None = None,
                 native: bool | None = None, session_config: Mapping[str, str] | None = None, fuse: bool = True):
        """`native`: run road ops on the native kernels (True), their standard-op bodies (False), or the kernels
        where they build (None, the default); `self.native` says which. With CUDAExecutionProvider first in
        `providers` (a name or (name, options); see `road_export.runtime.gpu.cuda_providers`) the kernels are the
        library's CUDA kernels, registered where they can run (`road_export.graph.ort_session.road_kernels`), and
        `self.device` is "cuda"; with another execution provider first, None leaves the CPU kernels out, so the
        bodies run on that device rather than the rotations hopping to the CPU. `session_config`: onnxruntime
        session config entries (`SessionOptions.add_session_config_entry`, e.g.
        {"session.intra_op.allow_spinning": "0"}). `fuse` (CUDA with the kernels only): run each MatMul feeding a
        rotation and the rotation as one `road.MatMulRotate` node, from a graph rewritten in memory
        (`road_export.runtime.gpu.fused_model`); `self.fused` counts them. False opens the file as it is."""
        from road_export.graph.model_dir import model_file
        from road_export.graph.ort_session import CUDA, new_session, provider_name

        self.path = model_file(path)  # a model directory (road-export ... OUT_DIR) runs its onnx/model.onnx
        if not self.path.is_file():
            raise RoadError(f"{self.path}: no such ONNX file")
        providers = list(providers or ["CPUExecutionProvider"])
        on_cuda = provider_name(providers[0]) == CUDA
        from road_export.runtime.graphs import asks_graphs, graphs_enabled

        first = providers[0]
        if on_cuda and isinstance(first, tuple) and asks_graphs(dict(first[1])):
            import onnxruntime as ort

            # onnxruntime would run on the CPU with a warning, and the graphs asked for would silently not be
            if CUDA not in ort.get_available_providers():
                raise RoadError(f"providers ask for {CUDA}'s CUDA graphs and this onnxruntime ({ort.__version__}) "
                                f"has no {CUDA} (it has {', '.join(ort.get_available_providers())}); pip uninstall "
                                "onnxruntime && pip install onnxruntime-gpu, or open the session without cuda_graph")

        def rewrite(options, native: bool):
            if not (on_cuda and native and fuse):
                return None, 0
            from road_export.runtime.gpu import fused_model

            return fused_model(self.path, options)

        opened = new_session(self.path, providers=providers, threads=threads, native=native,
                             session_config=session_config, rewrite=rewrite)
        self.session, self.native, self.fused = opened.session, opened.native, opened.rewritten
        self.device = "cuda" if on_cuda and "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        # opened with onnxruntime's CUDA graphs: every run but a static decode step's (runtime.graphs) says "no graph"
        self.cuda_graph = self.device == "cuda" and graphs_enabled(self)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.mode = meta.get(METADATA_MODE)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.mixed = "adapter_ids" in self.input_names
        self.adapters = recorded_adapter_names(meta, str(self.path))
        self._swaps: dict[str, object] = {}  # adapter name -> onnxruntime.LoraAdapter
        self._inputs = {i.name: (list(i.shape), NUMPY_TYPES.get(i.type)) for i in self.session.get_inputs()}
        # adapter name -> its .onnx_adapter file (road_export.runtime.gpu binds it)
        self._swap_files: dict[str, Path] = {}
        self._swap_records = read_record(meta, METADATA_SWAP, str(self.path))
        # token ids must be < vocab_size: the logits' static last size ([batch, sequence, vocab]); None if unknown
        logits = next((o for o in self.session.get_outputs() if o.name == "logits"), None)
        last = logits.shape[-1] if logits is not None and len(logits.shape) == 3 else None
        self.vocab_size: int | None = last if isinstance(last, int) and last > 0 else None
        self._cache_layout: object = _UNREAD
        if not self.mixed and self._swap_records is not None:
            from road_export.graph import swap

            for name, file in swap.discover(self.path, self._swap_records).items():
                self.load_adapter(file, name)

    @property
    def cache_layout(self) -> kvcache.CacheLayout | None:
        """How the file takes its key/value cache (`road_export.runtime.kvcache.CacheLayout`): road-export's left-padded
        growing past, or a model builder graph's GroupQueryAttention rows with a shared buffer; None without a
        cache. Read on first use (RoadError there for a past whose head counts or size cannot be known); may be
        set (e.g. `kvcache.with_share_buffer(session.cache_layout, False)`)."""
        if self._cache_layout is _UNREAD:
            self._cache_layout = kvcache.cache_layout(self)
        return self._cache_layout  # type: ignore[return-value]

    @cache_layout.setter
    def cache_layout(self, layout: kvcache.CacheLayout | None) -> None:
        self._cache_layout = layout

    def load_adapter(self, path: str | Path, name: str | None = None) -> str:
        """Make an `.onnx_adapter` file (see `road-export adapter`) selectable by name; returns the name."""
        import onnxruntime as ort

        from road_export.graph import swap

        path = Path(path)
        if self.mixed or self._swap_records is None:
            raise RoadError(f"{self.path.name} is not a swappable single-adapter export")
        swap.check_adapter_file(path, self._swap_records, self.path.name)  # names, shapes, dtypes
        name = name or path.name.removesuffix(".onnx_adapter")
        adapter = ort.LoraAdapter()
        try:
            adapter.Load(str(path))
        except Exception as e:
            raise RoadError(f"{path}: not an onnxruntime adapter file ({first_line(e)})") from e
        self._swaps[name] = adapter
        self._swap_files[name] = path
        if name not in self.adapters:
            self.adapters.append(name)
        return name

    def ids(self, adapter_names: Sequence[str]) -> np.ndarray:
        """The `adapter_ids` row values for adapter names (0 for "__base__")."""
        table = {BASE_NAME: 0, **{name: i + 1 for i, name in enumerate(self.adapters)}}
        unknown = sorted({n for n in adapter_names if n not in table})
        if unknown:
            raise RoadError(f"{self.path.name} has no adapter {', '.join(unknown)}; it has {self.adapters}")
        return np.array([table[n] for n in adapter_names], dtype=np.int64)

    def run(self, inputs: Mapping[str, np.ndarray], *, adapter: str | None = None,
            adapter_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None
            ) -> dict[str, np.ndarray]:
        """Run the model on `inputs` ({input name: array}); returns {output name: array}.

        The feeds are checked against the model's inputs first (`check_feeds`: names, ranks, dtypes, fixed sizes,
        batch and sequence lengths); `adapter_ids` is not fed by hand but set from `adapter` / `adapter_names`
        (one name per row). Raises RoadError saying what the model expected.
        """
        feeds = self.check_feeds(inputs)
        batch = int(next(iter(feeds.values())).shape[0]) if feeds else 1
        extra, options = self.route(batch, adapter=adapter, adapter_names=adapter_names)
        feeds.update(extra)
        wanted = list(output_names or self.output_names)
        unknown = [n for n in wanted if n not in self.output_names]
        if unknown:
            raise RoadError(f"{self.path.name} has no output {', '.join(unknown)}; it has {self.output_names}")
        return dict(zip(wanted, self.run_feeds(wanted, feeds, options), strict=True))

    def run_feeds(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray], options=None) -> list:
        """onnxruntime's run on checked feeds; a failure becomes a RoadError naming the model and the feeds."""
        if self.cuda_graph:
            from road_export.runtime.graphs import without_graph

            options = without_graph(options)
        try:
            return self.session.run(output_names, feeds, options)
        except Exception as e:
            if not is_onnxruntime_error(e):
                raise
            raise run_failure(self.path.name, feeds, e) from e

    def check_feeds(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The feeds for `inputs`, checked against the model's inputs; raises RoadError saying what was expected.

        Every input but `adapter_ids` must be given, and nothing else; each must have the input's rank, its fixed
        sizes, and its element type (integer arrays are converted to the model's integer type, other types are
        refused); token ids must lie in 0 .. vocab_size - 1 where the logits give the vocabulary size. Axes of the
        same name must agree (`batch`, `sequence`, ...), only a past length may be 0, and with a cache the attention
        mask must cover past + new tokens.
        """
        if not isinstance(inputs, Mapping):
            raise RoadError(f"inputs must be a mapping of input name to array, got {type(inputs).__name__}")
        if "adapter_ids" in inputs:
            raise RoadError("adapter_ids is set from adapter= or adapter_names=; leave it out of the inputs")
        wanted = [n for n in self.input_names if n != "adapter_ids"]
        unknown = sorted(set(inputs) - set(wanted))
        if unknown:
            raise RoadError(f"{self.path.name} has no input {', '.join(map(str, unknown))}; it takes {wanted}")
        missing = [n for n in wanted if n not in inputs]
        if missing:
            raise RoadError(f"missing inputs {missing}; {self.path.name} takes {wanted}")
        feeds: dict[str, np.ndarray] = {}
        sizes: dict[str, tuple[int, str]] = {}  # axis name -> (size, the input that set it)
        for name in wanted:
            shape, dtype = self._inputs[name]
            value = np.asarray(inputs[name])
            if value.ndim != len(shape):
                raise RoadError(f"{name} has shape {list(value.shape)}; {self.path.name} takes rank {len(shape)} "
                                f"{_show(shape)}")
            if dtype is not None and value.dtype != dtype:
                if np.issubdtype(dtype, np.integer) and (np.issubdtype(value.dtype, np.integer)
                                                         or value.dtype == np.bool_):
                    value = value.astype(dtype)
                else:
                    raise RoadError(f"{name} has dtype {value.dtype}; {self.path.name} takes {np.dtype(dtype)} "
                                    f"{_show(shape)}")
            for axis, (want, got) in enumerate(zip(shape, value.shape, strict=True)):
                if isinstance(want, int) and want >= 0:
                    if got != want:
                        raise RoadError(f"{name} has size {got} on axis {axis}; {self.path.name} takes "
                                        f"{_show(shape)}")
                    continue
                axis_name = str(want) if want else f"{name}[{axis}]"
                if got == 0 and "past" not in axis_name:
                    raise RoadError(f"{name} is empty on axis {axis} ({axis_name}); give at least one "
                                    f"{'row' if axis == 0 else 'token'}")
                if axis_name in sizes and sizes[axis_name][0] != got:
                    size, other = sizes[axis_name]
                    raise RoadError(f"{name} has {axis_name} {got}, {other} has {size}; they must agree")
                sizes.setdefault(axis_name, (got, name))
            feeds[name] = value
        ids = feeds.get("input_ids")
        if ids is not None and ids.size and np.issubdtype(ids.dtype, np.integer) and self.vocab_size:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.vocab_size:
                bad = low if low < 0 else high
                raise RoadError(f"input_ids holds token id {bad}; {self.path.name} takes ids 0 to "
                                f"{self.vocab_size - 1} (vocab_size {self.vocab_size})")
        total, past, new = (sizes.get(k, (None,))[0] for k in (TOTAL_SEQUENCE, PAST_SEQUENCE, SEQUENCE))
        if total is not None and past is not None and new is not None and total != past + new:
            raise RoadError(f"attention_mask covers {total} positions; with {past} past and {new} new tokens it must "
                            f"cover {past + new}")
        return feeds

    def route(self, batch: int, *, adapter: str | None = None, adapter_names: Sequence[str] | None = None
              ) -> tuple[dict[str, np.ndarray], object]:
        """The extra feeds (`adapter_ids`) and run options (a swapped adapter) that select the adapters."""
        if adapter is not None and adapter_names is not None:
            raise RoadError("give adapter= or adapter_names=, not both")
        if adapter is None and adapter_names is None and not self.adapters:
            return {}, None  # a base model's export
        if isinstance(adapter_names, str):
            raise RoadError(f"adapter_names takes one name per row (a list), got the string {adapter_names!r}; "
                            "use adapter= for one adapter on every row")
        names = list(adapter_names) if adapter_names is not None else [adapter or self._default()] * batch
        if len(names) != batch:
            raise RoadError(f"{len(names)} adapter names for a batch of {batch} rows; give one name per row")
        odd = [n for n in names if not isinstance(n, str)]
        if odd:
            raise RoadError(f"adapter_names holds {odd[0]!r}; give each row an adapter name (a string), "
                            f"{BASE_NAME!r} for no adapter")
        if self.mixed:
            return {"adapter_ids": self.ids(names)}, None
        if len(set(names)) == 1 and names[0] in self._swaps:
            import onnxruntime as ort

            options = ort.RunOptions()
            options.add_active_adapter(self._swaps[names[0]])
            return {}, options
        if len(set(names)) > 1 and not set(names) - set(self.adapters):
            raise RoadError(f"{self.path.name} swaps one adapter per run; export the adapters together with "
                            "--mode rotate for per-row adapters")
        if set(names) - set(self.adapters):
            raise RoadError(
                f"{self.path.name} holds {self.adapters or 'no adapter'} only (mode {self.mode}); export several "
                "adapters with --mode rotate for per-row adapters"
            )
        return {}, None

    def run_on_device(self, inputs, **options) -> dict[str, object]:
        """`run` whose outputs stay in GPU memory as onnxruntime OrtValues; see
        `road_export.runtime.gpu.run_on_device`."""
        from road_export.runtime.gpu import run_on_device

        return run_on_device(self, inputs, **options)

    def generate(self, input_ids, attention_mask=None, **options) -> np.ndarray:
        """Prompt plus new tokens, [batch, prompt + new]; see `road_export.runtime.generation.generate` for the options.
        On the GPU (`self.device == "cuda"`) the cache and logits stay there: `road_export.runtime.gpu.generate`,
        whose `static_buffers` (CUDA graphs' decode steps) this takes too (True on the CPU runs that loop there)."""
        if self.device == "cuda" or options.get("static_buffers"):
            from road_export.runtime.gpu import generate

            return generate(self, input_ids, attention_mask, **options)
        options.pop("static_buffers", None)  # None / False: the host loop has no static buffers to leave out
        return generation.generate(self, input_ids, attention_mask, **options)

    def stream(self, input_ids, attention_mask=None, **options):
        """Yield each step's tokens and logits as they are decoded; see `road_export.runtime.generation.stream`."""
        return generation.stream(self, input_ids, attention_mask, **options)

    def default_adapter(self) -> str:
        """The adapter a run without adapter= / adapter_names= uses: a single-adapter file's own adapter. Raises
        RoadError for a mixed-adapter file (each run names its adapters)."""
        return self._default()

    def adapter_file(self, name: str) -> Path | None:
        """The `.onnx_adapter` file that adapter `name` was loaded from (`load_adapter`), None if none."""
        return self._swap_files.get(name)

    def _default(self) -> str:
        if not self.mixed and self.adapters:
            return self.adapters[0]  # the adapter the file was exported with (its initializers' defaults)
        raise RoadError(f"{self.path.name} holds adapters {self.adapters}; choose one with adapter=")
