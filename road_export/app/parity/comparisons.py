"""Comparisons: one output of onnxruntime against its reference, judged by the harness's rules (torch-free).

A row passes on finite values with max abs error <= atol (TOLERANCE by the file's dtype; a float16 file against a
float32 reference may use the reference's own float16 error as a budget), or, for a quantized file (int4/int8
MatMul weights differ from the reference's by design), with cosine >= COSINE_MIN for the whole output and
>= TOKEN_COSINE_MIN for each token's logits. `compare` makes one row (`OutputParity`), `compare_present` and
`compare_flat` one row for all present keys/values, `merge_rows` one row of several runs of a check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["BUDGET_FACTOR", "COSINE_MIN", "TOKEN_COSINE_MIN", "TOLERANCE", "OutputParity", "compare", "compare_flat",
           "compare_present", "failed_row", "merge_rows", "min_cosine", "skipped_row"]

TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
COSINE_MIN = 0.98  # a quantized file (int4/int8 MatMul weights) is judged by cosine, not max abs
# ... and no token's own logits may fall below this: the 0.98 of the whole output leaves room for one broken
# token among many (an output of zeros for one id, a damaged embedding row), which this catches. int4 tokens
# measured 0.97-0.995 on random models (the lowest of a 1,024-token sweep 0.977); a broken one is near 0.
TOKEN_COSINE_MIN = 0.9
# a float16 file may differ from the float32 reference by this many times the reference's own float16 error
BUDGET_FACTOR = 2.0


@dataclass
class OutputParity:
    """One output on one input shape."""

    output: str
    case: str
    shape: list[int]
    max_abs: float
    max_rel: float
    cosine: float
    top1: float | None
    ok: bool
    token_cosine: float | None = None  # logits: the smallest cosine of one token's logits (judged on quantized files)
    skipped: str | None = None  # a check that cannot be built or run for this model: why (neither passes nor fails)


def skipped_row(output: str, case: str, reason: str) -> OutputParity:
    """A row saying that the check `case` cannot be built for this model, or run by its operators (e.g. the
    reference itself cannot run the input, or GroupQueryAttention refuses it), and why: it does not fail the file
    and is shown as "skipped" in the table, with the reason."""
    return OutputParity(output, case, [], 0.0, 0.0, 1.0, None, True, skipped=reason)


def failed_row(output: str, case: str, shape: list[int] | None = None) -> OutputParity:
    """A failed row with infinite errors: a check whose outputs cannot be compared at all (a missing or
    unreadable sidecar, another shape, another number of outputs)."""
    return OutputParity(output, case, list(shape or []), math.inf, math.inf, 0.0, None, False)


def min_cosine(got: np.ndarray, expected: np.ndarray, rows: bool) -> float:
    """The cosine similarity of `got` and `expected` (same shape, float32): with `rows`, that of each vector along
    the last axis (one token's logits) and the smallest of them, else of the whole flattened arrays. Two zero
    vectors count 1 (equal); a zero vector against a nonzero one counts 0, so an output of zeros fails; NaN
    stays NaN (and fails)."""
    if not got.size:
        return 1.0
    width = got.shape[-1] if rows and got.ndim else got.size
    g, e = got.reshape(-1, width), expected.reshape(-1, width)
    dots = np.einsum("ij,ij->i", g, e, dtype=np.float64)
    norms = np.linalg.norm(g, axis=1).astype(np.float64) * np.linalg.norm(e, axis=1)
    zero_g, zero_e = ~np.any(g, axis=1), ~np.any(e, axis=1)
    cos = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    cos[zero_g & zero_e] = 1.0
    cos[np.isnan(dots) | np.isnan(norms)] = np.nan
    return float(cos.min())


def compare(name: str, case: str, got: np.ndarray, expected: np.ndarray, mask: np.ndarray | None, atol: float,
            logits: bool, by_cosine: bool = False, budget: float | None = None) -> OutputParity:
    """Errors of `got` against `expected` (any shape; `mask` [batch, sequence] picks the positions of a
    [batch, sequence, ...] output that count). Top-1 agreement is reported, not judged on its own: within
    max_abs <= atol the argmax can only change where the reference's two best logits are within 2 * atol of each
    other. `cosine` is that of the whole output, `token_cosine` (logits) the smallest of one token's logits against
    the reference's (`min_cosine`). `by_cosine` (a quantized file, whose weights differ from the reference's by
    design): the row passes when cosine >= COSINE_MIN and token_cosine >= TOKEN_COSINE_MIN, instead of
    max abs <= atol. `budget` (a float16 file): the reference's own float16 error on the same inputs (max
    |torch float16 - torch float32|); the row passes when max abs <= max(atol x max(1, max |expected|),
    BUDGET_FACTOR x budget). float16 rounds relative to magnitude, so a T5 whose logits reach 13 differs from its
    float32 self by ~0.3 in torch's float16 too (onnxruntime's float16 kernels accumulate differently again): a
    fixed 2e-2 would blame a right file, while another adapter's outputs stay far outside both bounds."""
    # no copy of a float32 array, and the error arrays computed in place: on a large vocabulary the logits of one
    # long row are tens of MB each, and verify holds a torch model and an onnxruntime session beside them
    got = np.asarray(got, dtype=np.float32)
    expected = np.asarray(expected, dtype=np.float32)
    if got.shape != expected.shape:
        return OutputParity(name, case, list(got.shape), math.inf, math.inf, 0.0, None, False)
    if mask is not None and got.ndim == 3 and mask.shape == got.shape[:2]:
        if mask.all():  # no padding (the sweep, the long sequence): the same rows as views, not copies
            got, expected = got.reshape(-1, got.shape[-1]), expected.reshape(-1, expected.shape[-1])
        else:
            got, expected = got[mask], expected[mask]
    if budget is not None:
        atol = max(atol * max(1.0, float(np.abs(expected).max()) if expected.size else 1.0), BUDGET_FACTOR * budget)
    diff = np.subtract(got, expected)
    np.abs(diff, out=diff)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = np.abs(expected)
    np.maximum(scale, 1e-6, out=scale)
    np.divide(diff, scale, out=scale)
    max_rel = float(scale.max()) if diff.size else 0.0
    del diff, scale
    cosine = min_cosine(got, expected, rows=False)
    token_cosine = min_cosine(got, expected, rows=True) if logits else None
    top1 = None
    if logits and got.size:
        g2, e2 = got.reshape(-1, got.shape[-1]), expected.reshape(-1, expected.shape[-1])
        top1 = float((g2.argmax(-1) == e2.argmax(-1)).mean())
    if by_cosine:
        close = cosine >= COSINE_MIN and (token_cosine is None or token_cosine >= TOKEN_COSINE_MIN)
    else:
        close = max_abs <= atol
    ok = bool(np.isfinite(got).all()) and close
    return OutputParity(name, case, list(got.shape), max_abs, max_rel, cosine, top1, ok, token_cosine)


def merge_rows(rows: list[OutputParity], case: str) -> OutputParity:
    """Several runs of one check as one row: the largest errors, the smallest cosines, the mean top-1."""
    top1 = [r.top1 for r in rows if r.top1 is not None]
    return OutputParity(rows[0].output, case, [sum(r.shape[0] for r in rows), *rows[0].shape[1:]],
                        max(r.max_abs for r in rows), max(r.max_rel for r in rows), min(r.cosine for r in rows),
                        float(np.mean(top1)) if top1 else None, all(r.ok for r in rows),
                        min((r.token_cosine for r in rows if r.token_cosine is not None), default=None))


def compare_present(case: str, got: list[np.ndarray], expected: list[np.ndarray], mask: np.ndarray, atol: float,
                    by_cosine: bool = False) -> OutputParity:
    """All present keys/values [batch, heads, positions, head size] as one row "present.*"; positions under padding
    (`mask` [batch, positions] False) are left out ([b, h, t, d] -> [real, h, d]). A different number of outputs or
    a different shape is a failed row."""
    if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected, strict=False)):
        return failed_row("present.*", case, [len(got)])
    flat = lambda ts: np.concatenate([t.transpose(0, 2, 1, 3)[mask].ravel() for t in ts])  # noqa: E731
    row = compare("present.*", case, flat(got), flat(expected), None, atol, logits=False, by_cosine=by_cosine)
    row.shape = list(got[0].shape)
    return row


def compare_flat(case: str, got: list[np.ndarray], expected: list[np.ndarray], atol: float,
                 budget: float | None = None) -> OutputParity:
    """All present keys/values of differing lengths (an encoder-decoder's decoder and cross-attention ones) as one
    row "present.*", every position counted; `budget` as in `compare`."""
    if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected, strict=False)):
        return failed_row("present.*", case, [len(got)])
    flat = lambda ts: np.concatenate([t.astype(np.float32).ravel() for t in ts])  # noqa: E731
    row = compare("present.*", case, flat(got), flat(expected), None, atol, logits=False, budget=budget)
    row.shape = list(got[0].shape)
    return row
