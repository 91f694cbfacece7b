"""road_export.graph.files: one atomic writer, used by every writer; a failure at any point leaves nothing behind."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from passes import testutil

from road_export.graph import files, swap
from road_export.core.errors import RoadError
from road_export.passes.pipeline import optimize_file

ROOT = Path(__file__).resolve().parent.parent


def listing(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt, SystemExit])
def test_a_failure_mid_write_leaves_the_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(error):
        with files.atomic_write(target) as tmp:
            tmp.write_bytes(b"half of the new")
            assert target.read_bytes() == b"old"  # not visible before the block ends
            raise error()
    assert target.read_bytes() == b"old" and listing(tmp_path) == {"out.bin"}


def test_a_failure_mid_write_of_a_new_file_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_write(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert listing(tmp_path) == set()


def test_success_replaces_files_and_directories(tmp_path):
    with files.atomic_write(tmp_path / "f") as tmp:
        tmp.write_text("one")
    with files.atomic_write(tmp_path / "f") as tmp:
        tmp.write_text("two")
    assert (tmp_path / "f").read_text() == "two"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "stale").write_text("x")
    with pytest.raises(ValueError):
        with files.atomic_write(tmp_path / "d") as tmp:
            tmp.mkdir()
            (tmp / "new").write_text("y")
            raise ValueError("planted")
    assert listing(tmp_path / "d") == {"stale"}  # the old directory survives a failed replacement
    with files.atomic_write(tmp_path / "d") as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("y")
    assert listing(tmp_path / "d") == {"new"} and listing(tmp_path) == {"f", "d"}


def test_companions_and_empty_writes(tmp_path):
    with files.atomic_write(tmp_path / "m.onnx", companions=["m.onnx.data"]) as tmp:
        tmp.write_text("model")
        (tmp.parent / "m.onnx.data").write_text("weights")
    assert listing(tmp_path) == {"m.onnx", "m.onnx.data"}
    with pytest.raises(RoadError, match="nothing was written"):
        with files.atomic_write(tmp_path / "empty"):
            pass
    assert "empty" not in listing(tmp_path)


def test_os_errors_become_one_line(tmp_path):
    with pytest.raises(RoadError, match="cannot write"):
        with files.atomic_write(tmp_path / "missing" / "x"):
            pass
    with pytest.raises(RoadError, match="must end in .onnx"):
        files.check_output(tmp_path / "x.txt")
    with pytest.raises(RoadError, match="is a directory"):
        files.check_writable(tmp_path)
    with pytest.raises(RoadError, match="no such ONNX file"):
        files.load_model(tmp_path / "absent.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07junk")
    with pytest.raises(RoadError, match="not a readable ONNX model"):
        files.load_model(tmp_path / "junk.onnx")


def test_save_model_external_data_round_trip_and_stale_data(tmp_path):
    model = testutil.road_model(8, 16, 8, "road_4")
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    expected = testutil.run(model, x)
    path = tmp_path / "m.onnx"
    assert files.save_model(model, path, external_data=True) == tmp_path / "m.onnx.data"
    assert listing(tmp_path) == {"m.onnx", "m.onnx.data"}
    loaded = files.load_model(path)
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in loaded.graph.initializers.values())  # lazy
    assert files.needs_external_data(loaded)
    import onnxruntime as ort

    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    assert files.save_model(testutil.road_model(8, 16, 8, "road_4"), path) is None
    assert listing(tmp_path) == {"m.onnx"}  # the stale data file went with the inline save


def test_optimize_interrupted_while_saving_leaves_nothing(tmp_path, monkeypatch):
    source = tmp_path / "in.onnx"
    files.save_model(testutil.decomposed_model(8, 16, 8, "road_2"), source)
    real_save = ir.save

    def half_then_interrupt(model, path, **kwargs):
        real_save(model, path, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(ir, "save", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        optimize_file(source, tmp_path / "out.onnx")
    assert listing(tmp_path) == {"in.onnx"}
    monkeypatch.setattr(ir, "save", real_save)
    report = optimize_file(source, tmp_path / "out.onnx")
    assert report.step("fuse").changed == 1 and onnx.load(tmp_path / "out.onnx").graph.node


def test_swap_file_interrupted_leaves_nothing(tmp_path, monkeypatch):
    import onnxruntime as ort

    def broken_export(self, path):
        Path(path).write_bytes(b"partial")
        raise SystemExit(143)  # what a SIGTERM handler raising SystemExit looks like

    monkeypatch.setattr(ort.AdapterFormat, "export_adapter", broken_export)
    with pytest.raises(SystemExit):
        swap.write_adapter_file(tmp_path / "m.a.onnx_adapter", {"c1": np.ones(4, np.float32)})
    assert listing(tmp_path) == set()


WRITE_PRIMITIVES = {("os", "replace"), ("os", "rename"), ("shutil", "move"), ("tempfile", "mkstemp"),
                    ("tempfile", "mkdtemp"), ("tempfile", "NamedTemporaryFile")}


def renames_outside_files(source: str) -> list[str]:
    """Calls that stage or rename files by hand (`os.replace`, `tempfile.mkdtemp`, ...)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in WRITE_PRIMITIVES:
                found.append(f"{node.value.id}.{node.attr}")
    return found


def test_every_writer_goes_through_atomic_write():
    offenders = {}
    for path in (ROOT / "road_export").rglob("*.py"):
        if path.name == "files.py" and path.parent.name == "graph":
            continue
        calls = renames_outside_files(path.read_text())
        if calls:
            offenders[str(path.relative_to(ROOT))] = calls
    assert not offenders, f"write through road_export.graph.files.atomic_write instead: {offenders}"


def test_the_writer_check_catches_a_hand_written_rename():
    assert renames_outside_files("import os\nos.replace(a, b)\n") == ["os.replace"]
    assert renames_outside_files("import tempfile\nt = tempfile.mkdtemp()\n") == ["tempfile.mkdtemp"]
