"""Parity reports: per-output errors of onnxruntime against a reference, as a table and as JSON (torch-free).

`road_export.verify` fills them against a torch model (peft's own, or road-export's), `road_export.crosscheck`
against another ONNX file. A row passes on finite values with max abs error <= atol, or, for a quantized file
(int4/int8 MatMul weights differ from the reference's by design), with cosine >= COSINE_MIN.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["BUDGET_FACTOR", "COSINE_MIN", "LONG_CAP", "SWEEP_BUDGET", "SWEEP_CHUNK", "SWEEP_ROW", "TOKEN_COSINE_MIN",
           "TOLERANCE", "OutputParity", "ParityReport", "compare", "merge_rows", "min_cosine", "skipped_row"]

TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
COSINE_MIN = 0.98  # a quantized file (int4/int8 MatMul weights) is judged by cosine, not max abs
# ... and no token's own logits may fall below this: the 0.98 of the whole output leaves room for one broken
# token among many (an output of zeros for one id, a damaged embedding row), which this catches. int4 tokens
# measured 0.97-0.995 on random models (the lowest of a 1,024-token sweep 0.977); a broken one is near 0.
TOKEN_COSINE_MIN = 0.9
# The coverage checks (road_export.verify against torch, road_export.crosscheck against another file): a vocabulary
# sweep feeds every id once in rows of SWEEP_ROW tokens (above SWEEP_BUDGET ids a seeded sample of SWEEP_BUDGET),
# in runs of at most SWEEP_CHUNK logits values; a long sequence feeds at most LONG_CAP tokens.
SWEEP_ROW, SWEEP_BUDGET, SWEEP_CHUNK = 64, 65536, 2**22
LONG_CAP = 256
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


@dataclass
class ParityReport:
    """Every row of one file's check, with what it was compared with and how the road ops ran."""

    onnx_path: str
    dtype: str
    atol: float
    rows: list[OutputParity] = field(default_factory=list)
    kernels: str = "-"  # how the road ops ran: "native" kernels, standard-op "bodies", or "-" (none in the file)
    reference: str = "road-export loader"  # what the file was compared with: "peft", road-export's model, a file
    quantized: str | None = None  # "int4"/"int8"/an op type: rows are then judged by cosine >= COSINE_MIN
    ids_covered: str = "-"  # token ids fed across the checks / vocabulary size, e.g. "256/256"
    longest_sequence: int = 0  # the longest sequence (new tokens, one row) checked
    budgeted: bool = False  # a float16 file judged by max(atol, the reference's own float16 error) (`compare`)

    @property
    def passed(self) -> bool:
        return any(r.skipped is None for r in self.rows) and all(r.ok for r in self.rows)

    @property
    def judged_by(self) -> str:
        """What decides each row: "max abs <= atol" (float files) or "cosine >= 0.98" (quantized files)."""
        if self.quantized:
            return f"cosine >= {COSINE_MIN:g}, each token >= {TOKEN_COSINE_MIN:g}"
        if self.budgeted:
            return f"max abs <= max({self.atol:g} x max(1, |reference|), {BUDGET_FACTOR:g} x |torch float16 - float32|)"
        return f"max abs <= {self.atol:g}"

    def to_json(self) -> str:
        return json.dumps({"onnx_path": self.onnx_path, "dtype": self.dtype, "atol": self.atol,
                           "quantized": self.quantized, "judged_by": self.judged_by, "reference": self.reference,
                           "kernels": self.kernels, "passed": self.passed,
                           "ids_covered": self.ids_covered, "longest_sequence": self.longest_sequence,
                           "rows": [asdict(r) for r in self.rows]}, indent=2)

    def table(self, color: bool = False) -> str:
        """The report as a terminal table."""
        from rich.console import Console
        from rich.table import Table

        road = "" if self.kernels == "-" else f", road ops: {self.kernels}"
        judged = f"{self.quantized} quantized, judged by {self.judged_by}" if self.quantized else \
            self.judged_by if self.budgeted else f"atol {self.atol:g}"
        table = Table(title=f"parity: {Path(self.onnx_path).name} ({self.dtype}, {judged}, "
                            f"reference: {self.reference}{road})")
        result = f"result ({self.judged_by})" if self.quantized else "result"
        token = ("min token cos",) if self.quantized else ()
        for col in ("output", "input", "max abs", "max rel", "cosine", *token, "top-1", result):
            table.add_column(col, justify="left" if col in ("output", "input") else "right")
        for r in self.rows:
            if r.skipped is not None:
                table.add_row(r.output, f"{r.case} ({r.skipped})", "-", "-", "-", *(("-",) if self.quantized else ()),
                              "-", "skipped")
                continue
            top1 = "-" if r.top1 is None else f"{r.top1:.4f}"
            cells = ("-" if r.token_cosine is None else f"{r.token_cosine:.4f}",) if self.quantized else ()
            table.add_row(r.output, r.case, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", f"{r.cosine:.6f}", *cells, top1,
                          "ok" if r.ok else "FAIL")
        buf = io.StringIO()
        Console(file=buf, width=110, force_terminal=color, color_system="auto" if color else None).print(table)
        verdict = "PASSED" if self.passed else "FAILED"
        coverage = "" if self.ids_covered == "-" else \
            f" (ids covered: {self.ids_covered}, longest sequence: {self.longest_sequence})"
        run = [r for r in self.rows if r.skipped is None]
        skipped = len(self.rows) - len(run)
        coverage += f" ({skipped} skipped: cannot be built for this model)" if skipped else ""
        return buf.getvalue() + f"parity {verdict}: {sum(r.ok for r in run)}/{len(run)} checks{coverage}\n"


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
