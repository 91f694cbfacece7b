"""road.LinearRotate[Rows] and road.MatMulNBitsRotate[Rows] on onnxruntime's CUDA execution provider: the CUDA kernel
(road_cuda.h: the tensor-core, block and warp forms) against torch in float64 and against onnxruntime's own
MatMulNBits, per-row banks, the fallbacks, and CUDA-graph capture. Marked `gpu`; skipped without onnxruntime's CUDA
provider or the road kernels."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from passes import testutil
from passes.test_linear_rotate import quantize_blocks
from test_gpu import cuda_session, torch_rotate
from test_native import NP

from road_export.graph import native
from road_export.graph import ops as road_op
from road_export.runtime.gpu import cuda_providers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                       reason="onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"),
    pytest.mark.skipif(native.cuda_kernels() is not None, reason=f"no road CUDA kernels: {native.cuda_kernels()}"),
]
TOL = {TensorProto.FLOAT: 1e-5, TensorProto.FLOAT16: 2e-3, TensorProto.BFLOAT16: 1.6e-2, TensorProto.DOUBLE: 1e-12}


def fused_model(op: str, weights: dict[str, np.ndarray], g: int, dtype: int, rows: bool, k: int, n: int,
                attributes: dict | None = None) -> bytes:
    """y = road.<op>(x, weights..., C1, C2[, adapter_ids]) with no function bodies (only the CUDA kernel runs it);
    float inputs are cast to `dtype` inside the graph, uint8 blocks are not."""
    io_type = TensorProto.FLOAT if dtype == TensorProto.BFLOAT16 else dtype
    names = ["x", *weights]
    nodes, node_inputs, inits = [], [], []
    for name in names:
        array = weights.get(name)
        if array is not None and array.dtype == np.uint8:
            inits.append(numpy_helper.from_array(array, name))
            node_inputs.append(name)
            continue
        if array is not None:
            inits.append(numpy_helper.from_array(array.astype(NP[io_type]), name))
        nodes.append(helper.make_node("Cast", [name], [name + "r"], to=dtype))
        node_inputs.append(name + "r")
    if rows:
        node_inputs.append("adapter_ids")
    nodes += [helper.make_node(op, node_inputs, ["yr"], domain=road_op.DOMAIN, group_size=g, **(attributes or {})),
              helper.make_node("Cast", ["yr"], ["y"], to=io_type)]
    inputs = [helper.make_tensor_value_info("x", io_type, ["b", "s", k])]
    if rows:
        inputs.append(helper.make_tensor_value_info("adapter_ids", TensorProto.INT64, ["b"]))
    graph = helper.make_graph(nodes, "linear", inputs, [helper.make_tensor_value_info("y", io_type, ["b", "s", n])],
                              inits)
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid(road_op.DOMAIN, road_op.VERSION)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=11).SerializeToString()


SHAPES = [  # (batch, sequence, k, n, group size)
    (1, 1, 2048, 2560, 64),   # a decode step at batch 1, TinyLlama's packed qkv
    (8, 1, 2048, 512, 64),    # batch 8
    (3, 17, 256, 128, 64),    # 51 rows: chunks of 8 on the grid's second axis (NBits) or cuBLAS (Linear)
    (2, 3, 128, 48, 16),      # odd widths: the last block of pairs is partial
    (4, 1, 200, 64, 16),      # k not a multiple of the tensor-core form's 64-value step (its tail is masked)
    (5, 1, 72, 32, 4),        # half a group under 8 pairs: the tensor-core form does not fit, the block form runs
    (2, 0, 64, 64, 64),       # no rows
]


def reference(x, w, c1, c2, g, dtype, ids=None):
    def rounded(a):
        t = torch.from_numpy(np.asarray(a, np.float32).astype(NP.get(dtype, np.float32)).astype(np.float32))
        return (t.to(torch.bfloat16).float() if dtype == TensorProto.BFLOAT16 else t).double()

    r1, r2 = rounded(c1), rounded(c2)
    if ids is not None:
        r1, r2 = r1[torch.from_numpy(ids)][:, None, :], r2[torch.from_numpy(ids)][:, None, :]
    return torch_rotate(rounded(x) @ rounded(w), r1, r2, g).numpy()


def coefficients(n, g, rng, rows):
    banks = [testutil.coefficients("road_4", n, g, rng) for _ in range(3)]
    if not rows:
        return banks[0]
    return np.stack([b[0] for b in banks]).astype(np.float32), np.stack([b[1] for b in banks]).astype(np.float32)


def check(session, feeds, expected, dtype, op, tmp_path=None):
    got = session.run(None, feeds)[0].astype(np.float64)
    assert got.shape == expected.shape
    if expected.size:
        scale = np.abs(expected).max()
        assert np.abs(got - expected).max() <= TOL[dtype] * scale, np.abs(got - expected).max() / scale
    return got


def providers_ran(session) -> dict[str, str]:
    return {e["args"]["op_name"]: e["args"].get("provider") for e in json.load(open(session.end_profiling()))
            if e.get("cat") == "Node"}


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE],
                         ids=["fp32", "fp16", "bf16", "fp64"])
@pytest.mark.parametrize("rows", [False, True], ids=["one-adapter", "per-row-banks"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("form", ["mma", "tile", "warp"])
def test_linear_rotate_kernel_matches_torch(tmp_path, monkeypatch, shape, rows, dtype, form):
    """W [n, k]: up to 8 rows in the one-launch kernel (each form: the tensor-core form where it fits, the block form,
    the warp form), more (and float64) through cuBLAS then the rotation."""
    monkeypatch.setenv("ROAD_EXPORT_LINEAR", form)
    batch, seq, k, n, g = shape
    rng = np.random.default_rng(batch * 1000 + n)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    x = rng.standard_normal((batch, seq, k)).astype(np.float32)
    c1, c2 = coefficients(n, g, rng, rows)
    ids = rng.integers(0, 3, batch).astype(np.int64) if rows else None
    op = road_op.LINEAR_ROWS_OP_TYPE if rows else road_op.LINEAR_OP_TYPE
    model = fused_model(op, {"w": np.ascontiguousarray(w.T), "c1": c1, "c2": c2}, g, dtype, rows, k, n)
    s = cuda_session(model, profile=str(tmp_path / "lin"))
    feeds = {"x": x.astype(NP.get(dtype, np.float32))} | ({"adapter_ids": ids} if rows else {})
    check(s, feeds, reference(x, w, c1, c2, g, dtype, ids), dtype, op)
    assert providers_ran(s)[op] == "CUDAExecutionProvider"


NBITS_SHAPES = [s for s in SHAPES if s[2] % 32 == 0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("rows", [False, True], ids=["one-adapter", "per-row-banks"])
@pytest.mark.parametrize("shape", NBITS_SHAPES, ids=[str(s) for s in NBITS_SHAPES])
@pytest.mark.parametrize("form", ["mma", "tile", "warp"])
def test_nbits_rotate_kernel_matches_torch_on_the_dequantized_weights(tmp_path, monkeypatch, shape, rows, dtype, bits,
                                                                      form):
    """MatMulNBits' blocks (4 and 8 bits, symmetric, block 32) decoded in the kernel equal the dequantized weights
    (the layout is checked against onnxruntime's own MatMulNBits in tests/passes/test_linear_rotate.py)."""
    monkeypatch.setenv("ROAD_EXPORT_LINEAR", form)
    batch, seq, k, n, g = shape
    rng = np.random.default_rng(batch * 1000 + n + bits)
    w = rng.standard_normal((k, n)).astype(np.float32)
    q, scales, _ = quantize_blocks(w, bits)
    scales = scales.astype(NP.get(dtype, np.float32)).astype(np.float32)  # the kernel reads scales in the dtype
    top = 2 ** (bits - 1)
    unpacked = q if bits == 8 else np.stack([q & 15, q >> 4], -1).reshape(n, k // 32, 32)
    dequant = ((unpacked.astype(np.float32) - top) * scales[..., None]).reshape(n, k).T
    x = rng.standard_normal((batch, seq, k)).astype(np.float32)
    c1, c2 = coefficients(n, g, rng, rows)
    ids = rng.integers(0, 3, batch).astype(np.int64) if rows else None
    op = road_op.NBITS_ROWS_OP_TYPE if rows else road_op.NBITS_OP_TYPE
    model = fused_model(op, {"B": q, "scales": scales, "c1": c1, "c2": c2}, g, dtype, rows, k, n,
                        {"K": k, "N": n, "bits": bits, "block_size": 32})
    s = cuda_session(model, profile=str(tmp_path / "nb"))
    feeds = {"x": x.astype(NP.get(dtype, np.float32))} | ({"adapter_ids": ids} if rows else {})
    check(s, feeds, reference(x, dequant, c1, c2, g, dtype, ids), dtype, op)
    assert providers_ran(s)[op] == "CUDAExecutionProvider"


def test_nbits_rotate_equals_onnxruntime_matmulnbits_then_rotation():
    """The fused kernel against onnxruntime-gpu's own MatMulNBits followed by the road rotation (fp16)."""
    rng = np.random.default_rng(11)
    k, n, g = 2048, 512, 64
    q, scales, _ = quantize_blocks(rng.standard_normal((k, n)).astype(np.float32), 4)
    c1, c2 = testutil.coefficients("road_4", n, g, rng)
    dtype = TensorProto.FLOAT16
    fused = fused_model(road_op.NBITS_OP_TYPE, {"B": q, "scales": scales, "c1": c1, "c2": c2}, g, dtype, False, k, n,
                        {"K": k, "N": n, "bits": 4, "block_size": 32})
    nodes = [helper.make_node("Cast", ["x"], ["xr"], to=dtype),
             helper.make_node("MatMulNBits", ["xr", "B", "scales"], ["h"], domain="com.microsoft", K=k, N=n, bits=4,
                              block_size=32),
             helper.make_node(road_op.OP_TYPE, ["h", "c1", "c2"], ["y"], domain=road_op.DOMAIN, group_size=g)]
    inits = [numpy_helper.from_array(q, "B"), numpy_helper.from_array(scales.astype(np.float16), "scales"),
             numpy_helper.from_array(c1.astype(np.float16), "c1"), numpy_helper.from_array(c2.astype(np.float16), "c2")]
    graph = helper.make_graph(nodes, "ort", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", "s", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["b", "s", n])], inits)
    unfused = helper.make_model(graph, ir_version=11, opset_imports=[
        helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1),
        helper.make_opsetid(road_op.DOMAIN, road_op.VERSION)]).SerializeToString()
    for batch in (1, 8):
        x = rng.standard_normal((batch, 1, k)).astype(np.float16)
        ours = cuda_session(fused).run(None, {"x": x})[0].astype(np.float32)
        theirs = cuda_session(unfused).run(None, {"x": x})[0].astype(np.float32)
        assert np.abs(ours - theirs).max() <= 4e-3 * np.abs(theirs).max()


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("form", ["tile", "mma"])
@pytest.mark.parametrize("rows", [1, 8])
def test_linear_kernel_is_captured_by_cuda_graphs(monkeypatch, rows, dtype, form):
    """onnxruntime's enable_cuda_graph captures the one-launch kernel and each replay computes the new input (the
    tensor-core form takes fp16; fp32 falls back to the block form)."""
    monkeypatch.setenv("ROAD_EXPORT_LINEAR", form)
    rng = np.random.default_rng(0)
    k, n, g = 256, 128, 64
    w = rng.standard_normal((k, n)).astype(np.float32)
    q, scales, dequant = quantize_blocks(w, 4)
    scales = scales.astype(NP[dtype]).astype(np.float32)
    dequant = ((np.stack([q & 15, q >> 4], -1).reshape(n, k // 32, 32).astype(np.float32) - 8)
               * scales[..., None]).reshape(n, k).T
    c1, c2 = testutil.coefficients("road_4", n, g, rng)
    model = fused_model(road_op.NBITS_OP_TYPE, {"B": q, "scales": scales, "c1": c1, "c2": c2}, g,
                        dtype, False, k, n, {"K": k, "N": n, "bits": 4, "block_size": 32})
    options = ort.SessionOptions()
    options.log_severity_level = 3
    assert native.register(options, True)
    s = ort.InferenceSession(model, options, providers=cuda_providers(cuda_graph=True))
    x = ort.OrtValue.ortvalue_from_numpy(np.zeros((rows, 1, k), NP[dtype]), "cuda", 0)
    y = ort.OrtValue.ortvalue_from_numpy(np.zeros((rows, 1, n), NP[dtype]), "cuda", 0)
    io = s.io_binding()
    io.bind_ortvalue_input("x", x)
    io.bind_ortvalue_output("y", y)
    for _ in range(4):  # plain runs, the capture, then replays
        new = rng.standard_normal((rows, 1, k)).astype(NP[dtype])
        x.update_inplace(new)
        s.run_with_iobinding(io)
        expected = reference(new, dequant, c1, c2, g, dtype)
        tolerance = 1e-4 if dtype == TensorProto.FLOAT else TOL[dtype]
        assert np.abs(y.numpy().astype(np.float64) - expected).max() <= tolerance * np.abs(expected).max()


@pytest.mark.parametrize("tiles_per_block", ["1", "2", "4"])
@pytest.mark.parametrize("bits", [0, 4])
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT16, TensorProto.BFLOAT16], ids=["fp16", "bf16"])
def test_mma_form_tiles_per_block(monkeypatch, tiles_per_block, bits, dtype):
    """The tensor-core form with 1, 2 and 4 tiles of 8 pairs a block (ROAD_EXPORT_MMA_TM): 6 tiles, so with 4 a block
    the last block holds 2; 11 rows (a chunk of 8 and one of 3) on 3 adapters' banks."""
    monkeypatch.setenv("ROAD_EXPORT_LINEAR", "mma")
    monkeypatch.setenv("ROAD_EXPORT_MMA_TM", tiles_per_block)
    rng = np.random.default_rng(int(tiles_per_block) + bits)
    batch, k, n, g = 11, 256, 96, 16
    w = rng.standard_normal((k, n)).astype(np.float32)
    c1, c2 = coefficients(n, g, rng, True)
    ids = rng.integers(0, 3, batch).astype(np.int64)
    if bits:
        q, scales, _ = quantize_blocks(w, 4)
        scales = scales.astype(NP.get(dtype, np.float32)).astype(np.float32)
        w = ((np.stack([q & 15, q >> 4], -1).reshape(n, k // 32, 32).astype(np.float32) - 8)
             * scales[..., None]).reshape(n, k).T
        op, weights = road_op.NBITS_ROWS_OP_TYPE, {"B": q, "scales": scales}
        attributes = {"K": k, "N": n, "bits": 4, "block_size": 32}
    else:
        op, weights, attributes = road_op.LINEAR_ROWS_OP_TYPE, {"w": np.ascontiguousarray(w.T)}, None
    model = fused_model(op, {**weights, "c1": c1, "c2": c2}, g, dtype, True, k, n, attributes)
    x = rng.standard_normal((batch, 1, k)).astype(np.float32)
    feeds = {"x": x.astype(NP.get(dtype, np.float32)), "adapter_ids": ids}
    check(cuda_session(model), feeds, reference(x, w, c1, c2, g, dtype, ids), dtype, op)


def test_planted_wrong_group_size_is_caught():
    """A check that can fail: the same kernel run with another group size than the coefficients were made for
    disagrees with the reference, so the comparisons above would see a pairing bug."""
    rng = np.random.default_rng(3)
    k, n = 128, 128
    w = rng.standard_normal((k, n)).astype(np.float32)
    c1, c2 = testutil.coefficients("road_4", n, 64, rng)
    model = fused_model(road_op.LINEAR_OP_TYPE, {"w": np.ascontiguousarray(w.T), "c1": c1, "c2": c2}, 32,
                        TensorProto.FLOAT, False, k, n)
    x = rng.standard_normal((1, 1, k)).astype(np.float32)
    got = cuda_session(model).run(None, {"x": x})[0]
    expected = reference(x, w, c1, c2, 64, TensorProto.FLOAT)
    assert np.abs(got - expected).max() > 1e-2 * np.abs(expected).max()
