"""linear_rotate: a product then a `road` rotation -> one `road.LinearRotate` / `road.MatMulNBitsRotate` node, the
weight kept as [n, k] rows, for onnxruntime's CUDA provider and files that must hold the fused node themselves
(onnxruntime-genai model directories: genai opens the file as it is, so no in-memory rewrite can happen there).

    road.Rotate(MatMul(x, W), C1, C2)          -> road.LinearRotate(x, W^T, C1, C2)     (W a [k, n] constant)
    road.Rotate(com.microsoft.MatMulNBits(a, B, s), C1, C2)
                                               -> road.MatMulNBitsRotate(a, B, s, C1, C2; K, N, bits, block_size)
    the same with banks gathered by adapter_ids -> road.LinearRotateRows / road.MatMulNBitsRotateRows

(and `road.RotateTied` alike). Why [n, k]: the CUDA kernel (road_export/graph/native/road_cuda.h, `tile`) reads each
output column's weights as one contiguous row, both columns of a rotation pair in the same block, so a decode
step's product spreads over n/8 blocks and every SM, the layout MatMulNBits' blocks have already; `road.MatMulRotate`
(passes/matmul_rotate.py, W [k, n] as exported) keeps 64 columns a block. MatMulNBits is taken only in the form the
kernel reads: symmetric blocks (no zero_points, g_idx or bias input), 4 or 8 bits, block_size a multiple of 16.
A rule that does not fire says why (`LinearRotatePass(debug=True).not_fired`). The ops carry standard-op bodies
(road_export/graph/ops.py: Transpose + MatMul, or MatMulNBits, then road.Rotate), so the file still runs anywhere.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from road_export.graph import ops as road_op
from road_export.passes import common
from road_export.passes.matmul_rotate import (BankRowsRule, FuseMatMulRotate, FuseMatMulRotateRows, bank_rows,
                                             not_fired_reasons)

__all__ = ["FuseLinearRotate", "FuseLinearRotateRows", "FuseNBitsRotate", "FuseNBitsRotateRows", "LinearRotatePass",
           "LinearRotateResult"]

logger = logging.getLogger(__name__)

_PENDING = "_road_transpose_w"  # marks a LinearRotate whose W is still [k, n] until the pass transposes it


def _constant_weight(result: pattern.MatchResult, w: ir.Value) -> pattern.MatchResult | None:
    if common.constant(w) is None:
        return result.fail(f"W {w.name} is not a constant: the fused node keeps the weight transposed", w)
    return None


class FuseLinearRotate(FuseMatMulRotate):
    """road.Rotate / road.RotateTied(MatMul(x, W), C1, C2) -> road.LinearRotate(x, W^T, C1, C2; group_size)."""

    def check(self, context, x, w, c1, c2, y, **rest) -> pattern.MatchResult:
        result = super().check(context, x, w, c1, c2, y, **rest)
        return (_constant_weight(result, w) or result) if result else result

    def rewrite(self, op, x, w, c1, c2, y, **_):
        g = common.group_size(y.producer())
        return op.op(road_op.LINEAR_OP_TYPE, x, w, c1, c2, group_size=g, _domain=road_op.DOMAIN,
                     _version=road_op.VERSION, **{_PENDING: 1})


class FuseLinearRotateRows(FuseMatMulRotateRows):
    """The per-row bank form of FuseLinearRotate -> road.LinearRotateRows(x, W^T, B1, B2, adapter_ids)."""

    def check(self, context, x, w, b1, i1, s1, b2, i2, s2, y, g1, g2, **rest) -> pattern.MatchResult:
        result = super().check(context, x, w, b1, i1, s1, b2, i2, s2, y, g1, g2, **rest)
        return (_constant_weight(result, w) or result) if result else result

    def rewrite(self, op, x, w, b1, b2, y, **_):
        assert self._ids is not None
        g = common.group_size(y.producer())
        return op.op(road_op.LINEAR_ROWS_OP_TYPE, x, w, b1, b2, self._ids, group_size=g, _domain=road_op.DOMAIN,
                     _version=road_op.VERSION, **{_PENDING: 1})


def _nbits_check(result: pattern.MatchResult, product: ir.Node) -> pattern.MatchResult | None:
    """Whether a MatMulNBits node is one the kernel reads (see the module docstring); None when it is."""
    extra = [i for i, v in enumerate(product.inputs) if i >= 3 and v is not None]
    if extra:
        named = {3: "zero_points", 4: "g_idx", 5: "bias"}
        return result.fail(f"{product.name}: MatMulNBits with {', '.join(named.get(i, str(i)) for i in extra)}; the "
                           "kernel reads symmetric blocks only", product)
    a = {name: product.attributes.get_int(name, 0) for name in ("K", "N", "bits", "block_size")}
    if a["bits"] not in (4, 8) or a["block_size"] < 16 or a["block_size"] % 16 or a["K"] % 8 or a["N"] < 1:
        return result.fail(f"{product.name}: MatMulNBits {a}; the kernel takes bits 4 or 8, block_size a multiple of "
                           "16 and K a multiple of 8", product)
    return None


def _nbits_attributes(product: ir.Node) -> dict[str, int]:
    return {name: product.attributes.get_int(name, 0) for name in ("K", "N", "bits", "block_size")}


class FuseNBitsRotate(pattern.RewriteRuleClassBase):
    """road.Rotate / road.RotateTied(MatMulNBits(a, B, scales), C1, C2) -> road.MatMulNBitsRotate(a, B, scales, C1,
    C2; K, N, bits, block_size, group_size)."""

    def __init__(self, op_type: str = road_op.OP_TYPE) -> None:
        super().__init__(name=f"FuseMatMulNBits{op_type}")
        self.op_type = op_type

    def pattern(self, op, a, b, s, c1, c2):
        product = op.MatMulNBits(a, b, s, _domain=road_op.MICROSOFT, _allow_other_attributes=True,
                                 _allow_other_inputs=True, _outputs=["p"])
        return getattr(op, self.op_type)(product, c1, c2, _domain=road_op.DOMAIN, _allow_other_attributes=True,
                                         _outputs=["y"])

    def check(self, context, a, b, s, c1, c2, p, y, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        return _nbits_check(result, p.producer()) or result

    def rewrite(self, op, a, b, s, c1, c2, p, y, **_):
        g = common.group_size(y.producer())
        return op.op(road_op.NBITS_OP_TYPE, a, b, s, c1, c2, group_size=g, **_nbits_attributes(p.producer()),
                     _domain=road_op.DOMAIN, _version=road_op.VERSION)


class FuseNBitsRotateRows(BankRowsRule):
    """The per-row bank form of FuseNBitsRotate -> road.MatMulNBitsRotateRows(a, B, scales, B1, B2, adapter_ids)."""

    def __init__(self, op_type: str = road_op.OP_TYPE) -> None:
        super().__init__(f"FuseMatMulNBits{op_type}Rows", op_type)

    def pattern(self, op, a, b, s, b1, i1, s1, b2, i2, s2):
        c1, c2 = bank_rows(op, b1, i1, s1, b2, i2, s2)
        product = op.MatMulNBits(a, b, s, _domain=road_op.MICROSOFT, _allow_other_attributes=True,
                                 _allow_other_inputs=True, _outputs=["p"])
        return getattr(op, self.op_type)(product, c1, c2, _domain=road_op.DOMAIN, _allow_other_attributes=True,
                                         _outputs=["y"])

    def check(self, context, a, b, s, b1, i1, s1, b2, i2, s2, p, y, g1, g2, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        return self.banks_checked(result, _nbits_check(result, p.producer()), b1, i1, s1, b2, i2, s2, y, g1, g2)

    def rewrite(self, op, a, b, s, b1, b2, p, y, **_):
        assert self._ids is not None
        g = common.group_size(y.producer())
        return op.op(road_op.NBITS_ROWS_OP_TYPE, a, b, s, b1, b2, self._ids, group_size=g,
                     **_nbits_attributes(p.producer()), _domain=road_op.DOMAIN, _version=road_op.VERSION)


@dataclasses.dataclass
class LinearRotateResult(ir.passes.PassResult):
    """The pass result: nodes written per form and, with `debug=True`, why near-matches did not fire."""

    linear: int = 0
    nbits: int = 0
    rows: int = 0
    not_fired: list[str] = dataclasses.field(default_factory=list)


def _transpose_pending(model: ir.Model) -> None:
    """Give each LinearRotate written by the rules its weight as [n, k]: a new initializer (the old one is dropped
    by the unused-node sweep when nothing else reads it)."""
    graph = model.graph
    for node in graph.all_nodes():
        if node.domain != road_op.DOMAIN or _PENDING not in node.attributes:
            continue
        del node.attributes[_PENDING]
        w = node.inputs[1]
        array = common.constant(w)
        assert array is not None  # the rules checked it
        transposed = ir.Value(name=common.unique_name(graph, f"{w.name}.T"),
                              const_value=ir.tensor(np.ascontiguousarray(array.T)))
        transposed.dtype, transposed.shape = w.dtype, ir.Shape(list(array.T.shape))
        graph.register_initializer(transposed)
        node.replace_input_with(1, transposed)
        if not list(w.uses()) and w.is_initializer() and not w.is_graph_input() and not w.is_graph_output():
            graph.initializers.pop(w.name)


class LinearRotatePass(ir.passes.InPlacePass):
    """Fuse each MatMul (constant weight) or symmetric MatMulNBits feeding a road rotation into `road.LinearRotate`
    or `road.MatMulNBitsRotate` (`...Rows` for per-row banks), weights as [n, k] rows.

    Rotations after anything else (a bias Add, a MatMul with a computed weight, a MatMulNBits with zero points) stay
    as they are and, with `debug=True`, are listed in `not_fired` with the reason. Attaches the ops' function
    definitions when it fused anything.
    """

    def __init__(self, debug: bool = False, forms: tuple[str, ...] = ("linear", "nbits")) -> None:
        """`forms`: which products to fuse: "linear" (float MatMul, whose weight is transposed into a new in-memory
        initializer) and/or "nbits" (MatMulNBits, whose blocks are reused as they are)."""
        super().__init__()
        self.debug = debug
        self.forms = forms

    def call(self, model: ir.Model) -> LinearRotateResult:
        kinds = (road_op.OP_TYPE, road_op.TIED_OP_TYPE)
        rows = ([FuseLinearRotateRows] if "linear" in self.forms else []) + \
            ([FuseNBitsRotateRows] if "nbits" in self.forms else [])
        plain = ([FuseLinearRotate] if "linear" in self.forms else []) + \
            ([FuseNBitsRotate] if "nbits" in self.forms else [])
        stages = [  # per-row forms first: the plain rules would match their Rotate too
            ("rows", pattern.RewriteRuleSet([rule.rule(k) for rule in rows for k in kinds])),
            ("plain", pattern.RewriteRuleSet([rule.rule(k) for rule in plain for k in kinds])),
        ]
        total, rows, not_fired = 0, 0, []
        for name, rules in stages:
            count = rules.apply_to_model(model)
            total += count
            rows += count if name == "rows" else 0
            if self.debug:
                not_fired += not_fired_reasons(rules, model)
        counts = {t: sum(1 for n in model.graph.all_nodes() if n.domain == road_op.DOMAIN and n.op_type == t)
                  for t in (road_op.LINEAR_OP_TYPE, road_op.LINEAR_ROWS_OP_TYPE, road_op.NBITS_OP_TYPE,
                            road_op.NBITS_ROWS_OP_TYPE)}
        if total:
            _transpose_pending(model)
            ir.passes.common.RemoveUnusedNodesPass()(model)
            road_op.attach_functions(model)
            logger.info("linear_rotate: %d product + rotation pair(s) fused (%d with per-row banks)", total, rows)
        for line in not_fired:
            logger.debug("linear_rotate: did not fire at %s", line)
        linear = counts[road_op.LINEAR_OP_TYPE] + counts[road_op.LINEAR_ROWS_OP_TYPE]
        nbits = counts[road_op.NBITS_OP_TYPE] + counts[road_op.NBITS_ROWS_OP_TYPE]
        return LinearRotateResult(model, modified=bool(total), linear=linear, nbits=nbits, rows=rows,
                                  not_fired=not_fired)
