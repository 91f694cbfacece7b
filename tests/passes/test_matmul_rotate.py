"""matmul_rotate: MatMul + road rotation -> road.MatMulRotate[Rows]; the fused graph computes what the original did
(checked here on the CPU through the new ops' standard-op bodies; the CUDA kernels are checked in test_gpu.py)."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from passes import testutil
from road_export.graph import ops as road_op
from road_export.passes.lower import LowerPass
from road_export.passes.matmul_rotate import MatMulRotatePass


def fused_count(model: ir.Model, op_type: str) -> int:
    return testutil.count(model, op_type, road_op.DOMAIN)


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_matmul_then_rotation_fuses_and_keeps_outputs(variant):
    model = testutil.road_model(6, 32, 8, variant, bias=False, seed=3)
    LowerPass()(model)  # road_1 becomes road.RotateTied: both op types fuse
    x = np.random.default_rng(0).standard_normal((2, 5, 6)).astype(np.float32)
    before = testutil.run(model, x)
    result = MatMulRotatePass()(model)
    assert result.fused == 1 and result.rows == 0 and result.modified
    assert fused_count(model, road_op.MATMUL_OP_TYPE) == 1
    assert testutil.count(model, "MatMul", "") == 0 and fused_count(model, "Rotate") == 0
    np.testing.assert_allclose(testutil.run(model, x), before, atol=1e-5, rtol=0)


def test_only_a_rotation_fed_by_matmul_fuses():
    """A bias Add between MatMul and the rotation, or a rotation of a rotation, stays as it is."""
    with_bias = testutil.road_model(6, 16, 8, "road_4", bias=True)
    assert MatMulRotatePass()(with_bias).fused == 0
    chain = testutil.road_model(6, 16, 8, "road_4", bias=False, chain=2, rank=2)
    x = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    before = testutil.run(chain, x)
    assert MatMulRotatePass()(chain).fused == 1
    assert fused_count(chain, "Rotate") == 1
    np.testing.assert_allclose(testutil.run(chain, x), before, atol=1e-5, rtol=0)


def mixed_model(n: int = 16, k: int = 6, g: int = 8, adapters: int = 3, axes=(1,), target=(-1, 1, 16)) -> ir.Model:
    """What a mixed-adapter export writes per layer: banks [adapters + 1, n] (row 0 identity) gathered by
    Unsqueeze(adapter_ids, [1]), reshaped to [batch, 1, n], into road.Rotate after MatMul."""
    rng = np.random.default_rng(7)
    banks = [testutil.coefficients("road_4", n, g, rng) for _ in range(adapters)]
    b1 = np.stack([np.ones(n, np.float32), *[b[0] for b in banks]])
    b2 = np.stack([np.zeros(n, np.float32), *[b[1] for b in banks]])
    inits = {"w": rng.standard_normal((k, n)).astype(np.float32), "b1": b1, "b2": b2,
             "axes": np.array(axes, np.int64), "shape": np.array(target, np.int64)}
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Unsqueeze", ["adapter_ids", "axes"], ["idx"]),
        helper.make_node("GatherND", ["b1", "idx"], ["g1"], batch_dims=0),
        helper.make_node("GatherND", ["b2", "idx"], ["g2"], batch_dims=0),
        helper.make_node("Reshape", ["g1", "shape"], ["c1"], allowzero=1),
        helper.make_node("Reshape", ["g2", "shape"], ["c2"], allowzero=1),
        helper.make_node(road_op.OP_TYPE, ["h", "c1", "c2"], ["y"], domain=road_op.DOMAIN, group_size=g),
    ]
    graph = helper.make_graph(
        nodes, "mixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", k]),
         helper.make_tensor_value_info("adapter_ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", n])],
        [numpy_helper.from_array(v, name) for name, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", testutil.OPSET),
                                                    helper.make_opsetid(road_op.DOMAIN, road_op.VERSION)])
    model = ir.serde.deserialize_model(proto)
    road_op.attach_functions(model)
    return model


def run_mixed(model: ir.Model, x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    proto = ir.serde.serialize_model(model).SerializeToString()
    session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "adapter_ids": ids})[0]


def test_per_row_banks_fold_into_matmul_rotate_rows():
    model = mixed_model()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 6)).astype(np.float32)
    cases = [np.array(ids, np.int64) for ids in ([0, 1, 2, 3], [3, 3, 3, 3], [2, 0, 1, 0])]
    before = [run_mixed(model, x, ids) for ids in cases]
    result = MatMulRotatePass()(model)
    assert result.fused == 1 and result.rows == 1
    assert fused_count(model, road_op.MATMUL_ROWS_OP_TYPE) == 1
    assert not [n for n in model.graph if n.op_type in ("GatherND", "Unsqueeze", "Reshape", "MatMul")]
    for ids, expected in zip(cases, before, strict=True):
        np.testing.assert_allclose(run_mixed(model, x, ids), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fault,reason", [
    (dict(axes=(0,)), "unsqueezes adapter_ids on axes"),
    (dict(target=(-1, 16)), "not [-1, 1, ..., 16]"),
])
def test_a_gather_that_is_not_per_row_is_not_folded(fault, reason):
    """Planted: ids unsqueezed on another axis, or coefficients reshaped otherwise, are not a bank row per batch
    row: the rows rule does not fire and says why with debug=True; the plain rule takes the computed coefficients
    as they are, so the graph keeps its meaning."""
    model = mixed_model(**fault)
    x = np.random.default_rng(4).standard_normal((2, 2, 6)).astype(np.float32)
    ids = np.array([1, 3], np.int64) if fault.get("axes") != (0,) else np.array([2], np.int64)
    x = x if fault.get("axes") != (0,) else x[:1]
    before = run_mixed(model, x, ids)
    result = MatMulRotatePass(debug=True)(model)
    assert result.rows == 0 and result.fused == 1
    assert any(reason in line for line in result.not_fired), result.not_fired
    np.testing.assert_allclose(run_mixed(model, x, ids), before, atol=1e-5, rtol=0)


def test_fused_model_keeps_weights_in_external_data(tmp_path, monkeypatch):
    """road_export.runtime.gpu.fused_model: the rewritten graph is serialized without its external weights, which
    onnxruntime then reads from the original folder (session.model_external_initializers_file_folder_path)."""
    from road_export.runtime import gpu
    from road_export.graph import native

    model = testutil.road_model(128, 256, 8, "road_4", bias=False, seed=5, rank=2)
    x = np.random.default_rng(3).standard_normal((2, 128)).astype(np.float32)
    before = testutil.run(model, x)
    path = tmp_path / "m.onnx"
    ir.save(model, path, external_data="m.onnx.data", size_threshold_bytes=0)
    monkeypatch.setattr(native, "matmul_kernels", lambda: None)  # as where the CUDA kernels and cuBLAS are
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source, fused = gpu.fused_model(path, options)
    assert fused == 1 and isinstance(source, bytes) and len(source) * 10 < (tmp_path / "m.onnx.data").stat().st_size
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], before, atol=1e-5, rtol=0)
    monkeypatch.setattr(native, "matmul_kernels", lambda: "no cuBLAS")
    assert gpu.fused_model(path, ort.SessionOptions()) == (None, 0)


def test_gather_with_batch_dims_is_not_folded():
    """Planted: a GatherND with batch_dims 1 picks differently from a bank row per id: the rows rule refuses it."""
    model = mixed_model()
    for node in model.graph:
        if node.op_type == "GatherND":
            node.attributes["batch_dims"] = ir.AttrInt64("batch_dims", 1)
    result = MatMulRotatePass(debug=True)(model)
    assert result.rows == 0
    assert any("batch_dims 1" in line for line in result.not_fired), result.not_fired


def test_symlinked_model_reads_external_data_beside_the_link(tmp_path, monkeypatch):
    """A Hugging Face cache links snapshots/<rev>/model.onnx to blobs/<hash>: the data file sits beside the link."""
    from road_export.runtime import gpu
    from road_export.graph import native

    model = testutil.road_model(64, 64, 8, "road_4", bias=False, seed=6, rank=2)
    x = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    before = testutil.run(model, x)
    (tmp_path / "blobs").mkdir()
    (tmp_path / "snap").mkdir()
    ir.save(model, tmp_path / "snap" / "m.onnx", external_data="m.onnx.data", size_threshold_bytes=0)
    (tmp_path / "snap" / "m.onnx").rename(tmp_path / "blobs" / "abc123")
    (tmp_path / "snap" / "m.onnx").symlink_to(tmp_path / "blobs" / "abc123")
    monkeypatch.setattr(native, "matmul_kernels", lambda: None)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source, fused = gpu.fused_model(tmp_path / "snap" / "m.onnx", options)
    assert fused == 1
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], before, atol=1e-5, rtol=0)
