"""linear_rotate: MatMul / MatMulNBits + road rotation -> road.LinearRotate / road.MatMulNBitsRotate[Rows]; the fused
graph computes what the original did (on the CPU through the ops' standard-op bodies; the CUDA kernel is checked
against the same bodies in test_gpu.py), and the MatMulNBits blocks written here are the ones onnxruntime reads."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes import testutil
from passes.test_matmul_rotate import mixed_model, run_mixed
from road_export.graph import ops as road_op
from road_export.core import rotation
from road_export.passes.linear_rotate import LinearRotatePass
from road_export.passes.lower import LowerPass


def quantize_blocks(w: np.ndarray, bits: int = 4, block: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric MatMulNBits blocks of W [k, n] (as onnxruntime's MatMulNBits reads them: B [n, k / block,
    block * bits / 8], low nibble first, zero point 2^(bits-1); scales [n, k / block]) and the dequantized W."""
    k, n = w.shape
    blocks = w.T.reshape(n, k // block, block)
    top = 2 ** (bits - 1)
    scale = np.abs(blocks).max(axis=2, keepdims=True) / (top - 1)
    scale[scale == 0] = 1
    q = np.clip(np.rint(blocks / scale) + top, 0, 2 * top - 1).astype(np.uint8)
    dequant = ((q.astype(np.float32) - top) * scale).reshape(n, k).T
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return q, scale.reshape(n, k // block).astype(np.float32), dequant.astype(np.float32)


def nbits_model(k: int = 64, n: int = 32, g: int = 16, bits: int = 4, zero_points: bool = False, seed: int = 0):
    """x [batch, seq, k] -> MatMulNBits -> road.Rotate (road_4 coefficients); also the float reference pieces."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    q, scales, dequant = quantize_blocks(w, bits)
    c1, c2 = testutil.coefficients("road_4", n, g, rng)
    inits = {"B": q, "scales": scales, "c1": c1, "c2": c2}
    inputs = ["x", "B", "scales"]
    if zero_points:
        inits["zp"] = np.full((n * ((k // 32 + 1) // 2),), 0x88, np.uint8)
        inputs.append("zp")
    nodes = [helper.make_node("MatMulNBits", inputs, ["h"], domain="com.microsoft", K=k, N=n, bits=bits,
                              block_size=32),
             helper.make_node(road_op.OP_TYPE, ["h", "c1", "c2"], ["y"], domain=road_op.DOMAIN, group_size=g)]
    graph = helper.make_graph(nodes, "nbits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])],
                              [numpy_helper.from_array(v, name) for name, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", testutil.OPSET),
                                                    helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid(road_op.DOMAIN, road_op.VERSION)])
    model = ir.serde.deserialize_model(proto)
    road_op.attach_functions(model)
    return model, dequant, c1, c2, g


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_matmul_then_rotation_becomes_linear_rotate(variant):
    model = testutil.road_model(16, 32, 8, variant, bias=False, seed=3)
    LowerPass()(model)  # road_1 becomes road.RotateTied: both op types fuse
    w = next(v.const_value.numpy() for v in model.graph.initializers.values() if v.const_value.numpy().ndim == 2)
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    before = testutil.run(model, x)
    result = LinearRotatePass()(model)
    assert result.modified and result.linear == 1 and result.nbits == 0 and result.rows == 0
    node = next(n for n in model.graph.all_nodes() if n.op_type == road_op.LINEAR_OP_TYPE)
    weight = node.inputs[1].const_value.numpy()
    np.testing.assert_array_equal(weight, w.T)  # kept as [n, k] rows
    assert "_road_transpose_w" not in node.attributes
    assert testutil.count(model, "MatMul", "") == 0 and testutil.count(model, "Rotate", road_op.DOMAIN) == 0
    assert tuple(w.shape) not in [tuple(v.shape) for v in model.graph.initializers.values()]  # no [k, n] copy left
    np.testing.assert_allclose(testutil.run(model, x), before, atol=1e-5, rtol=0)


def test_blocks_written_here_are_the_ones_onnxruntime_reads():
    """The test's own quantizer (the layout the CUDA kernel decodes) against onnxruntime's MatMulNBits: a wrong
    nibble order or zero point here would make every kernel check below meaningless."""
    model, dequant, c1, c2, g = nbits_model(seed=1)
    x = np.random.default_rng(2).standard_normal((2, 3, 64)).astype(np.float32)
    expected = rotation.rotate(x @ dequant, c1, c2, g)
    np.testing.assert_allclose(testutil.run(model, x), expected, atol=1e-4, rtol=1e-4)
    # planted: the nibbles swapped in each byte give another product
    swapped = ir.serde.serialize_model(model)
    b = next(t for t in swapped.graph.initializer if t.name == "B")
    raw = numpy_helper.to_array(b)
    b.CopyFrom(numpy_helper.from_array(((raw >> 4) | (raw << 4)).astype(np.uint8), "B"))
    faulty = testutil.run(ir.serde.deserialize_model(swapped), x)
    assert np.abs(faulty - expected).max() > 1e-2


@pytest.mark.parametrize("bits", [4, 8])
def test_matmul_nbits_then_rotation_fuses(bits):
    model, dequant, c1, c2, g = nbits_model(bits=bits, seed=bits)
    x = np.random.default_rng(3).standard_normal((2, 4, 64)).astype(np.float32)
    before = testutil.run(model, x)
    result = LinearRotatePass()(model)
    assert result.nbits == 1 and result.linear == 0
    node = next(n for n in model.graph.all_nodes() if n.op_type == road_op.NBITS_OP_TYPE)
    assert {a: node.attributes.get_int(a) for a in ("K", "N", "bits", "block_size", "group_size")} == \
        {"K": 64, "N": 32, "bits": bits, "block_size": 32, "group_size": g}
    assert testutil.count(model, "MatMulNBits", "com.microsoft") == 0
    np.testing.assert_allclose(testutil.run(model, x), before, atol=1e-5, rtol=0)
    np.testing.assert_allclose(before, rotation.rotate(x @ dequant, c1, c2, g), atol=1e-4, rtol=1e-4)


def test_what_the_kernel_cannot_read_is_left_and_said():
    """Zero points (asymmetric blocks), a computed weight and a bias Add keep their rotation node, with the reason."""
    model, *_ = nbits_model(zero_points=True)
    result = LinearRotatePass(debug=True)(model)
    assert result.nbits == 0 and not result.modified
    assert any("zero_points" in line for line in result.not_fired), result.not_fired
    with_bias = testutil.road_model(16, 32, 8, "road_4", bias=True)
    assert LinearRotatePass()(with_bias).linear == 0
    computed = testutil.road_model(16, 32, 8, "road_4", bias=False)
    w = next(v for v in computed.graph.initializers.values() if v.shape is not None and len(v.shape) == 2)
    computed.graph.initializers.pop(w.name)
    w.const_value = None
    computed.graph.inputs.append(w)  # W fed at run time: not a constant to transpose
    result = LinearRotatePass(debug=True)(computed)
    assert result.linear == 0 and any("not a constant" in line for line in result.not_fired), result.not_fired


def test_mixed_banks_become_linear_rotate_rows():
    model = mixed_model()
    x = np.random.default_rng(5).standard_normal((3, 4, 6)).astype(np.float32)
    ids = np.array([2, 0, 3], np.int64)
    before = run_mixed(model, x, ids)
    result = LinearRotatePass()(model)
    assert result.rows == 1 and result.linear == 1
    assert testutil.count(model, road_op.LINEAR_ROWS_OP_TYPE, road_op.DOMAIN) == 1
    assert testutil.count(model, "GatherND", "") == 0
    np.testing.assert_allclose(run_mixed(model, x, ids), before, atol=1e-5, rtol=0)


def test_shape_inference_gives_the_product_width():
    """onnx's shape inference (the registered schemas) gives Y's last axis from W's first (Linear) or N (NBits)."""
    import onnx

    model = testutil.road_model(16, 32, 8, "road_4", bias=False)
    LinearRotatePass()(model)
    inferred = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(model))
    fused = next(n for n in inferred.graph.node if n.op_type == road_op.LINEAR_OP_TYPE)
    info = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}[fused.output[0]]
    assert info.type.tensor_type.shape.dim[-1].dim_value == 32
    nbits, *_ = nbits_model()
    LinearRotatePass()(nbits)
    inferred = onnx.shape_inference.infer_shapes(ir.serde.serialize_model(nbits))
    fused = next(n for n in inferred.graph.node if n.op_type == road_op.NBITS_OP_TYPE)
    info = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}[fused.output[0]]
    assert info.type.tensor_type.shape.dim[-1].dim_value == 32


def test_session_options_run_the_fused_file_on_the_cpu():
    """A file holding the fused nodes (as a CUDA genai directory does) still opens on a CPU onnxruntime."""
    model, *_ = nbits_model()
    LinearRotatePass()(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((1, 1, 64), np.float32)})[0].shape == (1, 1, 32)


def test_forms_choose_which_products_fuse():
    """forms=("nbits",) (a GPU session's in-memory rewrite: no transposed copies of float weights) leaves a float
    MatMul's rotation alone and fuses MatMulNBits'."""
    float_model = testutil.road_model(16, 32, 8, "road_4", bias=False)
    assert LinearRotatePass(forms=("nbits",))(float_model).linear == 0
    nbits, *_ = nbits_model()
    assert LinearRotatePass(forms=("nbits",))(nbits).nbits == 1
    nbits, *_ = nbits_model()
    assert LinearRotatePass(forms=("linear",))(nbits).nbits == 0
