"""lower: choose each `road` node's function body for the runtime that will run it.

- onnxruntime: a rotation whose two halves of every group share coefficients (road_1) is exactly
  RotaryEmbedding with the groups laid along the position axis, one fused kernel: such nodes become
  `road.RotateTied` (standard RotaryEmbedding at opset >= 23, com.microsoft's below). Others keep `road.Rotate`,
  whose body is one reversed Slice plus Mul, Mul, Add once onnxruntime has folded the constants.
- portable: standard ops only and no reliance on a contrib op: every node is `road.Rotate`.
Coefficients must be constants or overridable initializers whose defaults are tied; computed ones stay generic.
The bodies are what runs without road-export's native kernels (road_export/native); a session that registers them
runs either op as one kernel, whichever body the file carries.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from road_export.export import op as road_op
from road_export.passes import common

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


class LowerPass(ir.passes.InPlacePass):
    """Pick `road.Rotate` or `road.RotateTied` per node for `target`, and attach the matching definitions."""

    def __init__(self, target: str = "onnxruntime") -> None:
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; choose {' or '.join(TARGETS)}")
        self.target = target
        self.changed = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.changed = 0
        for node in model.graph.all_nodes():
            if node.domain != road_op.DOMAIN:
                continue
            want = road_op.OP_TYPE
            if self.target == "onnxruntime" and is_tied(node):
                want = road_op.TIED_OP_TYPE
            if node.op_type != want:
                node.op_type = want
                self.changed += 1
        road_op.attach_functions(model)
        if self.changed:
            logger.info("lower: %d road node(s) retargeted for %s", self.changed, self.target)
        return ir.passes.PassResult(model, modified=self.changed > 0)
