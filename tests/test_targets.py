"""What a command writes without being asked by name (`.data`, `.onnx_adapter` swap files) and what it leaves
when it is interrupted: existing targets byte-identical, new ones removed, no hidden files left."""

import pytest
import peft
import torch
from conftest import tiny
from test_cli import assert_bad_input, leftovers, road_export

from road_export.app import cli
from road_export.graph import files
from road_export.app import verify as verify_module
from road_export.core.errors import RoadError


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
        proc = subprocess.run([sys.executable, "-m", "road_export.app.cli", "inspect", str(tmp_path / "m.onnx")],
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


# ---- signals around the commit point: old files back before it, the command's own exit code after it ----

@pytest.fixture(scope="module")
def onnx_files(llama_dirs):
    """A rotate export of llama_dirs' adapter and the float base alone (for optimize, adapter, attach, verify)."""
    root = llama_dirs / "onnx"
    root.mkdir()
    for argv in (["--adapter", llama_dirs / "road", "--mode", "rotate", root / "rotate.onnx"],
                 ["--no-adapter", "--mode", "merge", root / "base.onnx"]):
        proc = road_export("--base", llama_dirs / "base", "--no-verify", *argv)
        assert proc.returncode == 0, proc.stderr
    return root


def _command(name, dirs, onnx, out):
    """(argv, the targets that exist before the command) of each writing command."""
    base, road = dirs / "base", dirs / "road"
    return {
        "export": (["--base", base, "--adapter", road, "--mode", "rotate", "--no-verify", "--external-data",
                    out / "x.onnx"], ["x.onnx", "x.onnx.data", "x.default.onnx_adapter"]),
        "optimize": (["optimize", onnx / "rotate.onnx", out / "x.onnx"], ["x.onnx"]),
        "adapter": (["adapter", road, "--like", onnx / "rotate.onnx", out / "x.onnx_adapter"], ["x.onnx_adapter"]),
        "attach": (["attach", onnx / "base.onnx", "--adapter", road, out / "x.onnx"], ["x.onnx"]),
        "merge-checkpoint": (["merge-checkpoint", "--base", base, "--adapter", road, out / "merged"], []),
        "verify": (["verify", onnx / "rotate.onnx", "--base", base, "--adapter", road, "--report", out / "r.json"],
                   ["r.json"]),
    }[name]


def _signal_at(monkeypatch, moment, sig):
    """Send `sig` to this process just before the commit (after the block's last write), at the commit (inside
    it, where signals are held back) or while the result is printed."""
    import builtins
    import contextlib
    import os

    send = lambda: os.kill(os.getpid(), sig)  # noqa: E731
    real = files.kept_on_failure

    @contextlib.contextmanager
    def kept(*args, on_commit=None, **kwargs):
        def commit():
            on_commit()
            if moment == "commit":
                send()

        with real(*args, on_commit=commit, **kwargs):
            yield
            if moment == "before":
                send()
            if moment == "dropped":  # the handler's exception lost, as Python drops one raised in a weakref
                try:               # callback (torch's weak maps): the command runs on, and its commit refuses
                    send()
                except (KeyboardInterrupt, cli.Terminated):
                    pass

    monkeypatch.setattr(files, "kept_on_failure", kept)
    if moment == "print":
        done = cli._Progress.done

        def printing(*args, **kwargs):
            send()
            builtins.print(*args, **kwargs)

        monkeypatch.setattr(cli, "print", printing, raising=False)
        monkeypatch.setattr(cli._Progress, "done", lambda self, message: (send(), done(self, message)))


@pytest.mark.parametrize(("command", "moment", "sig"), [
    ("export", "before", "SIGTERM"), ("export", "commit", "SIGTERM"), ("export", "print", "SIGINT"),
    ("export", "dropped", "SIGTERM"), ("optimize", "dropped", "SIGINT"),
    ("optimize", "before", "SIGINT"), ("optimize", "print", "SIGTERM"),
    ("adapter", "before", "SIGTERM"), ("adapter", "commit", "SIGINT"),
    ("attach", "before", "SIGTERM"), ("attach", "print", "SIGTERM"),
    ("merge-checkpoint", "before", "SIGTERM"), ("merge-checkpoint", "print", "SIGTERM"),
    ("verify", "before", "SIGINT"), ("verify", "print", "SIGTERM"),
])
def test_a_signal_before_the_commit_restores_after_it_is_ignored(llama_dirs, onnx_files, tmp_path, monkeypatch,
                                                                    command, moment, sig):
    import signal as signals

    from test_bad_input import snapshot

    out = tmp_path / "out"
    out.mkdir()
    argv, existing = _command(command, llama_dirs, onnx_files, out)
    for name in existing:
        (out / name).write_bytes(f"old {name}\n".encode())
    before = snapshot(out)
    sig = getattr(signals, sig)
    _signal_at(monkeypatch, moment, sig)
    proc = road_export(*argv)
    if moment in ("before", "dropped"):
        assert proc.returncode == (143 if sig == signals.SIGTERM else 130), proc.stderr
        assert snapshot(out) == before  # byte-identical, new files removed, nothing hidden left
        return
    assert proc.returncode == 0, proc.stderr  # committed: the command's own code, its files in place
    assert "Traceback" not in proc.stderr, proc.stderr
    after = snapshot(out)
    assert after != before and all(after[str(out / name)] != before[str(out / name)] for name in existing)
    assert leftovers(out) == []
