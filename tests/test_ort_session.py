"""road_export.graph.ort_session.new_session: the one onnxruntime session set-up (threads, config entries, the road
kernel library, a rewrite hook, one-line refusals), and every InferenceSession of the package going through it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from road_export.core import rotation
from road_export.core.errors import RoadError
from road_export.graph.ort_session import new_session, road_kernels
from passes import testutil
from test_native import rotation_model

PACKAGE = Path(__file__).resolve().parent.parent / "road_export"


@pytest.fixture
def road_file(tmp_path):
    c1, c2 = testutil.coefficients("road_4", 64, 64, np.random.default_rng(0))
    path = tmp_path / "road.onnx"
    path.write_bytes(rotation_model(c1, c2, 64, x_rank=2))
    return path, c1, c2


def test_threads_config_and_kernels(road_file):
    """The options reach onnxruntime; the kernel library is registered on a road file unless native=False, and
    either way the rotation is the maths'."""
    path, c1, c2 = road_file
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    expected = rotation.rotate(x, c1, c2, 64)
    for native in (None, False):
        opened = new_session(path, threads=1, native=native, session_config={"session.intra_op.allow_spinning": "0"})
        assert opened.road and opened.native is (native is None)
        got = opened.session.run(None, {"x": x})[0]
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert opened.session.get_session_options().intra_op_num_threads == 1
        assert opened.options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_rewrite_hook_and_serialized_source(road_file):
    """`rewrite` sees the registration and may hand back another model; a serialized model opens as it is."""
    path, c1, c2 = road_file
    seen = []
    plain = helper.make_model(helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "g",
                                                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()

    def rewrite(options, native):
        seen.append(native)
        return plain, 7

    opened = new_session(path, native=None, rewrite=rewrite)
    assert seen == [True] and opened.rewritten == 7
    np.testing.assert_array_equal(opened.session.run(None, {"x": np.array([1, -2], np.float32)})[0], [-1, 2])
    from_bytes = new_session(plain)
    assert not from_bytes.road and not from_bytes.native


def test_a_refused_model_is_one_line(tmp_path):
    """A planted broken file: one RoadError line naming the file, or the caller's wording."""
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model\n")
    with pytest.raises(RoadError, match=r"bad\.onnx: onnxruntime cannot load it \(") as caught:
        new_session(bad)
    assert "\n" not in str(caught.value)
    with pytest.raises(RoadError, match=r"^custom: \S"):
        new_session(bad, refusal=lambda line: f"custom: {line}")
    with pytest.raises(RoadError, match=r"the model: onnxruntime cannot load it"):
        new_session(b"\x00garbage")


def test_cuda_first_without_kernels_refuses_native_true(monkeypatch):
    """With CUDA first and no CUDA kernels (planted: ROAD_EXPORT_CUDA=0), native=True is refused with the reason,
    None falls back to the bodies, and another device first keeps the CPU kernels out."""
    from road_export.graph import native

    monkeypatch.setenv("ROAD_EXPORT_CUDA", "0")
    native.cuda_kernels.cache_clear()
    try:
        cuda = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        with pytest.raises(RoadError, match=r"CUDA kernels are unavailable here \(ROAD_EXPORT_CUDA=0\)"):
            road_kernels(cuda, True)
        assert road_kernels(cuda, None) is False
        assert road_kernels(["DmlExecutionProvider"], None) is False
        assert road_kernels([("CPUExecutionProvider", {})], None) is None
        assert road_kernels(cuda, False) is False
    finally:
        native.cuda_kernels.cache_clear()


def test_every_session_of_the_package_is_set_up_here():
    """No module but ort_session constructs an onnxruntime InferenceSession (the parity harness included)."""
    pattern = re.compile(r"\bInferenceSession\(")
    found = sorted(p.name for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text()))
    assert found == ["ort_session.py"], found
