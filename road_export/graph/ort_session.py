"""The one place the package sets up an onnxruntime `InferenceSession`: providers, threads, the road kernel library,
session config entries, logging and graph optimization; torch-free (layer 2), so that the export's load check
(`road_export.export.post`), the runtime (`RoadSession`, the GPU token selector), the parity harness and the
model builder path (`road_export.app.genai_builder`) open files alike and refuse an unloadable one with one line.

Mirrors onnxruntime's Python API (onnxruntime/python/onnxruntime_inference_collection.py `InferenceSession`,
`SessionOptions`): a session config entry is `SessionOptions.add_session_config_entry`, the kernel library is
`SessionOptions.register_custom_ops_library` (`road_export.graph.native.register`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from road_export.core.errors import OnnxRuntimeFailure, RoadError, first_line

logger = logging.getLogger(__name__)

__all__ = ["CPU", "CUDA", "NUMPY_TYPES", "OrtSession", "new_session", "provider_name", "road_kernels", "run_failure",
           "session_options", "value_shape"]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
"""onnxruntime's input/output type strings (`NodeArg.type`) -> numpy types, for the types numpy has."""


@dataclass
class OrtSession:
    """What `new_session` opened: `session` (onnxruntime.InferenceSession); `road`: the file uses the `road` op
    domain; `native`: the road kernel library is registered on it (else the ops' standard-op bodies run);
    `rewritten`: what the `rewrite` hook reported (e.g. fused nodes), 0 without one; `options`: its
    SessionOptions."""

    session: Any
    road: bool
    native: bool
    rewritten: int
    options: Any


def provider_name(provider) -> str:
    """onnxruntime takes a provider as its name or as (name, options)."""
    return provider if isinstance(provider, str) else provider[0]


def value_shape(value: Any) -> tuple[int, ...]:
    """The shape of a run's value: a numpy array (or anything numpy reads) or an onnxruntime OrtValue (`shape()`)."""
    return tuple(value.shape() if callable(getattr(value, "shape", None)) else np.shape(value))


def run_failure(name: str, feeds: Mapping[str, Any], error: BaseException) -> RoadError:
    """The one line for onnxruntime failing a run of the model `name` on `feeds` (numpy arrays or OrtValues; the
    key/value cache left out): "NAME: onnxruntime failed on inputs input_ids [2, 1], ... (its first line)"."""
    shapes = ", ".join(f"{k} {list(value_shape(v))}" for k, v in feeds.items() if not k.startswith("past_key_values"))
    return RoadError(f"{name}: onnxruntime failed on inputs {shapes} ({first_line(error)})")


def session_options(*, threads: int | None = None, session_config: Mapping[str, str] | None = None,
                    log_severity: int = 4, optimize: bool = True):
    """onnxruntime SessionOptions: `threads` intra-op threads (None: onnxruntime's default), `session_config`
    entries ({"session.intra_op.allow_spinning": "0"}, ...), `log_severity` (4: fatal only, so a failure comes back
    as one RoadError line and not also as onnxruntime's coloured log; 3 still prints errors), `optimize=False`:
    graph optimizations off (a load check, not a run)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = log_severity
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    configure(options, threads=threads, session_config=session_config)
    return options


def configure(options, *, threads: int | None = None, session_config: Mapping[str, str] | None = None) -> None:
    """Apply `threads` and `session_config` to existing SessionOptions."""
    if threads:
        options.intra_op_num_threads = threads
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, str(value))


def road_kernels(providers: Sequence, native: bool | None) -> bool | None:
    """The `native` setting for `road_export.graph.native.register` given the providers: with CUDAExecutionProvider
    first, the library's CUDA kernels must be there (`road_export.graph.native.cuda_kernels`), else the CPU kernels
    would pull every rotation off the GPU: None registers them when they are there, else runs the bodies (logged), True
    raises RoadError when they are not. With another non-CPU provider first, None leaves the CPU kernels out (the
    bodies run on that device). False stays False."""
    from road_export.graph import native as road_native

    first = provider_name(providers[0])
    if first == CUDA and native is not False:
        why = road_native.cuda_kernels()
        if why is None:
            return native
        if native:
            raise RoadError(f"the road CUDA kernels are unavailable here ({why}); use native=None to run the "
                            "standard-op bodies on the GPU")
        logger.warning("road CUDA kernels unavailable (%s); the road ops run their standard-op bodies on the CUDA "
                       "provider (on the CPU where this onnxruntime has none)", why)
        return False
    if native is None and first != CPU:
        return False
    return native


def new_session(source: str | Path | bytes, *, providers: Sequence | None = None, threads: int | None = None,
                native: bool | None = False, session_config: Mapping[str, str] | None = None,
                log_severity: int = 4, optimize: bool = True, options=None,
                rewrite: Callable[[Any, bool], tuple[str | bytes | None, int]] | None = None,
                what: str | None = None, refusal: Callable[[str], str] | None = None) -> OrtSession:
    """Open `source` (an ONNX file's path, or a serialized model) as an onnxruntime InferenceSession.

    `providers`: onnxruntime's list (names or (name, options)); default CPU only. `native`: register the road kernel
    library for a file that uses the `road` domain: True (RoadError when it cannot), None (where it builds; see
    `road_kernels` for a CUDA or other provider first), False (never: the ops' standard-op bodies run).
    `threads`, `session_config`, `log_severity`, `optimize`: as `session_options`; `options`: SessionOptions made by
    the caller instead (then only `threads` and `session_config` are applied to them). `rewrite(options, native)`
    runs after the registration and may return another source to load (e.g. a graph rewritten in memory) and a
    count (`OrtSession.rewritten`); (None, n) keeps `source`.
    Raises OnnxRuntimeFailure (a RoadError) "WHAT: onnxruntime cannot load it (its first line)" (`what`: default
    the path), or RoadError with `refusal(first line)` as the message, when onnxruntime refuses the model.
    """
    import onnxruntime as ort

    from road_export.graph import native as road_native

    if options is None:
        options = session_options(threads=threads, session_config=session_config, log_severity=log_severity,
                                  optimize=optimize)
    else:
        configure(options, threads=threads, session_config=session_config)
    providers = list(providers or [CPU])
    native = road_kernels(providers, native)
    road = isinstance(source, str | Path) and road_native.uses_road(source)
    registered = road and road_native.register(options, native)
    rewritten = 0
    if rewrite is not None:
        other, rewritten = rewrite(options, registered)
        source = other if other is not None else source
    try:
        session = ort.InferenceSession(str(source) if isinstance(source, Path) else source, options,
                                       providers=providers)
    except Exception as e:
        where = what or (str(source) if isinstance(source, str | Path) else "the model")
        if refusal:
            raise RoadError(refusal(first_line(e))) from e
        raise OnnxRuntimeFailure(where, "load", e) from e
    return OrtSession(session, road, registered, rewritten, options)
