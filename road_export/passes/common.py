"""Helpers shared by the graph passes: constants, road nodes, and probing a data-movement subgraph."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from road_export.graph import ops as road_op
from road_export.core import rotation

__all__ = [
    "MOVEMENT_OPS", "SHAPE_ARITHMETIC", "constant", "default_value", "dummy_for", "evaluate", "group_size", "is_road",
    "road_nodes", "rotate_half_group", "shape_leaves", "unique_name", "upstream",
]

# Ops that only move or negate data: a subgraph of these from x computes a signed permutation of x.
MOVEMENT_OPS = frozenset({
    "Reshape", "Gather", "Slice", "Squeeze", "Unsqueeze", "Neg", "Concat", "Shape", "Identity", "Split",
    "Transpose", "Flatten", "Expand", "Cast", "Constant", "Size",
})


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's tensor as numpy when it is a true constant (not a graph input that can be overridden)."""
    if value is None:
        return None
    if value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.domain == "":
        if producer.op_type == "Constant":
            attr = producer.attributes.get("value")
            if attr is not None:
                return attr.as_tensor().numpy()
        if producer.op_type == "Identity":  # the legacy exporter routes shared initializers through Identity
            return constant(producer.inputs[0])
    return None


def default_value(value: ir.Value | None) -> np.ndarray | None:
    """Like `constant`, but also the default of an overridable initializer (a graph input with a value)."""
    if value is not None and value.is_graph_input() and value.const_value is not None:
        return value.const_value.numpy()
    return constant(value)


def is_road(node: ir.Node) -> bool:
    """A rotation node: road.Rotate, or road.RotateTied after lowering."""
    return node.domain == road_op.DOMAIN and node.op_type in (road_op.OP_TYPE, road_op.TIED_OP_TYPE)


def road_nodes(graph: ir.Graph) -> list[ir.Node]:
    """Every rotation node of `graph`, subgraphs included."""
    return [n for n in graph.all_nodes() if is_road(n)]


def group_size(node: ir.Node) -> int:
    """A road node's `group_size` attribute (even, divides the rotated width)."""
    return int(node.attributes["group_size"].as_int())


# Integer arithmetic the exporter writes on shapes (a sequence length plus a past length, ...); `upstream` admits it
# on int64 values only when asked, so that the data path stays data movement.
SHAPE_ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Abs"})


def upstream(root: ir.Value, stop: ir.Value, limit: int = 64,
             shape_ops: frozenset[str] = frozenset()) -> list[ir.Node] | str:
    """Nodes computing `root` from `stop` and constants only, in topological order; or why not.

    A Shape node may read any tensor (the exporter often takes batch dims from a graph input): that tensor's
    shape, not its data, becomes an input of the subgraph (see `shape_leaves`). `shape_ops` (e.g.
    SHAPE_ARITHMETIC) are admitted besides MOVEMENT_OPS where every output is int64 (shape computations).
    """
    seen: dict[int, ir.Node] = {}
    order: list[ir.Node] = []

    def visit(value: ir.Value) -> str | None:
        if value is stop or constant(value) is not None:
            return None
        node = value.producer()
        if node is None:
            return f"{value.name} depends on graph input {value.name!r}, not only on the rotated tensor"
        if id(node) in seen:
            return None
        shape_op = node.op_type in shape_ops and all(o.dtype == ir.DataType.INT64 for o in node.outputs)
        if node.domain not in ("", "ai.onnx") or (node.op_type not in MOVEMENT_OPS and not shape_op):
            return f"{value.name} is computed by {node.op_type}, which is not a data-movement op"
        if len(seen) >= limit:
            return "the rotate-half subgraph is larger than expected"
        seen[id(node)] = node
        if node.op_type == "Shape":
            order.append(node)
            return None
        for inp in node.inputs:
            if inp is not None and (why := visit(inp)):
                return why
        order.append(node)
        return None

    why = visit(root)
    return why if why else order


def shape_leaves(nodes: list[ir.Node], stop: ir.Value) -> list[ir.Value]:
    """Tensors other than `stop` whose shape the subgraph reads."""
    return [n.inputs[0] for n in nodes if n.op_type == "Shape" and n.inputs[0] is not stop]


def dummy_for(value: ir.Value, dims: dict[str, int]) -> np.ndarray | None:
    """A zero tensor with `value`'s shape, symbolic dims sized as in `dims`; None if a dim is unknown."""
    if value.shape is None:
        return None
    sizes = []
    for dim in value.shape:
        if isinstance(dim, int):
            sizes.append(dim)
        elif str(dim) in dims:
            sizes.append(dims[str(dim)])
        else:
            return None
    dtype = value.dtype.numpy() if value.dtype is not None else np.float32
    return np.zeros(sizes, dtype=dtype)


def evaluate(nodes: Iterable[ir.Node], inputs: dict[ir.Value, np.ndarray], output: ir.Value,
             opset: int) -> np.ndarray:
    """Run a small subgraph with the ONNX reference evaluator (for probing, not for speed)."""
    from onnx.reference import ReferenceEvaluator

    nodes = list(nodes)
    graph_inputs = []
    feeds = {}
    for i, (value, array) in enumerate(inputs.items()):
        name = value.name or f"probe_input_{i}"
        graph_inputs.append(name)
        feeds[name] = array
    proto_nodes = []
    initializers = {}
    for node in nodes:
        for inp in node.inputs:
            if inp is not None and inp.name not in feeds and inp.producer() not in nodes:
                array = constant(inp)
                if array is not None:
                    initializers[inp.name] = array
        proto_nodes.append(ir.serde.serialize_node(node))
    from onnx import helper, numpy_helper

    graph = helper.make_graph(
        proto_nodes,
        "probe",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(feeds[n].dtype), feeds[n].shape)
         for n in graph_inputs],
        [helper.make_tensor_value_info(output.name, 0, None)],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, feeds)[0]


def rotate_half_group(probe: np.ndarray, result: np.ndarray) -> int | None:
    """The group size g for which result == rot_g(probe) along the last axis, if any."""
    if result.shape != probe.shape:
        return None
    d = probe.shape[-1]
    first = probe.reshape(-1, d)[0]
    out = result.reshape(-1, d)[0]
    where = np.nonzero(first == -out[0])[0]
    if len(where) != 1:
        return None
    g = 2 * int(where[0])
    if g <= 0 or d % g:
        return None
    return g if np.array_equal(rotation.rotate_half(probe, g), result) else None


def unique_name(graph: ir.Graph, base: str) -> str:
    """`base`, or `base_1`, `base_2`, ... : the first name no initializer of `graph` has."""
    taken = set(graph.initializers)
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name
