"""attention: the exporter's 3-D key transpose -> one Transpose, grouped-query products without the repeat; the
rewritten graph computes what the original did, and look-alikes that compute something else are left alone."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from road_export.passes.attention import AttentionPass

HEADS, KV, HEAD_DIM = 8, 2, 16
OPSET = 20


def attention_model(*, repeat: str = "repeat", key: str = "swap", scaled: bool = True) -> ir.Model:
    """softmax(q k^T * s + mask) v over a repeated key/value, spelt as torch.onnx writes transformers' sdpa
    attention: `repeat_kv` as Unsqueeze/Expand/Reshape with sizes read from Shape nodes, the key transposed through
    a 3-D Reshape/Transpose/Reshape, the scale split as Mul(q, sqrt s) and Mul(k^T, sqrt s).

    repeat: "repeat" (each kv head `HEADS // KV` times in a row, as repeat_kv), "tile" (the kv heads cycled: a
    planted fault of the same shape). key: "swap" (the transpose of the last two axes), "scramble" (the key
    flattened as [-1, D, T] before the 3-D transpose: the right shape, scrambled values; a planted fault)."""
    rep = HEADS // KV
    nodes = []
    inits = {"zero": np.array([0], np.int64), "two": np.array([2], np.int64), "four": np.array([4], np.int64),
             "minus1": np.array([-1], np.int64), "minus2": np.array([-2], np.int64),
             "big": np.array([2**62], np.int64), "rep": np.array([rep], np.int64), "heads": np.array([HEADS], np.int64),
             "axis2": np.array([2], np.int64), "axis1": np.array([1], np.int64),
             "sqrt_scale": np.array(HEAD_DIM ** -0.25, np.float32)}

    def repeated(x: str) -> str:
        unsqueeze_axis, middle = ("axis2", [f"{x}_b", f"{x}_kv", "rep"]) if repeat == "repeat" else \
            ("axis1", [f"{x}_b", "rep", f"{x}_kv"])
        nodes.extend([
            helper.make_node("Shape", [x], [f"{x}_shape"]),
            helper.make_node("Slice", [f"{x}_shape", "zero", "axis1"], [f"{x}_b"]),
            helper.make_node("Slice", [f"{x}_shape", "axis1", "two"], [f"{x}_kv"]),
            helper.make_node("Slice", [f"{x}_shape", "two", "four"], [f"{x}_td"]),
            helper.make_node("Unsqueeze", [x, unsqueeze_axis], [f"{x}_u"]),
            helper.make_node("Concat", [*middle, f"{x}_td"], [f"{x}_eshape"], axis=0),
            helper.make_node("Expand", [f"{x}_u", f"{x}_eshape"], [f"{x}_e"]),
            helper.make_node("Concat", [f"{x}_b", "heads", f"{x}_td"], [f"{x}_rshape"], axis=0),
            helper.make_node("Reshape", [f"{x}_e", f"{x}_rshape"], [f"{x}_r"]),
        ])
        return f"{x}_r"

    k, v = repeated("k"), repeated("v")
    flat = ["minus1", "k_second_last", "k_last"] if key == "swap" else ["minus1", "k_last", "k_second_last"]
    nodes.extend([  # torch/onnx aten_scaled_dot_product_attention's key transpose
        helper.make_node("Shape", [k], ["ks"]),
        helper.make_node("Slice", ["ks", "minus1", "big"], ["k_last"]),
        helper.make_node("Slice", ["ks", "minus2", "minus1"], ["k_second_last"]),
        helper.make_node("Slice", ["ks", "zero", "minus2"], ["k_first"]),
        helper.make_node("Concat", flat, ["k_flat_shape"], axis=0),
        helper.make_node("Reshape", [k, "k_flat_shape"], ["k_flat"]),
        helper.make_node("Transpose", ["k_flat"], ["k_flat_t"], perm=[0, 2, 1]),
        helper.make_node("Concat", ["k_first", "k_last", "k_second_last"], ["kt_shape"], axis=0),
        helper.make_node("Reshape", ["k_flat_t", "kt_shape"], ["kt"]),
    ])
    kt = "kt"
    if scaled:
        nodes += [helper.make_node("Mul", ["q", "sqrt_scale"], ["q_s"]),
                  helper.make_node("Mul", [kt, "sqrt_scale"], ["kt_s"])]
    q_in, k_in = ("q_s", "kt_s") if scaled else ("q", kt)
    nodes += [helper.make_node("MatMul", [q_in, k_in], ["scores"]),
              helper.make_node("Add", ["scores", "mask"], ["masked"]),
              helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", v], ["y"])]
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["batch", HEADS, "sequence", HEAD_DIM]),
         helper.make_tensor_value_info("k", TensorProto.FLOAT, ["batch", KV, "past + sequence", HEAD_DIM]),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, ["batch", KV, "past + sequence", HEAD_DIM]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, "sequence", "past + sequence"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", HEADS, "sequence", HEAD_DIM])],
        [numpy_helper.from_array(a, n) for n, a in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    # the shapes onnx infers, symbolic dims carried through the Shape/Slice/Concat sizes (the exporter records its
    # own); the pass reads ranks and head counts from them
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto, data_prop=True))


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, feeds)[0]


def feeds(batch: int, sequence: int, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    total = past + sequence
    mask = np.zeros((batch, 1, sequence, total), np.float32)
    mask[1:, ..., :2] = -np.inf if total > 2 else 0  # left padding on the rows after the first
    return {"q": rng.standard_normal((batch, HEADS, sequence, HEAD_DIM)).astype(np.float32),
            "k": rng.standard_normal((batch, KV, total, HEAD_DIM)).astype(np.float32),
            "v": rng.standard_normal((batch, KV, total, HEAD_DIM)).astype(np.float32), "mask": mask}


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


@pytest.mark.parametrize("scaled", [True, False])
def test_key_transpose_and_repeat_rewritten_outputs_kept(scaled):
    model = attention_model(scaled=scaled)
    cases = [feeds(1, 1, 6), feeds(5, 1, 9, seed=1), feeds(3, 7, 0, seed=2), feeds(2, 4, 3, seed=3)]
    before = [run(model, f) for f in cases]
    result = AttentionPass()(model)
    assert (result.swapped, result.grouped) == (1, 2) and result.modified
    kinds = ops(model)
    assert "Expand" not in kinds and "Unsqueeze" not in kinds  # no repeat left
    transposes = [n for n in model.graph if n.op_type == "Transpose"]
    assert len(transposes) == 1 and list(transposes[0].attributes["perm"].as_ints()) == [0, 1, 3, 2]
    assert transposes[0].inputs[0].name == "k"  # the unrepeated key
    for f, expected in zip(cases, before, strict=True):
        np.testing.assert_allclose(run(model, f), expected, rtol=1e-5, atol=1e-5)


def test_scales_stay_next_to_the_product():
    """Both scalar Muls end up on the product's inputs, where onnxruntime folds them into FusedMatMul's alpha."""
    model = attention_model(scaled=True)
    AttentionPass()(model)
    scores = next(n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].producer().op_type == "Mul")
    left, right = (v.producer() for v in scores.inputs)
    assert left.op_type == "Mul" and left.inputs[0].producer().op_type == "Reshape"
    assert right.op_type == "Mul" and right.inputs[0].producer().op_type == "Transpose"


def test_tiled_heads_are_not_regrouped():
    """Planted fault: the kv heads cycled (Unsqueeze on axis 1: head h reads kv head h % kv) instead of repeated
    in a row; same shapes, other values. The key transpose still becomes one Transpose; the products stay."""
    model = attention_model(repeat="tile")
    f = feeds(3, 2, 5)
    before = run(model, f)
    result = AttentionPass(debug=True)(model)
    assert result.grouped == 0 and result.swapped == 1
    assert any("repeated 4 times" in line for line in result.not_fired), result.not_fired
    assert ops(model).count("Expand") == 2
    np.testing.assert_allclose(run(model, f), before, rtol=1e-5, atol=1e-5)


def test_scrambled_key_is_not_swapped():
    """Planted fault: the key flattened as [-1, D, T] before the 3-D transpose (a scrambled key of the right
    shape): not a swap, so it stays, and the product against it is not regrouped (no Transpose of the repeat)."""
    model = attention_model(key="scramble")
    f = feeds(2, 3, 4)
    before = run(model, f)
    result = AttentionPass(debug=True)(model)
    assert result.swapped == 0
    assert any("last two axes swapped" in line for line in result.not_fired), result.not_fired
    assert result.grouped == 1  # the value side is still a true repeat
    np.testing.assert_allclose(run(model, f), before, rtol=1e-5, atol=1e-5)


def test_wrong_permutation_is_refused():
    """Planted fault: the 3-D Transpose with perm [1, 0, 2] (heads and rows swapped) is no key transpose."""
    model = attention_model(scaled=False)
    node = next(n for n in model.graph if n.op_type == "Transpose")
    node.attributes["perm"] = ir.AttrInt64s("perm", [1, 0, 2])
    result = AttentionPass(debug=True)(model)
    assert result.swapped == 0
    assert any("not [0, 2, 1]" in line for line in result.not_fired), result.not_fired


def test_attention_without_repeat_or_transpose_is_untouched():
    """Multi-head attention (kv heads = heads) spelt with a plain 4-D transpose: nothing to rewrite."""
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", 4, "s", 8])
    k = helper.make_tensor_value_info("k", TensorProto.FLOAT, ["b", 4, "t", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, "s", "t"])
    graph = helper.make_graph([helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
                               helper.make_node("MatMul", ["q", "kt"], ["y"])], "mha", [q, k], [y])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]))
    result = AttentionPass()(model)
    assert not result.modified and (result.swapped, result.grouped) == (0, 0) and len(model.graph) == 2
