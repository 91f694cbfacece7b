"""What a command writes without being asked by name (`.data`, `.onnx_adapter` swap files) and what it leaves
when it is interrupted: existing targets byte-identical, new ones removed, no hidden files left."""

import pytest
import peft
import torch
from conftest import tiny
from test_cli import assert_bad_input, leftovers, road_export

from road_export import cli, files
from road_export import verify as verify_module
from road_export.errors import RoadError


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """A saved tiny Llama base directory and a peft RoAd adapter for it."""
    root = tmp_path_factory.mktemp("targets")
    tiny("tiny-llama").save_pretrained(root / "base")
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny("tiny-llama"), peft.RoadConfig(variant="road_1", group_size=8,
                                                                     init_weights=False))
    model.save_pretrained(str(root / "road"))
    return root


def test_directory_at_the_swap_file_path_is_refused_up_front(llama_dirs, tmp_path):
    kept = tmp_path / "x.default.onnx_adapter"
    kept.mkdir()
    (kept / "important.txt").write_text("precious\n")
    proc = road_export("--base", llama_dirs / "base", "--adapter", llama_dirs / "road", "--mode", "rotate",
                       "--no-verify", tmp_path / "x.onnx")
    assert_bad_input(proc, says="x.default.onnx_adapter: is a directory", dirs=[tmp_path])
    assert (kept / "important.txt").read_text() == "precious\n"
    assert not (tmp_path / "x.onnx").exists()
    named = tmp_path / "y.mine.onnx_adapter"  # --adapter NAME=PATH names the swap file
    named.mkdir()
    (named / "f").write_text("x")
    proc = road_export("--base", llama_dirs / "base", "--adapter", f"mine={llama_dirs / 'road'}", "--mode",
                       "rotate", "--no-verify", tmp_path / "y.onnx")
    assert_bad_input(proc, says="y.mine.onnx_adapter: is a directory", dirs=[tmp_path])
    assert (named / "f").read_text() == "x"


def test_atomic_write_never_replaces_a_directory_by_a_file(tmp_path):
    target = tmp_path / "a.onnx_adapter"
    target.mkdir()
    (target / "important.txt").write_text("precious")
    with pytest.raises(RoadError, match="is a directory"):
        with files.atomic_write(target) as tmp:
            tmp.write_text("new")
    assert (target / "important.txt").read_text() == "precious"
    assert leftovers(tmp_path) == []


def _targets(tmp_path):
    return {name: tmp_path / name for name in ("x.onnx", "x.onnx.data", "x.default.onnx_adapter", "r.json")}


@pytest.mark.parametrize("signal", [KeyboardInterrupt, cli.Terminated])
def test_interrupted_verify_leaves_existing_targets_as_they_were(llama_dirs, tmp_path, monkeypatch, signal):
    old = {}
    for name, path in _targets(tmp_path).items():
        old[name] = f"old {name}\n".encode()
        path.write_bytes(old[name])
    (tmp_path / "x.other.onnx_adapter").write_bytes(b"another adapter's")
    ran = []

    def interrupted(path, *args, **kwargs):
        ran.append(path)
        assert b"old" not in path.read_bytes()[:3]  # the new model is in place when the parity check runs
        raise signal()

    monkeypatch.setattr(verify_module, "verify", interrupted)
    proc = road_export("--base", llama_dirs / "base", "--adapter", llama_dirs / "road", "--mode", "rotate",
                       "--external-data", "--report", tmp_path / "r.json", tmp_path / "x.onnx")
    assert ran and proc.returncode == (130 if signal is KeyboardInterrupt else 143), proc.stderr
    for name, path in _targets(tmp_path).items():
        assert path.read_bytes() == old[name], name
    assert (tmp_path / "x.other.onnx_adapter").read_bytes() == b"another adapter's"
    assert leftovers(tmp_path) == []


def test_interrupted_verify_removes_new_targets(llama_dirs, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt()

    monkeypatch.setattr(verify_module, "verify", interrupted)
    proc = road_export("--base", llama_dirs / "base", "--adapter", llama_dirs / "road", "--mode", "rotate",
                       "--external-data", tmp_path / "x.onnx")
    assert proc.returncode == 130, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_kept_on_failure_restores_files_and_empty_directories(tmp_path):
    old, new_dir, gone = tmp_path / "old.bin", tmp_path / "empty", tmp_path / "new.bin"
    old.write_bytes(b"old")
    new_dir.mkdir()
    with pytest.raises(KeyboardInterrupt):
        with files.kept_on_failure([old, new_dir, gone], patterns=[(tmp_path, "*.onnx_adapter")]):
            with files.atomic_write(old) as tmp:
                tmp.write_bytes(b"new")
            (new_dir / "f").write_text("x")
            gone.write_bytes(b"new")
            (tmp_path / "m.a.onnx_adapter").write_bytes(b"new")
            raise KeyboardInterrupt()
    assert old.read_bytes() == b"old" and new_dir.is_dir() and not any(new_dir.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "old.bin"]
    with files.kept_on_failure([old]):
        with files.atomic_write(old) as tmp:
            tmp.write_bytes(b"new")
    assert old.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["empty", "old.bin"]


def test_inspect_into_a_closed_pipe_exits_quietly(tmp_path):
    import os
    import subprocess
    import sys

    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), tmp_path / "m.onnx")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before road-export writes a line (`| head` done)
    try:
        proc = subprocess.run([sys.executable, "-m", "road_export.cli", "inspect", str(tmp_path / "m.onnx")],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert proc.stderr == "" and proc.returncode == 141, proc.stderr


def test_interrupted_verify_of_a_model_directory_leaves_it_empty(llama_dirs, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt()

    monkeypatch.setattr(verify_module, "verify", interrupted)
    out = tmp_path / "d"
    out.mkdir()
    proc = road_export("--base", llama_dirs / "base", "--adapter", llama_dirs / "road", out)
    assert proc.returncode == 130, proc.stderr
    assert out.is_dir() and list(out.iterdir()) == [] and leftovers(tmp_path) == []
    proc = road_export("--base", llama_dirs / "base", "--adapter", llama_dirs / "road", tmp_path / "new")
    assert proc.returncode == 130 and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
