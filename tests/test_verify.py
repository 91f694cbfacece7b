"""The parity harness: it passes on a faithful file and fails, for real, on a wrong one."""

import numpy as np
import pytest
import torch
from conftest import tiny

import road_export as rx
from road_export.testing import assert_onnx_parity
from road_export.verify import compare, verify


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = rx.get_road_model(tiny("tiny-qwen2"), rx.RoadConfig(variant="road_2", group_size=8, init_weights=False))
    path = tmp_path_factory.mktemp("verify") / "m.onnx"
    rx.export(model, path, mode="rotate")
    return model, path


def test_report_shapes_and_json(exported):
    model, path = exported
    report = verify(path, model, shapes=((1, 1, 0), (3, 7, 2), (2, 33, 5), (4, 2, 1)))
    assert report.passed and len(report.rows) == 4
    assert [r.shape for r in report.rows][0] == [1, 256]  # padded positions left out, batch*seq kept
    assert all(r.top1 == 1.0 and r.cosine > 0.999999 for r in report.rows)
    assert '"passed": true' in report.to_json() and '"kernels": "native"' in report.to_json()
    assert "parity PASSED: 4/4" in report.table() and "road ops: native" in report.table()
    bodies = verify(path, model, native=False)
    assert bodies.passed and bodies.kernels == "bodies"


def test_a_different_adapter_fails(exported):
    model, path = exported
    torch.manual_seed(5)
    other = rx.get_road_model(tiny("tiny-qwen2"), rx.RoadConfig(variant="road_2", group_size=8, init_weights=False))
    with pytest.raises(AssertionError, match="parity FAILED") as info:
        assert_onnx_parity(path, other)
    assert "FAIL" in str(info.value) and "max abs" in str(info.value)


def test_compare_reports_top1_and_judges_max_abs():
    expected = np.array([[[0.0, 1.0, 0.99995]]], dtype=np.float32)  # top-2 margin 5e-5 < 2 * atol
    got = np.array([[[0.0, 0.99995, 1.0]]], dtype=np.float32)
    row = compare("logits", "c", got, expected, None, atol=1e-4, logits=True)
    assert row.top1 == 0.0 and row.ok
    row = compare("logits", "c", got + 1e-3, expected, None, atol=1e-4, logits=True)
    assert not row.ok and row.max_abs > 1e-4


def test_shape_mismatch_fails():
    row = compare("x", "c", np.zeros((1, 2, 3), np.float32), np.zeros((1, 2, 4), np.float32), None, 1.0, False)
    assert not row.ok


def test_nan_fails():
    got = np.full((1, 2, 3), np.nan, dtype=np.float32)
    assert not compare("x", "c", got, np.zeros((1, 2, 3), np.float32), None, atol=1.0, logits=False).ok
