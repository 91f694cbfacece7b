"""RoadSession: run an exported model on onnxruntime by adapter name, hiding the `adapter_ids` plumbing."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from road_export.errors import RoadError
from road_export.layers import BASE_NAME


class RoadSession:
    """An onnxruntime session over a road-export file.

    `run(inputs, adapter="name")` runs every row through one adapter; `run(inputs, adapter_names=[...])` gives each
    row its own ("__base__": no adapter). Both need a mixed-adapter export (several adapters, rotate mode) unless
    they name the file's only adapter.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, providers: Sequence[str] | None = None,
                 native: bool | None = None):
        """`native`: run road ops on the native kernels (True), their standard-op bodies (False), or the kernels
        where they build (None, the default); `self.native` says which. With CUDAExecutionProvider first in
        `providers` (a name or (name, options); see `road_export.gpu.cuda_providers`) the kernels are the
        library's CUDA kernels, registered where they can run (`road_export.gpu.cuda_native`), and
        `self.device` is "cuda"; with another execution provider first, None leaves the CPU kernels out, so the
        bodies run on that device rather than the rotations hopping to the CPU."""
        import onnxruntime as ort

        from road_export import native as road_native

        self.path = Path(path)
        if not self.path.is_file():
            raise RoadError(f"{self.path}: no such ONNX file")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        providers = list(providers or ["CPUExecutionProvider"])
        on_cuda = _provider_name(providers[0]) == "CUDAExecutionProvider"
        if on_cuda and native is not False:  # the library's CUDA kernels, where this machine can run them
            from road_export.gpu import cuda_native

            native = cuda_native(native)
        elif native is None and providers[0] != "CPUExecutionProvider":
            native = False
        self.native = road_native.uses_road(self.path) and road_native.register(options, native)
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as e:
            raise RoadError(f"{self.path}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from e
        self.device = "cuda" if on_cuda and "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        meta = self.session.get_modelmeta().custom_metadata_map
        records = json.loads(meta.get("road_export.adapters", "[]"))
        self.mode = meta.get("road_export.mode")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.mixed = "adapter_ids" in self.input_names
        self.adapters = [a["name"] for a in sorted(records, key=lambda a: a.get("id", 0))]
        self._swaps: dict[str, object] = {}  # adapter name -> onnxruntime.LoraAdapter
        self._swap_files: dict[str, Path] = {}  # adapter name -> its .onnx_adapter file (road_export.gpu binds it)
        if not self.mixed and "road_export.swap" in meta:
            prefix = f"{self.path.stem}."
            for file in sorted(self.path.parent.glob(f"{self.path.stem}.*.onnx_adapter")):
                self.load_adapter(file, file.name[len(prefix):-len(".onnx_adapter")])

    def load_adapter(self, path: str | Path, name: str | None = None) -> str:
        """Make an `.onnx_adapter` file (see `road-export adapter`) selectable by name; returns the name."""
        import onnxruntime as ort

        path = Path(path)
        if self.mixed or "road_export.swap" not in self.session.get_modelmeta().custom_metadata_map:
            raise RoadError(f"{self.path.name} is not a swappable single-adapter export")
        if not path.is_file():
            raise RoadError(f"{path}: no such adapter file")
        name = name or path.name.removesuffix(".onnx_adapter")
        adapter = ort.LoraAdapter()
        try:
            adapter.Load(str(path))
        except Exception as e:
            raise RoadError(f"{path}: not an onnxruntime adapter file ({str(e).splitlines()[0]})") from e
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
        feeds = {k: np.asarray(v) for k, v in inputs.items() if k in self.input_names and k != "adapter_ids"}
        batch = int(next(iter(feeds.values())).shape[0]) if feeds else 1
        extra, options = self.route(batch, adapter=adapter, adapter_names=adapter_names)
        feeds.update(extra)
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise RoadError(f"missing inputs {missing}; the model takes {self.input_names}")
        wanted = list(output_names or self.output_names)
        return dict(zip(wanted, self.session.run(wanted, feeds, options), strict=True))

    def route(self, batch: int, *, adapter: str | None = None, adapter_names: Sequence[str] | None = None
              ) -> tuple[dict[str, np.ndarray], object]:
        """The extra feeds (`adapter_ids`) and run options (a swapped adapter) that select the adapters."""
        if adapter is not None and adapter_names is not None:
            raise RoadError("give adapter= or adapter_names=, not both")
        if adapter is None and adapter_names is None and not self.adapters:
            return {}, None  # a base model's export
        names = list(adapter_names) if adapter_names is not None else [adapter or self._default()] * batch
        if len(names) != batch:
            raise RoadError(f"{len(names)} adapter names for a batch of {batch}")
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
        """`run` whose outputs stay in GPU memory as onnxruntime OrtValues; see `road_export.gpu.run_on_device`."""
        from road_export.gpu import run_on_device

        return run_on_device(self, inputs, **options)

    def generate(self, input_ids, attention_mask=None, **options) -> np.ndarray:
        """Prompt plus new tokens, [batch, prompt + new]; see `road_export.generation.generate` for the options.
        On the GPU (`self.device == "cuda"`) the cache and logits stay there: `road_export.gpu.generate`."""
        if self.device == "cuda":
            from road_export.gpu import generate
        else:
            from road_export.generation import generate

        return generate(self, input_ids, attention_mask, **options)

    def stream(self, input_ids, attention_mask=None, **options):
        """Yield each step's tokens and logits as they are decoded; see `road_export.generation.stream`."""
        from road_export.generation import stream

        return stream(self, input_ids, attention_mask, **options)

    def _default(self) -> str:
        if not self.mixed and self.adapters:
            return self.adapters[0]  # the adapter the file was exported with (its initializers' defaults)
        raise RoadError(f"{self.path.name} holds adapters {self.adapters}; choose one with adapter=")


def _provider_name(provider) -> str:
    """onnxruntime takes a provider as its name or as (name, options)."""
    return provider if isinstance(provider, str) else provider[0]
