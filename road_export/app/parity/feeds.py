"""Feeds in the types a file declares, and the reference's inputs rounded as the file is fed them (torch-free:
torch tensors are handled through their own methods)."""

from __future__ import annotations

import numpy as np

__all__ = ["FLOAT_FEEDS", "cast_feeds", "declared_types", "round_as_fed"]

# onnxruntime's element type names (NodeArg.type) of the float feeds numpy can hold
FLOAT_FEEDS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def declared_types(session) -> dict[str, type]:
    """{input name: numpy float type} of an onnxruntime session's float inputs, as the file declares them
    (`NodeArg.type`, e.g. "tensor(float16)" for a float16 export's past keys/values and encoder states)."""
    return {i.name: FLOAT_FEEDS[i.type] for i in session.get_inputs() if i.type in FLOAT_FEEDS}


def cast_feeds(feeds: dict[str, np.ndarray], declared: dict[str, type]) -> dict[str, np.ndarray]:
    """Each float feed in the type the file declares for it (`declared_types`); other feeds as they are."""
    return {n: v.astype(declared[n]) if n in declared and v.dtype.kind == "f" and v.dtype != declared[n] else v
            for n, v in feeds.items()}


def round_as_fed(inputs: dict, declared: dict[str, type]) -> dict:
    """The reference's float inputs ({name: torch tensor}) rounded as the file is fed them (float16 where it
    declares float16), kept float32, so both sides see the same values."""
    return {k: v.half().float() if v.is_floating_point() and declared.get(k) is np.float16 else v
            for k, v in inputs.items()}
