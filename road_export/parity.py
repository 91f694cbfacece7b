"""Parity reports: per-output errors of onnxruntime against a reference, as a table and as JSON (torch-free).

`road_export.verify` fills them against a torch model (peft's own, or road-export's), `road_export.crosscheck`
against another ONNX file; both judge a row by max abs error <= atol, on finite values.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["TOLERANCE", "OutputParity", "ParityReport", "compare"]

TOLERANCE = {"float32": 1e-4, "float16": 2e-2}


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


@dataclass
class ParityReport:
    onnx_path: str
    dtype: str
    atol: float
    rows: list[OutputParity] = field(default_factory=list)
    kernels: str = "-"  # how the road ops ran: "native" kernels, standard-op "bodies", or "-" (none in the file)
    reference: str = "road-export loader"  # what the file was compared with: "peft", or road-export's own model

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.ok for r in self.rows)

    def to_json(self) -> str:
        return json.dumps({"onnx_path": self.onnx_path, "dtype": self.dtype, "atol": self.atol,
                           "reference": self.reference, "kernels": self.kernels, "passed": self.passed,
                           "rows": [asdict(r) for r in self.rows]}, indent=2)

    def table(self, color: bool = False) -> str:
        """The report as a terminal table."""
        from rich.console import Console
        from rich.table import Table

        road = "" if self.kernels == "-" else f", road ops: {self.kernels}"
        table = Table(title=f"parity: {Path(self.onnx_path).name} ({self.dtype}, atol {self.atol:g}, "
                            f"reference: {self.reference}{road})")
        for col in ("output", "input", "max abs", "max rel", "cosine", "top-1", "result"):
            table.add_column(col, justify="left" if col in ("output", "input") else "right")
        for r in self.rows:
            top1 = "-" if r.top1 is None else f"{r.top1:.4f}"
            table.add_row(r.output, r.case, f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", f"{r.cosine:.6f}", top1,
                          "ok" if r.ok else "FAIL")
        buf = io.StringIO()
        Console(file=buf, width=110, force_terminal=color, color_system="auto" if color else None).print(table)
        verdict = "PASSED" if self.passed else "FAILED"
        return buf.getvalue() + f"parity {verdict}: {sum(r.ok for r in self.rows)}/{len(self.rows)} checks\n"


def compare(name: str, case: str, got: np.ndarray, expected: np.ndarray, mask: np.ndarray | None, atol: float,
            logits: bool) -> OutputParity:
    """Errors of `got` against `expected`. Top-1 agreement is reported, not judged on its own: within max_abs <= atol
    the argmax can only change where the reference's two best logits are within 2 * atol of each other."""
    got = got.astype(np.float32)
    if got.shape != expected.shape:
        return OutputParity(name, case, list(got.shape), math.inf, math.inf, 0.0, None, False)
    if mask is not None and got.ndim == 3 and mask.shape == got.shape[:2]:
        got, expected = got[mask], expected[mask]
    diff = np.abs(got - expected)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / np.maximum(np.abs(expected), 1e-6)).max()) if diff.size else 0.0
    denom = float(np.linalg.norm(got) * np.linalg.norm(expected))
    cosine = float((got.ravel() @ expected.ravel()) / denom) if denom else 1.0
    top1 = None
    if logits and got.size:
        g2, e2 = got.reshape(-1, got.shape[-1]), expected.reshape(-1, expected.shape[-1])
        top1 = float((g2.argmax(-1) == e2.argmax(-1)).mean())
    ok = bool(np.isfinite(got).all()) and max_abs <= atol
    return OutputParity(name, case, list(got.shape), max_abs, max_rel, cosine, top1, ok)


# Encoder-decoder cases: (batch, encoder length, encoder padding, decoder tokens, past decoder length)
SEQ2SEQ_SHAPES: tuple[tuple[int, int, int, int, int], ...] = ((1, 1, 0, 1, 1), (3, 7, 2, 1, 6), (2, 9, 3, 4, 3))
