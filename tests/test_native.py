"""The native road kernels: same numbers as the math in every dtype and broadcast, picked over the function
bodies, one kernel per rotation, clear errors, and a clean fallback where they cannot be built."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from road_export.graph import native
from road_export.core import rotation
from road_export.core.errors import RoadError
from road_export.graph import ops as road_op
from passes import testutil

NP = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64, TensorProto.FLOAT16: np.float16}
ATOL = {TensorProto.FLOAT: 1e-5, TensorProto.DOUBLE: 1e-12, TensorProto.FLOAT16: 1e-2, TensorProto.BFLOAT16: 6e-2}


def rotation_model(c1: np.ndarray, c2: np.ndarray, g: int, *, x_rank: int, dtype: int = TensorProto.FLOAT,
                   op_type: str = road_op.OP_TYPE, bodies: bool = True, opset: int = 20,
                   any_width: bool = False) -> bytes:
    """y = road(x, c1, c2) with c1/c2 as initializers; `bodies=False` leaves the function definitions out, so only
    a registered kernel can run it. bfloat16 (which numpy lacks) is cast to and from float32 around the node."""
    d = c1.shape[-1]
    io_type = TensorProto.FLOAT if dtype == TensorProto.BFLOAT16 else dtype
    dims = [f"a{i}" for i in range(x_rank - 1)] + ["d" if any_width else d]
    nodes = [helper.make_node(op_type, ["xr", "c1r", "c2r"], ["yr"], domain=road_op.DOMAIN, group_size=g)]
    inits = [numpy_helper.from_array(c.astype(NP[io_type]), n) for c, n in ((c1, "c1"), (c2, "c2"))]
    if dtype == TensorProto.BFLOAT16:
        nodes = [helper.make_node("Cast", [n], [n + "r"], to=dtype) for n in ("x", "c1", "c2")] + nodes
        nodes.append(helper.make_node("Cast", ["yr"], ["y"], to=io_type))
    else:
        nodes = [helper.make_node("Identity", [n], [n + "r"]) for n in ("x", "c1", "c2")] + nodes
        nodes.append(helper.make_node("Identity", ["yr"], ["y"]))
    graph = helper.make_graph(nodes, "rotation", [helper.make_tensor_value_info("x", io_type, dims)],
                              [helper.make_tensor_value_info("y", io_type, dims)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid(road_op.DOMAIN, road_op.VERSION)],
                              ir_version=11)  # what onnxruntime >= 1.20 reads, whatever onnx writes by default
    model = ir.serde.deserialize_model(proto)
    if bodies:
        road_op.attach_functions(model)
    return ir.serde.serialize_model(model).SerializeToString()


def session(model: bytes, *, native_kernels: bool, optimized: str | None = None, profile: str | None = None):
    """`profile`: a path prefix for onnxruntime's profile of the run (which kernels ran)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 2
    if optimized:
        options.optimized_model_filepath = optimized
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    assert native.register(options, native_kernels) is native_kernels
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


@settings(max_examples=40, deadline=None)
@given(
    groups=st.integers(1, 5),
    g=st.sampled_from([2, 4, 8, 16, 64]),
    variant=st.sampled_from(["road_1", "road_2", "road_4"]),
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=3),
    per_row=st.booleans(),
    dtype=st.sampled_from([TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_the_math_and_the_bodies(groups, g, variant, lead, per_row, dtype, seed):
    rng = np.random.default_rng(seed)
    d = groups * g
    c1, c2 = testutil.coefficients(variant, d, g, rng)
    if per_row and lead:  # per-row coefficients, as a mixed-adapter graph gathers them: [batch, 1, ..., d]
        c1 = c1 * rng.normal(1, 0.3, (lead[0], *[1] * (len(lead) - 1), 1)).astype(np.float32)
        c2 = c2 * rng.normal(1, 0.3, (lead[0], *[1] * (len(lead) - 1), 1)).astype(np.float32)
    x = rng.standard_normal((*lead, d)).astype(np.float32)
    io = NP.get(dtype, np.float32)
    rounded = [a.astype(io).astype(np.float64) for a in (x, c1, c2)]
    if dtype == TensorProto.BFLOAT16:  # the graph rounds its inputs to bfloat16
        rounded = [(a.astype(np.float32).view(np.uint32) + 0x8000 & 0xFFFF0000).view(np.float32).astype(np.float64)
                   for a in (x, c1, c2)]
    expected = rotation.rotate(rounded[0], rounded[1], rounded[2], g)
    scale = max(1.0, float(np.abs(expected).max()))
    native_only = session(rotation_model(c1, c2, g, x_rank=x.ndim, dtype=dtype, bodies=False), native_kernels=True)
    got = native_only.run(None, {"x": x.astype(io)})[0].astype(np.float64)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= ATOL[dtype] * scale
    if dtype in (TensorProto.FLOAT, TensorProto.DOUBLE):  # the bodies give the same numbers
        bodies = session(rotation_model(c1, c2, g, x_rank=x.ndim, dtype=dtype), native_kernels=False)
        assert np.abs(bodies.run(None, {"x": x.astype(io)})[0] - got).max() <= ATOL[dtype] * scale


@pytest.mark.parametrize("op_type,variant", [(road_op.OP_TYPE, "road_4"), (road_op.TIED_OP_TYPE, "road_1")])
@pytest.mark.parametrize("opset", [20, 23])
def test_kernel_is_picked_over_the_function_body(tmp_path, op_type, variant, opset):
    rng = np.random.default_rng(0)
    c1, c2 = testutil.coefficients(variant, 128, 64, rng)
    model = rotation_model(c1, c2, 64, x_rank=3, op_type=op_type, opset=opset)
    optimized = str(tmp_path / "optimized.onnx")
    s = session(model, native_kernels=True, optimized=optimized, profile=str(tmp_path / "native"))
    x = rng.standard_normal((2, 3, 128)).astype(np.float32)
    assert np.abs(s.run(None, {"x": x})[0] - rotation.rotate(x, c1, c2, 64)).max() < 1e-5
    ran = {e["args"]["op_name"] for e in json.load(open(s.end_profiling())) if e.get("cat") == "Node"}
    assert ran == {op_type}  # one kernel: the Identity nodes are optimised away, nothing of the body runs
    kept = [n.op_type for n in ir.load(optimized).graph]
    assert kept == [op_type]
    bodies = session(model, native_kernels=False, profile=str(tmp_path / "bodies"))
    bodies.run(None, {"x": x})
    body_ops = {e["args"]["op_name"] for e in json.load(open(bodies.end_profiling())) if e.get("cat") == "Node"}
    assert op_type not in body_ops and len(body_ops) > 1


def test_bad_shapes_are_named():
    rng = np.random.default_rng(0)
    c1, c2 = testutil.coefficients("road_2", 16, 8, rng)
    s = session(rotation_model(c1, c2, 8, x_rank=2, bodies=False, any_width=True), native_kernels=True)
    with pytest.raises(Exception, match=r"road\.Rotate: coefficients of shape \[16\] do not broadcast against X "
                                         r"\[2, 24\]"):
        s.run(None, {"x": np.zeros((2, 24), np.float32)})
    per_row = rotation_model(np.ones((3, 1, 16), np.float32), np.zeros((3, 1, 16), np.float32), 8, x_rank=3,
                             bodies=False)
    with pytest.raises(Exception, match=r"\[3, 1, 16\] do not broadcast against X \[2, 5, 16\]"):
        session(per_row, native_kernels=True).run(None, {"x": np.zeros((2, 5, 16), np.float32)})
    odd = rotation_model(np.ones(9, np.float32), np.zeros(9, np.float32), 3, x_rank=2, bodies=False)
    with pytest.raises(Exception, match="group_size must be even and >= 2, got 3"):
        session(odd, native_kernels=True).run(None, {"x": np.zeros((1, 9), np.float32)})
    short = rotation_model(np.ones(12, np.float32), np.zeros(12, np.float32), 8, x_rank=2, bodies=False,
                           any_width=True)
    with pytest.raises(Exception, match="last axis 12 of X \\[1, 12\\] is not a multiple of group_size 8"):
        session(short, native_kernels=True).run(None, {"x": np.zeros((1, 12), np.float32)})


def test_empty_input():
    c1, c2 = testutil.coefficients("road_4", 64, 64, np.random.default_rng(0))
    s = session(rotation_model(c1, c2, 64, x_rank=3, bodies=False), native_kernels=True)
    assert s.run(None, {"x": np.zeros((2, 0, 64), np.float32)})[0].shape == (2, 0, 64)


def test_library_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ROAD_EXPORT_CACHE", str(tmp_path))
    native.library_path.cache_clear()
    try:
        first = native.library_path()
        stamp = first.stat().st_mtime_ns
        native.library_path.cache_clear()
        assert native.library_path() == first and first.stat().st_mtime_ns == stamp  # not rebuilt
        assert first.parent == tmp_path and [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp left
    finally:
        native.library_path.cache_clear()


@pytest.fixture
def no_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("ROAD_EXPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    native.library_path.cache_clear()
    yield
    native.library_path.cache_clear()


def test_without_a_compiler_the_bodies_run(no_compiler, tmp_path, caplog):
    with pytest.raises(RoadError, match="is not an executable compiler; point CXX at a C\\+\\+17 compiler"):
        native.library_path()
    options = ort.SessionOptions()
    assert native.register(options, None) is False
    assert "running the standard-op bodies" in caplog.text
    with pytest.raises(RoadError, match="not an executable compiler"):
        native.register(options, True)
    assert native.register(options, False) is False


def test_a_failing_build_is_one_line(tmp_path, monkeypatch):
    broken = tmp_path / "broken-cxx"
    broken.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo broken 1.0 && exit 0\n"
                      "echo 'road_ort.cc:1: error: this compiler is broken' >&2; exit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("ROAD_EXPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(broken))
    native.library_path.cache_clear()
    try:
        with pytest.raises(RoadError, match="building the road kernels with .*broken-cxx failed: road_ort.cc:1: "
                                            "error: this compiler is broken"):
            native.library_path()
        assert list((tmp_path / "cache").iterdir()) == []  # no half-written library
    finally:
        native.library_path.cache_clear()


def test_kernels_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "road_export.app.cli", "kernels"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(native.library_path())
    env = {"PATH": "/usr/bin:/bin", "CXX": "no-such-compiler", "ROAD_EXPORT_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "road_export.app.cli", "kernels"], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "road-export: error: CXX='no-such-compiler' is not an executable compiler; point CXX at a C++17 compiler"]


def test_road_files_are_told_apart_without_parsing_the_graph(tmp_path):
    c1, c2 = testutil.coefficients("road_4", 64, 64, np.random.default_rng(0))
    (tmp_path / "road.onnx").write_bytes(rotation_model(c1, c2, 64, x_rank=2))
    plain = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                                [helper.make_tensor_value_info("x", 1, [2])],
                                                [helper.make_tensor_value_info("y", 1, [2])]))
    (tmp_path / "plain.onnx").write_bytes(plain.SerializeToString())
    (tmp_path / "text.onnx").write_text("not a model at all\n")
    assert native.opset_domains(tmp_path / "road.onnx") == {"", "road"}
    assert native.uses_road(tmp_path / "road.onnx")
    assert not native.uses_road(tmp_path / "plain.onnx")
    assert not native.uses_road(tmp_path / "text.onnx") and not native.uses_road(tmp_path / "missing.onnx")


def test_road_session_uses_the_kernels_on_cpu_only(tmp_path):
    from road_export.runtime.session import RoadSession

    c1, c2 = testutil.coefficients("road_4", 64, 64, np.random.default_rng(0))
    path = tmp_path / "road.onnx"
    path.write_bytes(rotation_model(c1, c2, 64, x_rank=2))
    assert RoadSession(path).native is True
    assert RoadSession(path, native=False).native is False
    # another execution provider first: the CPU kernels would pull the rotations off the device, so the bodies run
    with warnings.catch_warnings():  # a CPU-only onnxruntime warns that it has no CUDA, and runs on the CPU
        warnings.simplefilter("ignore")
        on_device = RoadSession(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert on_device.native is False


def test_cuda_kernels_say_why_they_are_absent(tmp_path, monkeypatch):
    """Where the CUDA kernels cannot run, the reason is named, and a CUDA session that insists on them is refused
    with it (a CPU-only machine: CI; the GPU tests are tests/test_gpu.py)."""
    from road_export.runtime.session import RoadSession

    monkeypatch.setenv("ROAD_EXPORT_CUDA", "0")
    native.cuda_kernels.cache_clear()
    try:
        assert native.cuda_kernels() == "ROAD_EXPORT_CUDA=0"
        c1, c2 = testutil.coefficients("road_4", 64, 64, np.random.default_rng(0))
        path = tmp_path / "road.onnx"
        path.write_bytes(rotation_model(c1, c2, 64, x_rank=2))
        with pytest.raises(RoadError, match=r"the road CUDA kernels are unavailable here \(ROAD_EXPORT_CUDA=0\)"):
            RoadSession(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"], native=True)
    finally:
        native.cuda_kernels.cache_clear()

