"""compose: two consecutive `road.Rotate` nodes with the same group size -> one.

R2 (R1 x) = (R2 R1) x, and the product of two group-pair rotations with the same g is again one (per-element
c1, c2: `rotation.compose`). Nodes with different group sizes pair different elements and are left alone.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from road_export.core import rotation
from road_export.graph import ops as road_op
from road_export.passes import common

__all__ = ["ComposePass", "ComposeResult", "ComposeRotations"]

logger = logging.getLogger(__name__)


class ComposeRotations(pattern.RewriteRuleClassBase):
    """road.Rotate(road.Rotate(x, A1, A2; g), B1, B2; g) -> road.Rotate(x, C1, C2; g), C = B o A."""

    def __init__(self) -> None:
        super().__init__(name="ComposeRotations")
        self._plan: tuple | None = None

    def pattern(self, op, x, a1, a2, b1, b2):
        inner = op.Rotate(x, a1, a2, _domain=road_op.DOMAIN, _outputs=["inner"])
        return op.Rotate(inner, b1, b2, _domain=road_op.DOMAIN, _outputs=["outer"])

    def check(self, context, x, a1, a2, b1, b2, inner, outer, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        g_in, g_out = common.group_size(inner.producer()), common.group_size(outer.producer())
        if g_in != g_out:
            return result.fail(f"group sizes differ ({g_in} then {g_out}); the pairs do not line up", outer)
        arrays = [common.constant(v) for v in (a1, a2, b1, b2)]
        if any(a is None for a in arrays):
            return result.fail("a coefficient is not a constant (swappable adapters are not composed)")
        if len({a.size for a in arrays}) != 1:
            return result.fail(f"coefficient sizes differ: {[a.size for a in arrays]}")
        d = arrays[0].size
        first = (arrays[0].reshape(d).astype(np.float64), arrays[1].reshape(d).astype(np.float64))
        second = (arrays[2].reshape(d).astype(np.float64), arrays[3].reshape(d).astype(np.float64))
        c1, c2 = rotation.compose(first, second, g_in)
        dtype = arrays[0].dtype
        self._plan = (g_in, c1.astype(dtype), c2.astype(dtype), context.graph_or_function)
        return result

    def rewrite(self, op, x, a1, **_):
        g, c1, c2, graph = self._plan
        base = a1.name or "road"
        v1 = op.initializer(ir.tensor(c1), name=common.unique_name(graph, f"{base}.composed_c1"))
        v2 = op.initializer(ir.tensor(c2), name=common.unique_name(graph, f"{base}.composed_c2"))
        return op.op(road_op.OP_TYPE, x, v1, v2, group_size=g, _domain=road_op.DOMAIN, _version=road_op.VERSION)


@dataclasses.dataclass
class ComposeResult(ir.passes.PassResult):
    """The pass result plus how many pairs of rotations were composed into one."""

    composed: int = 0


class ComposePass(ir.passes.InPlacePass):
    """Compose chains of constant rotations with equal group sizes (repeated until none is left)."""

    def call(self, model: ir.Model) -> ComposeResult:
        rules = pattern.RewriteRuleSet([ComposeRotations.rule()])
        composed = 0
        while count := rules.apply_to_model(model):
            composed += count
        if composed:
            ir.passes.common.RemoveUnusedNodesPass()(model)
            logger.info("compose: %d pair(s) of rotations composed", composed)
        return ComposeResult(model, modified=composed > 0, composed=composed)
