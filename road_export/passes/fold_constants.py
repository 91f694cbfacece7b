"""fold_constants: compute every value that depends on constants only (onnxscript's constant folding).

Coefficients an exporter computes from RoAd's trained parameters (`road_alpha * cos(road_theta)`, ...) become
initializers, so `fuse` sees constant C1/C2. Limits are raised above onnxscript's defaults: the coefficient chains of
big layers exceed them. Runs the public `onnxscript.optimizer.fold_constants`.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
import onnxscript.optimizer

__all__ = ["FOLD_LIMIT", "FoldConstantsPass"]

logger = logging.getLogger(__name__)
FOLD_LIMIT = 1 << 24  # elements; onnxscript's default limits stop at coefficient vectors of big layers


class FoldConstantsPass(ir.passes.InPlacePass):
    """Fold constant subgraphs into initializers, in place; `modified` says whether anything was folded."""

    def __init__(self, limit: int = FOLD_LIMIT) -> None:
        super().__init__()
        self.limit = limit

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = onnxscript.optimizer.fold_constants(model, input_size_limit=self.limit,
                                                     output_size_limit=self.limit)
        if result.modified:
            logger.info("fold_constants: constant subgraphs folded")
        return ir.passes.PassResult(model, modified=bool(result.modified))
