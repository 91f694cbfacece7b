"""Memory of a check that holds a torch reference beside an onnxruntime session: weights lent, not held twice,
and freed pages given back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

__all__ = ["LEND_MIN_BYTES", "lend_equal_weights", "release_freed_memory"]


LEND_MIN_BYTES = 2**20


def release_freed_memory() -> None:
    """Give the memory that an onnxruntime run freed back to the system (glibc's `malloc_trim`, through ctypes;
    nothing on another C library). glibc keeps the freed pages of the arenas onnxruntime's threads allocated from,
    so the torch reference's activations, allocated from other arenas, would come on top of them rather than in
    their place: measured on TinyLlama widths, verify's peak is 0.03 x the weight bytes lower with it."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl or another C library: no malloc_trim, nothing kept the same way
        pass


def lend_equal_weights(path: Path, model, session_options) -> list:
    """Lend onnxruntime the reference's own memory for every external-data weight of the file (of at least
    LEND_MIN_BYTES) that equals one of the reference's tensors byte for byte (same shape and dtype; in practice the
    embedding table, which merge and rotate exports write as it is), so that weight is held once, not once by
    torch and once more by onnxruntime's map of the file (the vocabulary sweep touches every row of both).

    The file's bytes are read with plain reads, which count in no process's memory, and compared in full before
    anything is lent: a weight that differs in one byte, or that the file holds short, is not lent and onnxruntime
    runs the file's own, so the checks see exactly what they would see otherwise. Returns the OrtValues lent
    (`session_options.add_initializer`, no copy), which must outlive the session.
    """
    import onnxruntime as ort

    proto = onnx.load(str(path), load_external_data=False)
    candidates: dict[tuple, list[np.ndarray]] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.nbytes >= LEND_MIN_BYTES:
            array = tensor.detach().numpy()
            candidates.setdefault((array.shape, array.dtype.str), []).append(array)
    lent = []
    inputs = {i.name for i in proto.graph.input}  # overridable (swappable) initializers are the file's own
    for init in proto.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL or init.name in inputs:
            continue
        info = {e.key: e.value for e in init.external_data}
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        matches = candidates.get((tuple(init.dims), np.dtype(dtype).newbyteorder("<").str), [])
        if not matches or "location" not in info:
            continue
        for array in matches:
            if _same_bytes(path.parent / info["location"], int(info.get("offset", 0)), int(info.get("length", -1)),
                           array):
                value = ort.OrtValue.ortvalue_from_numpy(array)
                session_options.add_initializer(init.name, value)
                lent.append(value)
                break
    return lent


def _same_bytes(data: Path, offset: int, length: int, array: np.ndarray, chunk: int = 4 * 2**20) -> bool:
    """Whether `length` bytes of `data` at `offset` are `array`'s bytes (read in chunks, never mapped)."""
    view = memoryview(array.reshape(-1)).cast("B")
    if length not in (-1, view.nbytes):
        return False
    buffer = bytearray(chunk)
    try:
        with open(data, "rb") as f:
            f.seek(offset)
            for start in range(0, view.nbytes, chunk):
                size = min(chunk, view.nbytes - start)
                got = f.readinto(memoryview(buffer)[:size])
                if got != size or memoryview(buffer)[:size] != view[start:start + size]:
                    return False
    except OSError:
        return False
    return True
