"""The RoAd rotation in peft's layout, for torch tensors and numpy arrays alike.

Inside each group of `g` elements, element i (i < g/2) is paired with i + g/2:

    y = x * c1 + rot(x) * c2,   rot([x1 | x2]) = [-x2 | x1]   (per group)

Every function here works on the pair structure directly, so nothing ever builds the dense d x d matrix
except `dense_matrix`, which exists only as a reference for tests. Functions accept torch tensors or numpy
arrays and return the same kind; torch is imported only when a torch tensor is passed, so graph passes can
use this module without torch.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

Array = Any  # torch.Tensor or np.ndarray


def _xp(x: Array) -> ModuleType:
    if isinstance(x, np.ndarray | np.generic):
        return np
    import torch

    return torch


def _pairs(v: Array, group_size: int, axis: int = -1) -> tuple[Array, Array]:
    """Split `v` along `axis` into its first-half and second-half elements: two arrays [.., d/g, g/2, ..]."""
    axis = axis % v.ndim
    shape = tuple(v.shape)
    d = shape[axis]
    grouped = v.reshape(*shape[:axis], d // group_size, 2, group_size // 2, *shape[axis + 1 :])
    index = (slice(None),) * (axis + 1)
    return grouped[index + (0,)], grouped[index + (1,)]


def _join(a: Array, b: Array, shape: tuple[int, ...], axis: int) -> Array:
    """Inverse of `_pairs`: put first-half `a` and second-half `b` back into an array of `shape`."""
    xp = _xp(a)
    axis = axis % len(shape)
    return xp.stack((a, b), axis=axis + 1).reshape(shape)


def check_group_size(d: int, group_size: int, what: str = "tensor") -> None:
    """Raise ValueError unless `group_size` is positive and even and divides the width `d` (peft's check)."""
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"{what}: group_size must be a positive even number, got {group_size}")
    if d % group_size:
        raise ValueError(f"{what}: width {d} is not divisible by group_size {group_size}")


def coefficients(variant: str, group_size: int, theta: Array, alpha: Array) -> tuple[Array, Array]:
    """Per-element (c1, c2) of length d from peft's road_theta / road_alpha (see peft `_prepare_cols`)."""
    xp = _xp(theta)
    if theta.shape != alpha.shape or theta.ndim != 1:
        raise ValueError(f"road_theta {tuple(theta.shape)} and road_alpha {tuple(alpha.shape)} must be equal 1-D")
    h = group_size // 2
    if variant == "road_1":
        t = theta.reshape(-1, 1, h)
        a = alpha.reshape(-1, 1, h)
        t = xp.concatenate((t, t), axis=1).reshape(-1)
        a = xp.concatenate((a, a), axis=1).reshape(-1)
        return a * xp.cos(t), a * xp.sin(t)
    if variant == "road_2":
        return alpha * xp.cos(theta), alpha * xp.sin(theta)
    if variant == "road_4":
        t = theta.reshape(-1, 2, group_size)
        a = alpha.reshape(-1, 2, group_size)
        return (a[:, 0, :] * xp.cos(t[:, 0, :])).reshape(-1), (a[:, 1, :] * xp.sin(t[:, 1, :])).reshape(-1)
    raise ValueError(f"unknown RoAd variant {variant!r}; expected road_1, road_2 or road_4")


def params_length(variant: str, d: int) -> int:
    """Length of road_theta / road_alpha for an output width d."""
    return {"road_1": d // 2, "road_2": d, "road_4": 2 * d}[variant]


def rotate_half(x: Array, group_size: int) -> Array:
    """rot(x): each group [x1 | x2] becomes [-x2 | x1] along the last axis."""
    x1, x2 = _pairs(x, group_size)
    xp = _xp(x)
    return xp.concatenate((-x2, x1), axis=-1).reshape(x.shape)


def rotate(x: Array, c1: Array, c2: Array, group_size: int) -> Array:
    """y = x * c1 + rot(x) * c2 along the last axis; c1/c2 broadcast against x (shape [d] or [B, 1, d])."""
    return x * c1 + rotate_half(x, group_size) * c2


def _aligned(weight: Array, c1: Array, c2: Array, group_size: int, axis: int):
    """Views of the weight's first/second-half rows and the coefficients, broadcastable against them."""
    w1, w2 = _pairs(weight, group_size, axis)
    expand = (...,) + (None,) * (weight.ndim - 1 - axis)
    (a1, a2), (b1, b2) = _pairs(c1, group_size), _pairs(c2, group_size)
    return w1, w2, a1[expand], a2[expand], b1[expand], b2[expand]


def merge(weight: Array, c1: Array, c2: Array, group_size: int, axis: int = 0) -> Array:
    """R @ W computed row-wise: rows of `weight` along `axis` are the rotated outputs (axis=1 for Conv1D).

    For a pair (i, j = i + g/2):  W'[i] = c1_i W[i] - c2_i W[j],  W'[j] = c2_j W[i] + c1_j W[j].
    A 1-D bias is merged with axis=0.
    """
    axis = axis % weight.ndim
    w1, w2, a1, a2, b1, b2 = _aligned(weight, c1, c2, group_size, axis)
    return _join(a1 * w1 - b1 * w2, b2 * w1 + a2 * w2, tuple(weight.shape), axis)


def merge_(weight: Array, c1: Array, c2: Array, group_size: int, axis: int = 0) -> Array:
    """In-place `merge`: overwrites `weight` (which must be contiguous) and returns it.

    Needs one scratch copy of half the rows instead of the several full-size temporaries of `merge`; this is
    what makes merging a large model memory-bound rather than allocation-bound.
    """
    w1, w2, a1, a2, b1, b2 = _aligned(weight, c1, c2, group_size, axis % weight.ndim)
    if _xp(weight) is np:
        old1 = w1.copy()
        w1 *= a1
        w1 -= b1 * w2
        w2 *= a2
        w2 += b2 * old1
    else:
        old1 = w1.clone()
        w1.mul_(a1).addcmul_(w2, b1, value=-1)
        w2.mul_(a2).addcmul_(old1, b2)
    return weight


def invert(c1: Array, c2: Array, group_size: int) -> tuple[Array, Array]:
    """Coefficients of R^-1, by inverting each 2x2 block [[c1_i, -c2_i], [c2_j, c1_j]]."""
    a, e = _pairs(c1, group_size)
    b, c = _pairs(c2, group_size)
    det = a * e + b * c
    shape = tuple(c1.shape)
    return _join(e / det, a / det, shape, -1), _join(-b / det, -c / det, shape, -1)


def unmerge(weight: Array, c1: Array, c2: Array, group_size: int, axis: int = 0) -> Array:
    """Exact inverse of `merge`."""
    i1, i2 = invert(c1, c2, group_size)
    return merge(weight, i1, i2, group_size, axis)


def compose(first: tuple[Array, Array], second: tuple[Array, Array], group_size: int) -> tuple[Array, Array]:
    """Coefficients of R2 @ R1 (apply `first`, then `second`); both must share group_size."""
    a1, e1 = _pairs(first[0], group_size)
    b1, c1 = _pairs(first[1], group_size)
    a2, e2 = _pairs(second[0], group_size)
    b2, c2 = _pairs(second[1], group_size)
    shape = tuple(first[0].shape)
    new_c1 = _join(a2 * a1 - b2 * c1, e2 * e1 - c2 * b1, shape, -1)
    new_c2 = _join(a2 * b1 + b2 * e1, c2 * a1 + e2 * c1, shape, -1)
    return new_c1, new_c2


def identity(d: int, like: Array | None = None) -> tuple[Array, Array]:
    """(c1, c2) of the identity rotation, as numpy or as `like`'s kind, dtype and device."""
    if like is None:
        return np.ones(d, np.float32), np.zeros(d, np.float32)
    xp = _xp(like)
    if xp is np:
        return np.ones(d, like.dtype), np.zeros(d, like.dtype)
    return xp.ones(d, dtype=like.dtype, device=like.device), xp.zeros(d, dtype=like.dtype, device=like.device)


def dense_matrix(c1: Array, c2: Array, group_size: int) -> Array:
    """The dense d x d matrix R (test reference only: O(d^2) memory)."""
    xp = _xp(c1)
    d = c1.shape[0]
    eye = xp.eye(d, dtype=c1.dtype) if xp is np else xp.eye(d, dtype=c1.dtype, device=c1.device)
    return merge(eye, c1, c2, group_size, axis=0)
