"""lower: choose each `road` node's function body for the runtime that will run it.

- onnxruntime: a rotation whose two halves of every group share coefficients (road_1) is exactly
  RotaryEmbedding with the groups laid along the position axis, one fused kernel: such nodes become
  `road.RotateTied` (standard RotaryEmbedding at opset >= 23, com.microsoft's below). Others keep `road.Rotate`,
  whose body is one reversed Slice plus Mul, Mul, Add once onnxruntime has folded the constants.
- portable: standard ops only and no reliance on a contrib op: every node is `road.Rotate`.
Coefficients must be constants or overridable initializers whose defaults are tied; computed ones stay generic.
The bodies are what runs without road-export's native kernels (road_export/graph/native); a session that registers them
runs either op as one kernel, whichever body the file carries.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from road_export.graph import ops as road_op
from road_export.passes import common

__all__ = ["TARGETS", "LowerPass", "LowerResult", "UnlowerPass", "is_tied"]

logger = logging.getLogger(__name__)
TARGETS = ("onnxruntime", "portable")


def is_tied(node: ir.Node) -> bool:
    """Both halves of every group share c1 and c2 (road_1's layout).

    An overridable (swappable) coefficient is judged by its default; `road-export adapter` then refuses to swap in
    coefficients that are not tied for such a node.
    """
    g = common.group_size(node)
    for value in node.inputs[1:3]:
        array = common.default_value(value)
        if array is None or array.size % g:
            return False
        grouped = array.reshape(-1, 2, g // 2)
        if not np.array_equal(grouped[:, 0], grouped[:, 1]):
            return False
    return True


@dataclasses.dataclass
class LowerResult(ir.passes.PassResult):
    """The pass result plus how many road nodes changed op type, and how many of each type there are now."""

    changed: int = 0
    tied: int = 0
    generic: int = 0


class LowerPass(ir.passes.InPlacePass):
    """Pick `road.Rotate` or `road.RotateTied` per node for `target`, and attach the matching definitions.

    Raises ValueError for an unknown target (one of TARGETS).
    """

    def __init__(self, target: str = "onnxruntime") -> None:
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; choose {' or '.join(TARGETS)}")
        self.target = target

    def call(self, model: ir.Model) -> LowerResult:
        changed = tied = generic = 0
        for node in model.graph.all_nodes():
            if node.domain != road_op.DOMAIN:
                continue
            want = road_op.OP_TYPE
            if self.target == "onnxruntime" and is_tied(node):
                want = road_op.TIED_OP_TYPE
            if node.op_type != want:
                node.op_type = want
                changed += 1
            tied += want == road_op.TIED_OP_TYPE
            generic += want == road_op.OP_TYPE
        road_op.attach_functions(model)
        if changed:
            logger.info("lower: %d road node(s) retargeted for %s", changed, self.target)
        return LowerResult(model, modified=changed > 0, changed=changed, tied=tied, generic=generic)


class UnlowerPass(ir.passes.InPlacePass):
    """Every `road.RotateTied` back to `road.Rotate` (the same maths), so compose and fold match a lowered file."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = [n for n in common.road_nodes(model.graph) if n.op_type != road_op.OP_TYPE]
        for node in nodes:
            node.op_type = road_op.OP_TYPE
        return ir.passes.PassResult(model, modified=bool(nodes))
