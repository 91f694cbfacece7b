"""Small ONNX models for the pass tests: a linear layer followed by a rotation, decomposed or as a road node."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from road_export.core import rotation
from road_export.graph import ops as road_op

OPSET = 20


def coefficients(variant: str, d: int, g: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = rotation.params_length(variant, d)
    theta = rng.normal(0, 0.5, n).astype(np.float32)
    alpha = rng.normal(1, 0.5, n).astype(np.float32)
    return rotation.coefficients(variant, g, theta, alpha)


def _model(nodes, inits, d_in, d, rank, opsets=((("", OPSET)),)) -> ir.Model:
    dims = ["batch", "seq"][: rank - 1]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [*dims, d_in])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims, d])
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid(a, b) for a, b in opsets])
    model = ir.serde.deserialize_model(proto)
    road_op.attach_functions(model)
    return model


def linear(nodes: list, inits: dict, out: str, d_in: int, d: int, bias: bool, gemm: str | None,
           rng: np.random.Generator) -> None:
    """x -> `out` through MatMul [+ Add], or Gemm ("transB" for a [d, d_in] weight, "plain" for [d_in, d])."""
    if gemm:
        trans = gemm == "transB"
        inits["w"] = rng.standard_normal((d, d_in) if trans else (d_in, d)).astype(np.float32)
        inputs = ["x", "w"]
        if bias:
            inits["b"] = rng.standard_normal(d).astype(np.float32)
            inputs.append("b")
        nodes.append(helper.make_node("Gemm", inputs, [out], transB=int(trans), alpha=0.5))
        return
    inits["w"] = rng.standard_normal((d_in, d)).astype(np.float32)
    if bias:
        inits["b"] = rng.standard_normal(d).astype(np.float32)
        nodes += [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], [out])]
    else:
        nodes.append(helper.make_node("MatMul", ["x", "w"], [out]))


def road_model(d_in: int, d: int, g: int, variant: str, *, bias: bool = True, rank: int = 3, seed: int = 0,
               gemm: str | None = None, chain: int = 1) -> ir.Model:
    """x -> linear -> `chain` road.Rotate nodes -> y."""
    rng = np.random.default_rng(seed)
    nodes: list = []
    inits: dict = {}
    linear(nodes, inits, "h0", d_in, d, bias, gemm, rng)
    for i in range(chain):
        c1, c2 = coefficients(variant, d, g, rng)
        inits[f"c1_{i}"], inits[f"c2_{i}"] = c1, c2
        out = "y" if i == chain - 1 else f"h{i + 1}"
        nodes.append(helper.make_node(road_op.OP_TYPE, [f"h{i}", f"c1_{i}", f"c2_{i}"], [out],
                                      domain=road_op.DOMAIN, group_size=g))
    return _model(nodes, inits, d_in, d, rank, (("", OPSET), (road_op.DOMAIN, road_op.VERSION)))


def decomposed_model(d_in: int, d: int, g: int, variant: str, *, bias: bool = True, rank: int = 3,
                     seed: int = 0, form: str = "gather") -> ir.Model:
    """x -> linear -> the rotation spelt out as the exporter writes peft's `_apply_road` -> y.

    form "gather": x.reshape(-1, 2, h); Gather 0/1 on axis 1; Neg; Unsqueeze; Concat; Reshape to Shape(x).
    form "slice": the same halves taken with Slice + Squeeze.
    """
    rng = np.random.default_rng(seed)
    nodes: list = []
    inits: dict = {}
    linear(nodes, inits, "h", d_in, d, bias, None, rng)
    c1, c2 = coefficients(variant, d, g, rng)
    inits.update(first_col=c1, second_col=c2, grouped=np.array([-1, 2, g // 2]), one=np.array([1]),
                 zero_i=np.array(0), one_i=np.array(1), zero=np.array([0]), two=np.array([2]))
    nodes += [helper.make_node("Reshape", ["h", "grouped"], ["xg"])]
    if form == "gather":
        nodes += [helper.make_node("Gather", ["xg", "zero_i"], ["x1"], axis=1),
                  helper.make_node("Gather", ["xg", "one_i"], ["x2"], axis=1)]
    else:
        nodes += [helper.make_node("Slice", ["xg", "zero", "one", "one"], ["x1s"]),
                  helper.make_node("Squeeze", ["x1s", "one"], ["x1"]),
                  helper.make_node("Slice", ["xg", "one", "two", "one"], ["x2s"]),
                  helper.make_node("Squeeze", ["x2s", "one"], ["x2"])]
    nodes += [
        helper.make_node("Neg", ["x2"], ["nx2"]),
        helper.make_node("Unsqueeze", ["nx2", "one"], ["u1"]),
        helper.make_node("Unsqueeze", ["x1", "one"], ["u2"]),
        helper.make_node("Concat", ["u1", "u2"], ["stack"], axis=1),
        helper.make_node("Shape", ["h"], ["h_shape"]),
        helper.make_node("Reshape", ["stack", "h_shape"], ["rot"]),
        helper.make_node("Mul", ["h", "first_col"], ["p1"]),
        helper.make_node("Mul", ["rot", "second_col"], ["p2"]),
        helper.make_node("Add", ["p1", "p2"], ["y"]),
    ]
    return _model(nodes, inits, d_in, d, rank)


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def count(model: ir.Model, op_type: str, domain: str = "") -> int:
    return sum(1 for n in model.graph.all_nodes() if n.op_type == op_type and n.domain == domain)


def check_model(model: ir.Model) -> None:
    onnx.checker.check_model(ir.serde.serialize_model(model))
