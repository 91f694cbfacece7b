"""fuse: a decomposed RoAd rotation -> one `road.Rotate` node with constant coefficients.

Matches what `torch.onnx.export(dynamo=True)` writes for peft's RoAd layers (peft `road/layer.py`):

    x_grouped = x.reshape(-1, 2, group_size // 2)
    x1 = x_grouped[:, 0, :]
    x2 = x_grouped[:, 1, :]
    rotate_half_x = torch.stack((-x2, x1), dim=1).reshape(x.shape)
    result = x * first_col + rotate_half_x * second_col

The anchor is `Add(Mul(x, C1), Mul(r, C2))` (any operand order) with constant C1/C2. Rather than list every way
the exporter spells `r` (Reshape/Gather/Unsqueeze/Concat with the optimiser; Slice/Gather/Cast/Reshape chains
without), the check proves `r == rot_g(x)`: the subgraph from x to r must consist of data-movement ops only,
and evaluated on a probe tensor it must give rot_g(probe) for exactly one group size g, which it then reports.
Coefficients computed from road_theta/road_alpha (Cos, Sin, Mul, ...) must be constants already: run
`FoldConstantsPass` (passes/fold_constants.py) first, as the pipeline does.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchingTracer, MatchStatus, pattern

from road_export.graph import ops as road_op
from road_export.passes import common

__all__ = ["FuseResult", "FusePass", "FuseRotation"]

logger = logging.getLogger(__name__)


class FuseRotation(pattern.RewriteRuleClassBase):
    """Add(Mul(x, C1), Mul(rot_g(x), C2)) -> road.Rotate(x, C1, C2; group_size=g)."""

    def __init__(self) -> None:
        super().__init__(name="FuseRotation")
        self._found: tuple[int, np.ndarray, np.ndarray, ir.Graph | ir.Function] | None = None

    def pattern(self, op, x, c1, r, c2):
        return op.Add(op.Mul(x, c1), op.Mul(r, c2))

    def check(self, context, x, c1, r, c2, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        a1, a2 = common.constant(c1), common.constant(c2)
        if a1 is None or a2 is None:
            return result.fail("C1 or C2 is not a constant (an overridable input or a computed value)", [c1, c2])
        d = a1.size
        if a2.size != d or a1.shape[-1:] != (d,) or a2.shape[-1:] != (d,):
            return result.fail(f"C1 {a1.shape} and C2 {a2.shape} are not both vectors over the last axis", [c1, c2])
        if x.shape is not None and isinstance(x.shape[-1], int) and x.shape[-1] != d:
            return result.fail(f"x's last axis is {x.shape[-1]}, the coefficients have {d}", x)
        nodes = common.upstream(r, x)
        if isinstance(nodes, str):
            return result.fail(nodes, r)
        if not nodes:
            return result.fail("the second product does not rotate x", r)
        shape = list(x.shape) if x.shape is not None else [None, d]
        dims = {str(dim): 2 + i for i, dim in enumerate(shape) if not isinstance(dim, int)}
        lead = [dim if isinstance(dim, int) else dims[str(dim)] for dim in shape[:-1]]
        probe = np.arange(1, int(np.prod(lead or [1])) * d + 1, dtype=np.float32).reshape(*lead, d)
        feeds = {x: probe}
        for leaf in common.shape_leaves(nodes, x):
            dummy = common.dummy_for(leaf, dims)
            if dummy is None:
                return result.fail(f"the rotation reads the shape of {leaf.name}, whose dims are not x's", leaf)
            feeds[leaf] = dummy
        opset = context.model.opset_imports.get("", 18)
        try:
            out = common.evaluate(nodes, feeds, r, opset)
        except Exception as e:  # the reference evaluator could not run the subgraph
            return result.fail(f"cannot evaluate the rotate-half subgraph ({type(e).__name__}: {e})", r)
        g = common.rotate_half_group(probe, np.asarray(out))
        if g is None:
            return result.fail("the second product is not rot(x) for any group size", r)
        dtype = x.dtype.numpy() if x.dtype is not None else a1.dtype
        self._found = (g, a1.reshape(d).astype(dtype), a2.reshape(d).astype(dtype), context.graph_or_function)
        return result

    def rewrite(self, op, x, c1, c2, **_):
        assert self._found is not None
        g, a1, a2, graph = self._found
        base = c1.name or "road"
        v1 = op.initializer(ir.tensor(a1), name=common.unique_name(graph, f"{base}.road_c1"))
        v2 = op.initializer(ir.tensor(a2), name=common.unique_name(graph, f"{base}.road_c2"))
        return op.op(road_op.OP_TYPE, x, v1, v2, group_size=g, _domain=road_op.DOMAIN, _version=road_op.VERSION)


@dataclasses.dataclass
class FuseResult(ir.passes.PassResult):
    """The pass result plus how many rotations were fused and, with `debug=True`, why near-matches did not."""

    fused: int = 0
    not_fired: list[str] = dataclasses.field(default_factory=list)


class FusePass(ir.passes.InPlacePass):
    """Fuse every decomposed group-pair rotation with constant coefficients into one `road.Rotate` node.

    Returns a `FuseResult`; with `debug=True` its `not_fired` says why each near-match did not fire (onnxscript's
    `MatchingTracer`). Attaches the road function definitions when it fused anything.
    """

    def __init__(self, debug: bool = False) -> None:
        super().__init__()
        self.debug = debug

    def call(self, model: ir.Model) -> FuseResult:
        rules = pattern.RewriteRuleSet([FuseRotation.rule()], commute=True)
        count = rules.apply_to_model(model)
        not_fired: list[str] = []
        if self.debug:
            tracer = MatchingTracer()
            rules.apply_to_model(model, tracer=tracer)
            for matches in tracer.best_matches_map.values():
                for info in matches:
                    if info.status == MatchStatus.CONDITION_FAILED:
                        not_fired.append(f"{info.root_node.name}: {info.match_result.reason}")
        if count:
            ir.passes.common.RemoveUnusedNodesPass()(model)
            road_op.attach_functions(model)
            logger.info("fuse: %d rotation(s) fused into road.Rotate", count)
        for line in not_fired:
            logger.debug("fuse: did not fire at %s", line)
        return FuseResult(model, modified=count > 0, fused=count, not_fired=not_fired)
