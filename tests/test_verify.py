"""The parity harness: it passes on a faithful file and fails, for real, on a wrong one."""

import numpy as np
import pytest
import torch
from conftest import tiny

import road_export as rx
from road_export.app.testing import assert_onnx_parity
from road_export.app.verify import compare, verify


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
    assert report.passed and len(report.rows) == 10  # 4 shapes, the vocabulary sweep, the long sequence, the
    # 4 shapes again with the sidecar m.default.onnx_adapter active
    assert [r.shape for r in report.rows][0] == [1, 256]  # padded positions left out, batch*seq kept
    assert all(r.top1 == 1.0 and r.cosine > 0.999999 for r in report.rows)
    assert '"passed": true' in report.to_json() and '"kernels": "native"' in report.to_json()
    assert "parity PASSED: 10/10" in report.table() and "road ops: native" in report.table()
    assert report.ids_covered == "256/256" and report.longest_sequence == 128  # tiny-qwen2: vocab 256, 128 positions
    assert "ids covered: 256/256, longest sequence: 128" in report.table()
    bodies = verify(path, model, native=False)
    assert bodies.passed and bodies.kernels == "bodies"


def _damage(path, out, name_part: str, rows) -> None:
    """Copy the file with rows `rows` of the table that a Gather reads (its name contains `name_part`) changed: the
    Gather reads a damaged copy, so a tied lm_head stays intact (embedding rows only, as a corrupted file's)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if name_part in i.name and len(i.dims) == 2)
    array = numpy_helper.to_array(init).copy()
    array[rows] += np.random.default_rng(0).standard_normal(array[rows].shape).astype(array.dtype)  # not uniform:
    # a layer norm would cancel a constant shift
    model.graph.initializer.append(numpy_helper.from_array(array, init.name + ".damaged"))
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == init.name]
    assert gathers
    for node in gathers:
        node.input[0] = init.name + ".damaged"
    onnx.save(model, str(out))


@pytest.mark.parametrize("rows", [[0], [1, 2], [255]])
def test_damaged_embedding_rows_of_any_id_fail(exported, tmp_path, rows):
    """Special ids (0-2) and the last id: the vocabulary sweep sees each."""
    model, path = exported
    bad = tmp_path / "bad.onnx"
    _damage(path, bad, "lm_head", rows)
    report = verify(bad, model)
    assert not report.passed and "vocabulary sweep: 256 ids, 64 per row" in [r.case for r in report.rows if not r.ok]
    if rows != [255]:  # ids 0-2 are never in the random shapes: without the sweep the damage is not seen
        assert verify(bad, model, coverage=False).passed


@pytest.fixture(scope="module")
def gpt2_file(tmp_path_factory):
    torch.manual_seed(0)
    model = rx.get_road_model(tiny("tiny-gpt2"), rx.RoadConfig(variant="road_1", group_size=8, init_weights=False,
                                                               target_modules=["c_attn"]))
    path = tmp_path_factory.mktemp("gpt2") / "g.onnx"
    rx.export(model, path)
    return model, path


def test_damaged_late_position_rows_fail(gpt2_file, tmp_path):
    """GPT-2's wpe rows 40-127: only the long-sequence check reaches them."""
    model, path = gpt2_file
    bad = tmp_path / "bad.onnx"
    _damage(path, bad, "wpe", list(range(40, 128)))
    report = verify(bad, model)
    assert not report.passed and report.longest_sequence == 128
    assert "long sequence: seq 128" in [r.case for r in report.rows if not r.ok]
    assert verify(bad, model, coverage=False).passed  # without the long check the damage is not seen


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


def test_sidecar_adapter_file_is_verified(exported, tmp_path):
    """The swappable export's MODEL.default.onnx_adapter runs against the same reference; a damaged one fails."""
    import shutil

    import onnxruntime as ort

    from road_export.graph import swap

    model, path = exported
    sidecar = path.with_name(f"{path.stem}.default.onnx_adapter")
    assert sidecar.is_file()
    report = verify(path, model, coverage=False)
    assert report.passed and sum(r.case.startswith(sidecar.name) for r in report.rows) == 3
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    params = {k: v.numpy() for k, v in ort.AdapterFormat.read_adapter(str(sidecar)).get_parameters().items()}
    first = sorted(params)[0]
    params[first] = params[first] + np.random.default_rng(0).standard_normal(params[first].shape).astype(
        params[first].dtype) * 0.1
    swap.write_adapter_file(tmp_path / sidecar.name, params)
    report = verify(copy, model, coverage=False)
    failed = [r.case for r in report.rows if not r.ok]
    assert not report.passed and failed and all(c.startswith(sidecar.name) for c in failed)
    (tmp_path / sidecar.name).write_bytes(b"truncated")
    report = verify(copy, model, coverage=False)
    assert [r.case for r in report.rows if not r.ok][0].startswith(f"{sidecar.name}: unreadable")


def test_equal_weights_are_lent_and_a_damaged_one_is_not(tmp_path, monkeypatch):
    """verify lends onnxruntime the reference's memory for a weight the file holds byte for byte (the embedding);
    planted fault: one damaged byte in the file's embedding (in `.data`) and it is not lent, onnxruntime runs the
    file's own bytes and the vocabulary sweep fails."""
    import onnx
    import onnxruntime as ort

    from road_export.app.parity import memory

    monkeypatch.setattr(memory, "LEND_MIN_BYTES", 4096)  # tiny-llama's embedding is 64 KiB
    torch.manual_seed(0)
    model = rx.get_road_model(tiny("tiny-llama"), rx.RoadConfig(variant="road_2", group_size=8, init_weights=False))
    path = rx.export(model, tmp_path / "m.onnx", mode="merge", external_data=True).path
    embedding = model.model.embed_tokens.weight.detach().numpy()
    lent = memory.lend_equal_weights(path, model, ort.SessionOptions())
    assert any(v.shape() == list(embedding.shape) for v in lent)
    assert verify(path, model).passed

    proto = onnx.load(str(path), load_external_data=False)
    init = next(i for i in proto.graph.initializer if i.name.endswith("embed_tokens.weight"))
    offset = int(next(e.value for e in init.external_data if e.key == "offset"))
    data = path.with_name(path.name + ".data")
    raw = bytearray(data.read_bytes())
    row = 200  # an id only the vocabulary sweep feeds
    raw[offset + (row * embedding.shape[1] + 5) * 4 + 3] ^= 0x40  # the exponent byte of one float
    data.write_bytes(bytes(raw))
    assert not any(v.shape() == list(embedding.shape) for v in memory.lend_equal_weights(
        path, model, ort.SessionOptions()))
    report = verify(path, model)
    assert not report.passed
    assert [r.case for r in report.rows if not r.ok] == ["vocabulary sweep: 256 ids, 64 per row"]


def test_the_file_runs_the_fixed_cases_before_the_reference(exported, monkeypatch):
    """The three shapes and the long sequence run on onnxruntime before the reference runs at all (its weights,
    mapped from the checkpoint, are paged in only after the file's activations are gone); the rows keep their
    order."""
    import onnxruntime as ort

    model, path = exported
    events = []
    run = ort.InferenceSession.run
    monkeypatch.setattr(ort.InferenceSession, "run", lambda self, *a, **k: events.append("file") or run(self, *a, **k))
    hook = model.register_forward_pre_hook(lambda *_: events.append("torch"))
    try:
        report = verify(path, model)
    finally:
        hook.remove()
    assert report.passed
    assert events[:5] == ["file"] * 4 + ["torch"]
    cases = [r.case for r in report.rows]
    assert cases[:5] == ["batch 1, seq 1", "batch 3, seq 7, pad 2", "batch 2, seq 33, pad 5",
                         "vocabulary sweep: 256 ids, 64 per row", "long sequence: seq 128"]


def test_the_tolerance_follows_the_graphs_dtype_not_the_metadata(exported, tmp_path):
    """Planted fault: a float32 file whose metadata claims float16 and whose output head is off by a small factor
    (errors above float32's 1e-4, below float16's 2e-2). verify reads the dtype off the graph
    (`inspection.read_facts`), so the file is held to 1e-4 and fails; taking the metadata's word would pass it."""
    import onnx
    from onnx import numpy_helper

    model, path = exported
    proto = onnx.load(str(path))
    for key in ("torch_dtype", "road_export.dtype"):
        proto.metadata_props.add(key=key, value="float16")
    head = next(i for i in proto.graph.initializer if i.name.endswith("lm_head.weight"))
    head.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(head) * np.float32(1.002), head.name))
    lying = tmp_path / "lying.onnx"
    onnx.save(proto, str(lying))
    report = verify(lying, model, coverage=False)
    assert report.dtype == "float32" and report.atol == 1e-4
    worst = max(r.max_abs for r in report.rows)
    assert not report.passed and 1e-4 < worst < 2e-2, worst
