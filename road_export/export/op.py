"""The torch side of the `road` op: the custom op `road::rotate` and its translation to a `road.Rotate` node.

    torch.ops.road.rotate(x, c1, c2, group_size) -> y      y = x * c1 + rot(x) * c2 (road_export.core.rotation.rotate)

x: float tensor [..., d]; c1, c2: [d] or [batch, 1, d]; y: like x. The exporter's rotate mode routes every
adapted layer through this op, and `translation_table()` (passed to `torch.onnx.export` as
`custom_translation_table`) turns each call into one node of the torch-free op definitions in road_export/graph/ops.py.
"""

from __future__ import annotations

import torch

from road_export.graph import ops
from road_export.core import rotation

__all__ = ["ROTATE", "rotate", "translate_rotate", "translation_table"]


@torch.library.custom_op("road::rotate", mutates_args=())
def rotate(x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, group_size: int) -> torch.Tensor:
    """y = x * c1 + rot(x) * c2 (the eager kernel is road_export.core.rotation.rotate)."""
    return rotation.rotate(x, c1, c2, group_size)


@rotate.register_fake
def _rotate_fake(x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, group_size: int) -> torch.Tensor:
    return torch.empty_like(x)


ROTATE = torch.ops.road.rotate  # what a RoadLayer calls during capture (export/prepare.py sets it as rotate_fn)


def translate_rotate(x, c1, c2, group_size: int):
    """torch.ops.road.rotate -> one road.Rotate node (custom_translation_table entry)."""
    return ops.RotateNode(x, c1, c2, group_size=group_size)


def translation_table() -> dict:
    """`custom_translation_table` for `torch.onnx.export(dynamo=True)`: road::rotate -> road.Rotate."""
    return {torch.ops.road.rotate.default: translate_rotate}
