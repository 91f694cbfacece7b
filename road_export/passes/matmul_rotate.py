"""matmul_rotate: `MatMul` then a `road` rotation -> one `road.MatMulRotate` node, for onnxruntime's CUDA provider.

On the GPU a decode step is bound by the host: onnxruntime spends a few microseconds per node whatever the node
computes, so a rotation node after each adapted MatMul costs about as much as the MatMul itself (measured on an
H200, `tools/bench_gpu.py`). The road kernel library's CUDA `road.MatMulRotate` runs the product and the rotation
as one node on onnxruntime's stream: one GEMV launch for up to 8 rows (decode), else cuBLAS's GEMM then the
rotation in place:

    road.Rotate(MatMul(x, W), C1, C2)                       -> road.MatMulRotate(x, W, C1, C2)
    road.Rotate(MatMul(x, W), Reshape(GatherND(B1, Unsqueeze(adapter_ids, [1])), [-1, 1, n]),
                Reshape(GatherND(B2, ...), [-1, 1, n]))     -> road.MatMulRotateRows(x, W, B1, B2, adapter_ids)

(and the same for `road.RotateTied`). The second form is the mixed-adapter export's per-row coefficients
(export/prepare.py: banks [adapters + 1, n] gathered by `adapter_ids`); folding the gather into the kernel removes
its four nodes per rotation too. W must be a 2-D weight [k, n]; coefficients of a swappable export (graph inputs
with initializers) stay inputs, so `.onnx_adapter` swapping works unchanged. The rewrite is for sessions that
register the CUDA kernels (road_export.runtime.gpu); the ops carry standard-op bodies (road_export/graph/ops.py), so a
file written with them still runs anywhere.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchingTracer, MatchStatus, pattern

from road_export.core import names
from road_export.graph import ops as road_op
from road_export.passes import common

__all__ = ["MatMulRotateResult", "MatMulRotatePass", "FuseMatMulRotate", "FuseMatMulRotateRows", "bank_ids",
           "bank_rows", "not_fired_reasons"]

logger = logging.getLogger(__name__)


def _weight_check(result: pattern.MatchResult, w: ir.Value, y: ir.Value) -> pattern.MatchResult | None:
    if w.shape is None or len(w.shape) != 2:
        return result.fail(f"W {w.name} is not 2-D (shape {w.shape}); the kernel multiplies by a [k, n] matrix", w)
    if isinstance(w.shape[1], int) and y.shape is not None and isinstance(y.shape[-1], int) \
            and w.shape[1] != y.shape[-1]:
        return result.fail(f"W's output axis {w.shape[1]} is not the rotation's last axis {y.shape[-1]}", w)
    return None


def bank_rows(op, b1, i1, s1, b2, i2, s2):
    """The pattern of a mixed export's per-row coefficients: Reshape(GatherND(bank, index), shape) for C1 and C2
    (outputs `g1`, `g2` are the gathers, for `bank_ids`)."""
    rows = []
    for bank, index, shape, name in ((b1, i1, s1, "g1"), (b2, i2, s2, "g2")):
        gathered = op.GatherND(bank, index, _allow_other_attributes=True, _outputs=[name])
        rows.append(op.Reshape(gathered, shape, _allow_other_attributes=True))
    return rows[0], rows[1]


def bank_ids(result: pattern.MatchResult, b1: ir.Value, i1: ir.Value, s1: ir.Value, b2: ir.Value, i2: ir.Value,
             s2: ir.Value, y: ir.Value, g1: ir.Value, g2: ir.Value) -> ir.Value | pattern.MatchResult:
    """The graph input `adapter_ids` when the rotation's coefficients are bank rows gathered by it (GatherND of
    banks [adapters, n] by Unsqueeze(adapter_ids, [1]), reshaped to [-1, 1, ..., n] against the output `y`), else
    the failed match with the reason."""
    for gathered in (g1, g2):
        batch_dims = gathered.producer().attributes.get("batch_dims")
        if batch_dims is not None and batch_dims.value != 0:
            return result.fail(f"{gathered.name}: GatherND with batch_dims {batch_dims.value}, not 0", gathered)
    ids = []
    for index in (i1, i2):
        producer = index.producer()
        if producer is None or producer.op_type != "Unsqueeze" or producer.domain not in ("", "ai.onnx"):
            return result.fail(f"{index.name} is not Unsqueeze(adapter_ids, [1])", index)
        source, axes = producer.inputs[0], common.constant(producer.inputs[1]) if len(producer.inputs) > 1 \
            else None
        if source is None or source.name != names.ADAPTER_IDS or not source.is_graph_input():
            return result.fail(f"{index.name} does not index by the graph input {names.ADAPTER_IDS}", index)
        if axes is None or axes.reshape(-1).tolist() not in ([1], [-1]):
            return result.fail(f"{index.name} unsqueezes adapter_ids on axes {axes}, not [1]", index)
        ids.append(source)
    for bank, shape in ((b1, s1), (b2, s2)):
        if bank.shape is None or len(bank.shape) != 2:
            return result.fail(f"bank {bank.name} is not 2-D [adapters, n] (shape {bank.shape})", bank)
        target = common.constant(shape)
        n = bank.shape[1]
        if target is None or y.shape is None or len(target) != len(y.shape) or target[0] != -1 \
                or not np.all(target[1:-1] == 1) or target[-1] != n:
            return result.fail(f"coefficients reshaped to {None if target is None else target.tolist()}, not "
                               f"[-1, 1, ..., {n}] against a rank-{None if y.shape is None else len(y.shape)} "
                               "output", shape)
    return ids[0]


def not_fired_reasons(rules: pattern.RewriteRuleSet, model: ir.Model) -> list[str]:
    """`node: reason` for each near-match of `rules` on `model` whose condition failed (a traced application only
    records matches: run it after the real one, and what is left is what did not fire)."""
    tracer = MatchingTracer()
    rules.apply_to_model(model, tracer=tracer)
    return [f"{info.root_node.name}: {info.match_result.reason}" for matches in tracer.best_matches_map.values()
            for info in matches if info.status == MatchStatus.CONDITION_FAILED]


class FuseMatMulRotate(pattern.RewriteRuleClassBase):
    """road.Rotate / road.RotateTied(MatMul(x, W), C1, C2) -> road.MatMulRotate(x, W, C1, C2; group_size)."""

    def __init__(self, op_type: str = road_op.OP_TYPE) -> None:
        super().__init__(name=f"FuseMatMul{op_type}")
        self.op_type = op_type

    def pattern(self, op, x, w, c1, c2):
        return getattr(op, self.op_type)(op.MatMul(x, w), c1, c2, _domain=road_op.DOMAIN, _allow_other_attributes=True,
                     _outputs=["y"])

    def check(self, context, x, w, c1, c2, y, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        failed = _weight_check(result, w, y)
        return failed if failed is not None else result

    def rewrite(self, op, x, w, c1, c2, y, **_):
        g = common.group_size(y.producer())
        return op.op(road_op.MATMUL_OP_TYPE, x, w, c1, c2, group_size=g, _domain=road_op.DOMAIN,
                     _version=road_op.VERSION)


class BankRowsRule(pattern.RewriteRuleClassBase):
    """A rule whose rotation takes bank rows gathered by `adapter_ids` (`bank_rows`): `check` ends in `banks_checked`,
    which keeps the matched `adapter_ids` for `rewrite` (self._ids)."""

    def __init__(self, name: str, op_type: str) -> None:
        super().__init__(name=name)
        self.op_type = op_type
        self._ids: ir.Value | None = None

    def banks_checked(self, result: pattern.MatchResult, failed: pattern.MatchResult | None, b1: ir.Value,
                      i1: ir.Value, s1: ir.Value, b2: ir.Value, i2: ir.Value, s2: ir.Value, y: ir.Value, g1: ir.Value,
                      g2: ir.Value) -> pattern.MatchResult:
        """`failed` (the product's own check) when set, else `bank_ids`' verdict; on a match `adapter_ids` is kept."""
        if failed is not None:
            return failed
        found = bank_ids(result, b1, i1, s1, b2, i2, s2, y, g1, g2)
        if not isinstance(found, ir.Value):
            return found
        self._ids = found
        return result


class FuseMatMulRotateRows(BankRowsRule):
    """The mixed-adapter form: coefficients gathered per row from banks by `adapter_ids` -> road.MatMulRotateRows."""

    def __init__(self, op_type: str = road_op.OP_TYPE) -> None:
        super().__init__(f"FuseMatMul{op_type}Rows", op_type)

    def pattern(self, op, x, w, b1, i1, s1, b2, i2, s2):
        c1, c2 = bank_rows(op, b1, i1, s1, b2, i2, s2)
        return getattr(op, self.op_type)(op.MatMul(x, w), c1, c2, _domain=road_op.DOMAIN, _allow_other_attributes=True,
                     _outputs=["y"])

    def check(self, context, x, w, b1, i1, s1, b2, i2, s2, y, g1, g2, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        return self.banks_checked(result, _weight_check(result, w, y), b1, i1, s1, b2, i2, s2, y, g1, g2)

    def rewrite(self, op, x, w, b1, b2, y, **_):
        assert self._ids is not None
        g = common.group_size(y.producer())
        return op.op(road_op.MATMUL_ROWS_OP_TYPE, x, w, b1, b2, self._ids, group_size=g, _domain=road_op.DOMAIN,
                     _version=road_op.VERSION)


@dataclasses.dataclass
class MatMulRotateResult(ir.passes.PassResult):
    """The pass result plus how many nodes of each form were written and, with `debug=True`, why near-matches did
    not fire."""

    fused: int = 0
    rows: int = 0
    not_fired: list[str] = dataclasses.field(default_factory=list)


class MatMulRotatePass(ir.passes.InPlacePass):
    """Fuse each MatMul feeding a road rotation into `road.MatMulRotate` (or `...Rows` for per-row banks).

    Rotations whose input is not a 2-D-weight MatMul, or whose MatMul output has other uses, stay as they are.
    Attaches the ops' function definitions when it fused anything.
    """

    def __init__(self, debug: bool = False) -> None:
        super().__init__()
        self.debug = debug

    def call(self, model: ir.Model) -> MatMulRotateResult:
        kinds = (road_op.OP_TYPE, road_op.TIED_OP_TYPE)
        row_rules = pattern.RewriteRuleSet([FuseMatMulRotateRows.rule(k) for k in kinds])
        plain_rules = pattern.RewriteRuleSet([FuseMatMulRotate.rule(k) for k in kinds])
        not_fired: list[str] = []
        rows = row_rules.apply_to_model(model)  # first: the plain rule matches these too
        if self.debug:
            not_fired += not_fired_reasons(row_rules, model)
        plain = plain_rules.apply_to_model(model)
        if self.debug:
            not_fired += not_fired_reasons(plain_rules, model)
        if rows or plain:
            ir.passes.common.RemoveUnusedNodesPass()(model)
            road_op.attach_functions(model)
            logger.info("matmul_rotate: %d MatMul + rotation pair(s) fused (%d with per-row banks)", rows + plain,
                        rows)
        for line in not_fired:
            logger.debug("matmul_rotate: did not fire at %s", line)
        return MatMulRotateResult(model, modified=bool(rows or plain), fused=rows + plain, rows=rows,
                                  not_fired=not_fired)
