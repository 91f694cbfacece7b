"""The parity report: every row of one file's check, as a terminal table and as JSON (torch-free)."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from road_export.app.parity.comparisons import BUDGET_FACTOR, COSINE_MIN, TOKEN_COSINE_MIN, OutputParity

__all__ = ["ParityReport"]


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
