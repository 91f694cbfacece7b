"""fold: a rotation of a MatMul/Gemm output with a constant weight -> that MatMul/Gemm with the merged weight.

Merging at graph level: `road.Rotate(MatMul(x, W) [+ b])` becomes `MatMul(x, R-rotated W) [+ R b]`, row-wise
(no dense R). W is [in, out] for MatMul (rotated along axis 1); for Gemm it is [out, in] with transB=1
(axis 0) or [in, out] with transB=0 (axis 1). The original weight is left for any other user; the rotated one is
a new initializer.

The rotated weight is a lazy tensor (`ir.LazyTensor`): it is computed when the model is saved, one weight at a
time, from the source weight (read from `.data` and its map closed again for a file with external data). So
folding every layer of a large model never holds more than one rotated weight; the values are those the eager
computation gives, bit for bit (same function, same input).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from road_export.core import rotation
from road_export.graph import ops as road_op
from road_export.graph.files import release
from road_export.core.names import METADATA_SWAP
from road_export.passes import common

__all__ = ["RULES", "FoldGemm", "FoldMatMul", "FoldMatMulAdd", "FoldPass", "FoldResult", "FreezeSwappablePass"]

logger = logging.getLogger(__name__)


def _check_coefficients(result: pattern.MatchResult, c1: ir.Value, c2: ir.Value, d: int):
    a1, a2 = common.constant(c1), common.constant(c2)
    if a1 is None or a2 is None:
        return result.fail("C1 or C2 is not a constant (swappable adapters are not folded)", [c1, c2]), None
    if a1.size != d or a2.size != d:
        return result.fail(f"coefficients of size {a1.size} do not fit the weight's {d} outputs", [c1, c2]), None
    return None, (a1.reshape(d).astype(np.float32), a2.reshape(d).astype(np.float32))


def _merged(weight: np.ndarray, coeffs, g: int, axis: int) -> np.ndarray:
    merged = rotation.merge_(weight.astype(np.float32, copy=True), coeffs[0], coeffs[1], g, axis=axis)
    return merged.astype(weight.dtype)


def _lazy_merged(value: ir.Value, weight: np.ndarray, coeffs, g: int, axis: int) -> ir.TensorProtocol:
    """`_merged(weight)` computed when its bytes are needed (at save), reading `value`'s tensor afresh each time;
    eager for a weight that is not an initializer (a Constant node's)."""
    source = value.const_value
    if source is None:
        return ir.tensor(_merged(weight, coeffs, g, axis))

    def compute() -> ir.Tensor:
        try:
            return ir.tensor(_merged(source.numpy(), coeffs, g, axis))
        finally:
            release(source)  # close the map: its pages would stay resident otherwise

    return ir.LazyTensor(compute, dtype=source.dtype, shape=ir.Shape(weight.shape))


class _FoldBase(pattern.RewriteRuleClassBase):
    def __init__(self, name: str) -> None:
        super().__init__(name=name)
        self._graph: ir.Graph | ir.Function | None = None
        self._plan: dict = {}

    def _new(self, op, array: np.ndarray | ir.TensorProtocol, like: ir.Value) -> ir.Value:
        name = common.unique_name(self._graph, f"{like.name or 'weight'}.road_merged")
        tensor = array if isinstance(array, ir.LazyTensor) else ir.tensor(array)
        return op.initializer(tensor, name=name)


class FoldMatMul(_FoldBase):
    """road.Rotate(MatMul(x, W), C1, C2) -> MatMul(x, W') with W' = W rotated along its output axis."""

    def __init__(self) -> None:
        super().__init__("FoldMatMul")

    def pattern(self, op, x, w, c1, c2):
        return op.Rotate(op.MatMul(x, w), c1, c2, _domain=road_op.DOMAIN, _outputs=["y"])

    def check(self, context, x, w, c1, c2, y, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        weight = common.constant(w)
        if weight is None or weight.ndim != 2:
            return result.fail("the MatMul weight is not a constant 2-D tensor", w)
        failed, coeffs = _check_coefficients(result, c1, c2, weight.shape[1])
        if failed is not None:
            return failed
        self._graph = context.graph_or_function
        self._plan = {"w": _lazy_merged(w, weight, coeffs, common.group_size(y.producer()), axis=1)}
        return result

    def rewrite(self, op, x, w, **_):
        return op.MatMul(x, self._new(op, self._plan["w"], w))


class FoldMatMulAdd(_FoldBase):
    """road.Rotate(Add(MatMul(x, W), b), C1, C2) -> Add(MatMul(x, W'), b') (the exporter's nn.Linear)."""

    def __init__(self) -> None:
        super().__init__("FoldMatMulAdd")

    def pattern(self, op, x, w, b, c1, c2):
        return op.Rotate(op.Add(op.MatMul(x, w), b), c1, c2, _domain=road_op.DOMAIN, _outputs=["y"])

    def check(self, context, x, w, b, c1, c2, y, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        weight, bias = common.constant(w), common.constant(b)
        if weight is None or weight.ndim != 2:
            return result.fail("the MatMul weight is not a constant 2-D tensor", w)
        d = weight.shape[1]
        if bias is None or bias.size != d:
            return result.fail(f"the added bias is not a constant vector of {d} elements", b)
        failed, coeffs = _check_coefficients(result, c1, c2, d)
        if failed is not None:
            return failed
        g = common.group_size(y.producer())
        self._graph = context.graph_or_function
        self._plan = {"w": _lazy_merged(w, weight, coeffs, g, axis=1),
                      "b": _merged(bias.reshape(d), coeffs, g, axis=0).reshape(bias.shape)}
        return result

    def rewrite(self, op, x, w, b, **_):
        return op.Add(op.MatMul(x, self._new(op, self._plan["w"], w)), self._new(op, self._plan["b"], b))


class FoldGemm(_FoldBase):
    """road.Rotate(Gemm(x, W[, b]), C1, C2) -> Gemm(x, W'[, b']), honouring transB (alpha/beta kept)."""

    def __init__(self) -> None:
        super().__init__("FoldGemm")

    def pattern(self, op, x, w, c1, c2):
        return op.Rotate(op.Gemm(x, w, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["gemm"]),
                         c1, c2, _domain=road_op.DOMAIN, _outputs=["y"])

    def check(self, context, x, w, c1, c2, gemm, y, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        node = gemm.producer()
        weight = common.constant(w)
        if weight is None or weight.ndim != 2:
            return result.fail("the Gemm weight is not a constant 2-D tensor", w)
        axis = 0 if node.attributes.get_int("transB", 0) else 1
        d = weight.shape[axis]
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        bias = common.constant(bias_value) if bias_value is not None else None
        if bias_value is not None and (bias is None or bias.size not in (1, d)):
            return result.fail("the Gemm bias is not a constant that can be rotated", bias_value)
        failed, coeffs = _check_coefficients(result, c1, c2, d)
        if failed is not None:
            return failed
        g = common.group_size(y.producer())
        self._graph = context.graph_or_function
        self._plan = {"w": _lazy_merged(w, weight, coeffs, g, axis=axis), "node": node}
        if bias is not None:
            full = np.broadcast_to(bias.reshape(-1), (d,)).astype(bias.dtype)
            self._plan["b"] = _merged(full, coeffs, g, axis=0)
        return result

    def rewrite(self, op, x, w, **_):
        node = self._plan["node"]
        inputs = [x, self._new(op, self._plan["w"], w)]
        if "b" in self._plan:
            inputs.append(self._new(op, self._plan["b"], node.inputs[2]))
        attrs = {a.name: a.value for a in node.attributes.values()}
        return op.Gemm(*inputs, **attrs)


RULES = (FoldMatMul, FoldMatMulAdd, FoldGemm)


@dataclasses.dataclass
class FoldResult(ir.passes.PassResult):
    """The pass result plus how many rotations were folded into weights."""

    folded: int = 0


class FoldPass(ir.passes.InPlacePass):
    """Fold every constant rotation into the weights of the MatMul or Gemm that feeds it.

    Rotations whose coefficients are overridable graph inputs (swappable adapters) are left alone; run
    `FreezeSwappablePass` first to make them constants.
    """

    def call(self, model: ir.Model) -> FoldResult:
        # Add(MatMul) first: otherwise the bias-less rule would stop at the Add and not fire.
        rules = pattern.RewriteRuleSet([FoldMatMulAdd.rule(), FoldGemm.rule(), FoldMatMul.rule()], commute=True)
        folded = rules.apply_to_model(model)
        if folded:
            ir.passes.common.RemoveUnusedNodesPass()(model)
            ir.passes.common.RemoveUnusedFunctionsPass()(model)
            ir.passes.common.RemoveUnusedOpsetsPass()(model)
            logger.info("fold: %d rotation(s) folded into MatMul/Gemm weights", folded)
        return FoldResult(model, modified=folded > 0, folded=folded)


class FreezeSwappablePass(ir.passes.InPlacePass):
    """Make road coefficients that are overridable graph inputs (a swappable export) plain initializers again.

    Folding makes the adapter permanent, so the swap record (`road_export.swap` metadata) is dropped too.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        coefficients = {v for n in common.road_nodes(model.graph) for v in n.inputs[1:3] if v is not None}
        keep = [v for v in model.graph.inputs if not (v in coefficients and v.const_value is not None)]
        if len(keep) == len(model.graph.inputs):
            return ir.passes.PassResult(model, modified=False)
        model.graph.inputs.clear()
        model.graph.inputs.extend(keep)
        model.metadata_props.pop(METADATA_SWAP, None)
        return ir.passes.PassResult(model, modified=True)
