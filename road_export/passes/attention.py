"""attention: the exported attention's key transpose and grouped-query repeat, in forms onnxruntime runs cheaper.

torch's exporter writes `scaled_dot_product_attention` with the key transposed through a 3-D reshape
(torch/onnx `aten_scaled_dot_product_attention`: the leading axes contracted so the transpose is static), and
transformers' `repeat_kv` copies each key/value head `rep` times for grouped-query attention:

    kt = Reshape(Transpose(Reshape(k, [-1, T, D]), perm=[0, 2, 1]), [B, H, D, T])
    repeat_kv(x) = Reshape(Expand(Unsqueeze(x, [2]), [B, kv, rep, T, D]), [B, kv * rep, T, D])
    scores = MatMul(Mul(q, s), Mul(kt, s));   out = MatMul(P, repeat_kv(v))

onnxruntime runs that 3-D Transpose as a strided copy of the whole key cache on every step (it cannot fuse it
into the MatMul through the reshapes), and the repeat copies the key and value caches `rep` times. Two rules:

    SwapLastAxes:     Reshape(Transpose(Reshape(k, s1), perm=[0, 2, 1]), s2)  -> Transpose(k, perm=[..., -1, -2])
                      (onnxruntime then fuses the Transpose into the MatMul: FusedMatMul transB)
    GroupedQueryMatMul: MatMul(a, f(repeat_kv(x)))  -> Reshape(MatMul(Reshape(a, [0, kv, -1, 0]), f(x)),
                                                               [0, H, -1, 0])
                      where f is an optional swap of the last two axes and an optional Mul by a scalar constant;
                      query heads h = i * rep + r read key/value head i, so the query's heads regroup as
                      [B, kv, rep * S, .] against the unrepeated [B, kv, ., .] (a scalar Mul on `a` moves after
                      the regrouping, so that onnxruntime still folds both scales into the product)

Neither rule trusts the spelling: SwapLastAxes evaluates the matched subgraph (with the shape computations it
reads) on probe tensors and fires only when it returns the probe with its last two axes swapped;
GroupedQueryMatMul evaluates the repeat likewise (the exporter takes its sizes from other inputs' shapes, which
are given sizes consistent with the probe through their symbolic dims) and fires only when it returns
`numpy.repeat(x, rep, axis=1)`. The products sum the same terms, so outputs agree to float rounding. Road nodes are
not touched: swappable adapters stay swappable. The grouping reads ranks and head counts from the recorded shapes
(the exporter's optimiser records them; road-export's exports always have them): a graph without them, or with
the repeat spelt otherwise (torch.onnx without its optimiser writes Slice/Unsqueeze/Slice), keeps its repeats.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import logging

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchingTracer, MatchStatus, pattern

from road_export.passes import common

__all__ = ["AttentionPass", "AttentionResult", "GroupedQueryMatMul", "SwapLastAxes"]

logger = logging.getLogger(__name__)

_PRIMES = (3, 5, 7, 11, 13, 17, 19, 23)


def _dim_sizes(values: list[ir.Value], choice: int) -> dict[str, int] | str:
    """Sizes for every symbolic dim of `values`: each name in the dims' expressions (e.g. "past + seq") gets a
    distinct prime (shifted by `choice`), expressions are evaluated; or why not (an unknown dim or rank)."""
    names: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for value in values:
        if value.shape is None:
            return f"{value.name} has no known shape"
        for dim in value.shape:
            if isinstance(dim, int):
                continue
            text = str(dim) if dim is not None and dim.value is not None else None
            if text is None:
                return f"{value.name} has an unnamed dim"
            try:
                tree = ast.parse(text, mode="eval")
            except SyntaxError:
                return f"{value.name}: cannot read the dim {text!r}"
            for node in ast.walk(tree):
                if isinstance(node, ast.Name) and node.id not in names:
                    names[node.id] = _PRIMES[(len(names) + choice) % len(_PRIMES)]
            size = _evaluate(tree.body, names)
            if size is None or size < 1:
                return f"{value.name}: cannot size the dim {text!r}"
            sizes[text] = size
    return sizes


def _evaluate(node: ast.AST, names: dict[str, int]) -> int | None:
    """An integer expression of names, constants, + - * //; None for anything else."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp):
        left, right = _evaluate(node.left, names), _evaluate(node.right, names)
        if left is None or right is None:
            return None
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if isinstance(node.op, ast.FloorDiv) and right:
            return left // right
    return None


def _probe(root: ir.Value, source: ir.Value, opset: int, choice: int) -> tuple[np.ndarray, np.ndarray] | str:
    """(probe, root evaluated from it): `source` filled with distinct numbers, every tensor whose shape the
    subgraph reads sized consistently through the symbolic dims; or why it cannot be evaluated."""
    nodes = common.upstream(root, source, shape_ops=common.SHAPE_ARITHMETIC)
    if isinstance(nodes, str):
        return nodes
    if not nodes:
        return f"{root.name} is {source.name} itself"
    leaves = common.shape_leaves(nodes, source)
    sizes = _dim_sizes([source, *leaves], choice)
    if isinstance(sizes, str):
        return sizes
    shape = [d if isinstance(d, int) else sizes[str(d)] for d in source.shape]
    probe = np.arange(1, int(np.prod(shape)) + 1, dtype=np.float32).reshape(shape)
    feeds = {source: probe}
    for leaf in leaves:
        dummy = common.dummy_for(leaf, sizes)
        if dummy is None:
            return f"cannot size {leaf.name}, whose shape the subgraph reads"
        feeds[leaf] = dummy
    try:
        out = common.evaluate(nodes, feeds, root, opset)
    except Exception as e:  # the reference evaluator could not run it: not the form we rewrite
        return f"cannot evaluate the subgraph of {root.name} ({type(e).__name__}: {e})"
    return probe, np.asarray(out)


def _opset(context) -> int:
    return context.model.opset_imports.get("", 18)


def _swap(rank: int) -> list[int]:
    return [*range(rank - 2), rank - 1, rank - 2]


class SwapLastAxes(pattern.RewriteRuleClassBase):
    """Reshape(Transpose(Reshape(k, s1), perm=[0, 2, 1]), s2) that swaps k's last two axes -> Transpose(k)."""

    def __init__(self) -> None:
        super().__init__(name="SwapLastAxes")

    def pattern(self, op, k, s1, s2):
        flat = op.Reshape(k, s1, _allow_other_attributes=True)
        return op.Reshape(op.Transpose(flat, _allow_other_attributes=True, _outputs=["t"]), s2,
                          _allow_other_attributes=True, _outputs=["y"])

    def check(self, context, k, s1, s2, t, y, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        perm = t.producer().attributes.get("perm")
        if perm is None or list(perm.as_ints()) != [0, 2, 1]:
            return result.fail(f"{t.name}: Transpose perm {None if perm is None else list(perm.as_ints())}, "
                               "not [0, 2, 1]", t)
        if k.shape is None or len(k.shape) < 2:
            return result.fail(f"{k.name}: rank unknown or below 2", k)
        for choice in (0, 1):  # two sets of sizes, so that a reshape that fits one by chance does not pass
            probed = _probe(y, k, _opset(context), choice)
            if isinstance(probed, str):
                return result.fail(probed, y)
            probe, out = probed
            if not np.array_equal(out, np.swapaxes(probe, -1, -2)):
                return result.fail(f"{y.name} is not {k.name} with its last two axes swapped", y)
        return result

    def rewrite(self, op, k, **_):
        return op.Transpose(k, perm=_swap(len(k.shape)))


def _scalar(value: ir.Value | None) -> bool:
    """A constant of one element and rank <= 4 (multiplying a rank-4 tensor by it keeps the shape)."""
    array = common.constant(value)
    return array is not None and array.size == 1 and array.ndim <= 4


class GroupedQueryMatMul(pattern.RewriteRuleClassBase):
    """MatMul(a, f(repeat_kv(x))) -> Reshape(MatMul(Reshape(a, [0, kv, -1, 0]), f(x)), [0, H, -1, 0]); one rule per
    form of f: `swapped` (a Transpose of the last two axes), `scaled` (a Mul by a scalar constant after it)."""

    def __init__(self, swapped: bool, scaled: bool) -> None:
        super().__init__(name=f"GroupedQueryMatMul{'Swapped' if swapped else ''}{'Scaled' if scaled else ''}")
        self.swapped, self.scaled = swapped, scaled
        self._plan: tuple | None = None

    def pattern(self, op, a, x, axes, expanded_shape, shape, scale):
        b = op.Reshape(op.Expand(op.Unsqueeze(x, axes), expanded_shape), shape, _allow_other_attributes=True,
                       _outputs=["repeated"])
        if self.swapped:
            b = op.Transpose(b, _allow_other_attributes=True, _outputs=["swap"])
        if self.scaled:
            b = op.Mul(b, scale)
        return op.MatMul(a, b, _outputs=["y"])

    def check(self, context, a, x, repeated, y, scale=None, swap=None, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if self.scaled and not _scalar(scale):
            return result.fail(f"{scale.name} is not a scalar constant", scale)
        if self.swapped:
            perm = swap.producer().attributes.get("perm")
            if perm is None or list(perm.as_ints()) != _swap(4):
                return result.fail(f"{swap.name}: Transpose perm {None if perm is None else list(perm.as_ints())}, "
                                   f"not {_swap(4)}", swap)
        if a.shape is None or len(a.shape) != 4 or not isinstance(a.shape[1], int):
            return result.fail(f"{a.name}: not rank 4 with a static head count (shape {a.shape})", a)
        if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[1], int) or x.shape[1] < 1:
            return result.fail(f"{x.name}: not rank 4 with a static head count (shape {x.shape})", x)
        heads, kv = a.shape[1], x.shape[1]
        if heads % kv or heads == kv:
            return result.fail(f"{heads} query heads over {kv} key/value heads: nothing to regroup", a)
        for choice in (0, 1):
            probed = _probe(repeated, x, _opset(context), choice)
            if isinstance(probed, str):
                return result.fail(probed, repeated)
            probe, out = probed
            if not np.array_equal(out, np.repeat(probe, heads // kv, axis=1)):
                return result.fail(f"{repeated.name} is not {x.name} with each head repeated {heads // kv} times",
                                   repeated)
        producer = a.producer()
        moved = None
        if producer is not None and producer.op_type == "Mul" and producer.domain in ("", "ai.onnx"):
            for i in (0, 1):
                q = producer.inputs[i]
                if _scalar(producer.inputs[1 - i]) and q.shape is not None and len(q.shape) == 4 \
                        and q.shape[1] == heads:
                    moved = (q, producer.inputs[1 - i])
                    break
        self._plan = (heads, kv, moved, context.graph_or_function)
        return result

    def rewrite(self, op, a, x, y, scale=None, **_):
        heads, kv, moved, graph = self._plan
        base = y.name or "attention"
        grouped = op.initializer(ir.tensor(np.array([0, kv, -1, 0], np.int64)),
                                 name=common.unique_name(graph, f"{base}.grouped_shape"))
        ungrouped = op.initializer(ir.tensor(np.array([0, heads, -1, 0], np.int64)),
                                   name=common.unique_name(graph, f"{base}.heads_shape"))
        if moved is not None:
            left = op.Mul(op.Reshape(moved[0], grouped), moved[1])
        else:
            left = op.Reshape(a, grouped)
        right = op.Transpose(x, perm=_swap(4)) if self.swapped else x
        if self.scaled:
            right = op.Mul(right, scale)
        return op.Reshape(op.MatMul(left, right), ungrouped)


@dataclasses.dataclass
class AttentionResult(ir.passes.PassResult):
    """The pass result plus how many key transposes became one 4-D Transpose (`swapped`), how many products
    against a repeated key/value were regrouped (`grouped`), and with `debug=True` why near-matches did not."""

    swapped: int = 0
    grouped: int = 0
    not_fired: list[str] = dataclasses.field(default_factory=list)


class AttentionPass(ir.passes.InPlacePass):
    """Rewrite the exported attention's 3-D key transposes and grouped-query repeats (see the module docstring).

    Graphs without them are left as they are; returns an `AttentionResult`."""

    def __init__(self, debug: bool = False) -> None:
        super().__init__()
        self.debug = debug

    def call(self, model: ir.Model) -> AttentionResult:
        counts = []
        not_fired: list[str] = []
        grouping = [GroupedQueryMatMul.rule(swapped, scaled) for swapped in (True, False) for scaled in (True, False)]
        for rule_list in ([SwapLastAxes.rule()], grouping):  # swaps first: the grouping sees them
            rules = pattern.RewriteRuleSet(rule_list, commute=True)
            counts.append(rules.apply_to_model(model))
            if counts[-1]:  # the replaced subgraphs' Shape nodes still read the repeat until removed
                ir.passes.common.RemoveUnusedNodesPass()(model)
            if self.debug:
                tracer = MatchingTracer()
                rules.apply_to_model(model, tracer=tracer)
                not_fired += [f"{info.root_node.name}: {info.match_result.reason}"
                              for info in itertools.chain.from_iterable(tracer.best_matches_map.values())
                              if info.status == MatchStatus.CONDITION_FAILED]
        swapped, grouped = counts
        if swapped or grouped:
            logger.info("attention: %d key transpose(s) swapped in place, %d grouped-query product(s) regrouped",
                        swapped, grouped)
        return AttentionResult(model, modified=bool(swapped or grouped), swapped=swapped, grouped=grouped,
                               not_fired=not_fired)
