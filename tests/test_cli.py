"""The road-export command end to end: in-process through `road_export.app.cli.main` (fast), the default run also as
the subprocess users start."""

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
from conftest import copy_onnx, tiny

from road_export.app.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


def road_export(*args, cwd=None):
    """Run the command in this process; returns what a subprocess would (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args])
    finally:
        os.chdir(previous)
    return Done(code, out.getvalue(), err.getvalue())


def road_export_process(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "road_export.app.cli", *map(str, args)], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=600)


def leftovers(*dirs: Path) -> list[Path]:
    """Temporary files or directories a writer left behind (they are hidden: `.NAME.*`)."""
    return [p for d in dirs if d.is_dir() for p in d.iterdir() if p.name.startswith(".")]


def assert_bad_input(proc, *, says, dirs=()):
    """Exit 2, exactly one line `road-export: error: ...` holding `says`, no traceback, and no temporary file or
    directory left in `dirs`."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("road-export: error: "), proc.stderr
    assert says in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert leftovers(*map(Path, dirs)) == []


@pytest.fixture(scope="session")
def llama_dirs(tmp_path_factory):
    """A saved tiny Llama base directory and two peft RoAd adapters for it (different parameters)."""
    root = tmp_path_factory.mktemp("cli")
    base = tiny("tiny-llama")
    base.save_pretrained(root / "base")
    for name, seed, variant in (("road", 0, "road_4"), ("other", 1, "road_2")):
        torch.manual_seed(seed)
        model = peft.get_peft_model(tiny("tiny-llama"), peft.RoadConfig(variant=variant, group_size=8,
                                                                         init_weights=False))
        model.save_pretrained(str(root / name))
    return root


@pytest.fixture(scope="session")
def exported(llama_dirs):
    out = {}
    for mode in ("merge", "rotate"):
        path = llama_dirs / f"{mode}.onnx"
        proc = road_export("--base", llama_dirs / "base", "--adapter", llama_dirs / "road", "--mode", mode, path)
        out[mode] = (path, proc)
    return out


def test_default_run(tmp_path):
    proc = road_export_process("model.onnx", "--report", "parity.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "parity PASSED" in proc.stdout and "logits" in proc.stdout
    assert (tmp_path / "model.onnx").is_file()
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["passed"] and len(report["rows"]) >= 3 and report["atol"] == 1e-4
    assert "from the embedded config" in proc.stderr


@pytest.mark.parametrize("mode", ["merge", "rotate"])
def test_base_and_peft_adapter(exported, mode):
    path, proc = exported[mode]
    assert proc.returncode == 0, proc.stderr
    # 3 shapes, the vocabulary sweep, the long sequence; rotate: the 3 shapes again with MODEL.default.onnx_adapter
    assert f"parity PASSED: {5 if mode == 'merge' else 8}/{5 if mode == 'merge' else 8}" in proc.stdout
    info = json.loads(road_export("inspect", path, "--json").stdout)
    assert info["mode"] == mode
    assert info["road_nodes"] == (2 * 2 if mode == "rotate" else 0)  # q_proj, v_proj in 2 layers
    assert info["adapters"][0]["variant"] == "road_4"


def test_verify_passes_against_its_source_and_fails_against_another(exported, llama_dirs):
    path, _ = exported["rotate"]
    good = road_export("verify", path, "--base", llama_dirs / "base", "--adapter", llama_dirs / "road")
    assert good.returncode == 0 and "parity PASSED" in good.stdout, good.stderr
    bad = road_export("verify", path, "--base", llama_dirs / "base", "--adapter", llama_dirs / "other",
                      "--report", llama_dirs / "bad.json")
    assert bad.returncode == 1 and "parity FAILED" in bad.stdout and "FAIL" in bad.stdout
    assert json.loads((llama_dirs / "bad.json").read_text())["passed"] is False


def test_inspect_text(exported):
    path, _ = exported["rotate"]
    proc = road_export("inspect", path)
    assert proc.returncode == 0
    for text in ("mode:      rotate", "road: 4", "default: road_4, group size 8, 4 layers", "input_ids: int64",
                 "logits: float"):
        assert text in proc.stdout, proc.stdout


def test_fp16_and_quiet(llama_dirs, tmp_path):
    proc = road_export("--base", llama_dirs / "base", "--adapter", llama_dirs / "road", "--dtype", "float16",
                       "--quiet", tmp_path / "h.onnx")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr


def test_bad_inputs(llama_dirs, tmp_path):
    d = [tmp_path, llama_dirs]  # no temporary file may be left in either
    base, adapter = llama_dirs / "base", llama_dirs / "road"
    out = tmp_path / "out.onnx"
    assert_bad_input(road_export("--base", tmp_path / "nope", "--adapter", adapter, out), says="nope", dirs=d)
    assert_bad_input(road_export("--base", base, "--adapter", tmp_path / "nope", out), says="no such adapter", dirs=d)
    assert_bad_input(road_export("--base", base, "--adapter", adapter, "--mode", "fold", out), says="fold", dirs=d)
    assert_bad_input(road_export("--base", base, "--adapter", adapter, "--task", "speech", out), says="speech", dirs=d)
    assert_bad_input(road_export("--base", base, "--adapter", adapter, tmp_path / "no" / "out.onnx"),
                     says="does not exist", dirs=d)
    assert_bad_input(road_export("--base", base, "--adapter", adapter, tmp_path / "out.txt"), says=".onnx", dirs=d)
    assert_bad_input(road_export("verify", tmp_path / "none.onnx", "--base", base), says="no such ONNX file", dirs=d)
    assert_bad_input(road_export("inspect", adapter / "adapter_config.json"), says="not a readable ONNX", dirs=d)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_adapters(llama_dirs, tmp_path):
    d = [tmp_path, llama_dirs]  # no temporary file may be left in either
    import shutil

    base, out = llama_dirs / "base", tmp_path / "out.onnx"
    truncated = tmp_path / "truncated"
    shutil.copytree(llama_dirs / "road", truncated)
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    assert_bad_input(road_export("--base", base, "--adapter", truncated, out), says="truncated", dirs=d)

    wrong_group = tmp_path / "group"
    shutil.copytree(llama_dirs / "road", wrong_group)
    config = json.loads((wrong_group / "adapter_config.json").read_text())
    config["group_size"] = 48
    (wrong_group / "adapter_config.json").write_text(json.dumps(config))
    assert_bad_input(road_export("--base", base, "--adapter", wrong_group, out), says="not divisible by group_size",
                     dirs=d)

    torch.manual_seed(0)
    bert = peft.get_peft_model(tiny("tiny-bert"), peft.RoadConfig(group_size=8))
    bert.save_pretrained(str(tmp_path / "bert"))
    assert_bad_input(road_export("--base", base, "--adapter", tmp_path / "bert", out), says="another architecture",
                     dirs=d)
    assert not out.exists()


def test_optimize(exported, llama_dirs, tmp_path):
    d = [tmp_path, llama_dirs]  # no temporary file may be left in either
    path, _ = exported["rotate"]
    proc = road_export("optimize", path, tmp_path / "folded.onnx", "--fold")
    assert proc.returncode == 0, proc.stderr
    assert "4 rotation(s) folded into weights" in proc.stdout and "road nodes: 4 -> 0" in proc.stdout
    verified = road_export("verify", tmp_path / "folded.onnx", "--base", llama_dirs / "base", "--adapter",
                           llama_dirs / "road")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert_bad_input(road_export("optimize", tmp_path / "none.onnx", tmp_path / "x.onnx"), says="no such ONNX", dirs=d)


def test_several_adapters_in_one_graph(llama_dirs, tmp_path):
    d = [tmp_path, llama_dirs]  # no temporary file may be left in either
    args = ["--base", llama_dirs / "base", "--adapter", f"one={llama_dirs / 'road'}", "--adapter",
            f"two={llama_dirs / 'other'}"]
    proc = road_export(*args, "--mode", "rotate", tmp_path / "mixed.onnx")
    assert proc.returncode == 0 and "parity PASSED" in proc.stdout and "ids 1,2,0" in proc.stdout, proc.stderr
    shown = road_export("inspect", tmp_path / "mixed.onnx").stdout
    assert "mixed:     adapter_ids" in shown and "id 1: one: road_4" in shown and "id 2: two: road_2" in shown
    verified = road_export("verify", tmp_path / "mixed.onnx", *args)
    assert verified.returncode == 0, verified.stdout
    assert_bad_input(road_export(*args, tmp_path / "merged.onnx"), says="add --mode rotate", dirs=d)
    assert not (tmp_path / "merged.onnx").exists()


def test_adapter_conversion(exported, llama_dirs, tmp_path):
    d = [tmp_path, llama_dirs]  # no temporary file may be left in either
    path, _ = exported["rotate"]
    out = path.with_name("rotate.other.onnx_adapter")
    proc = road_export("adapter", llama_dirs / "other", "--like", path, out)
    assert proc.returncode == 0 and out.is_file(), proc.stderr
    assert path.with_name("rotate.default.onnx_adapter").is_file()  # written by the export itself
    torch.manual_seed(0)
    bert = peft.get_peft_model(tiny("tiny-bert"), peft.RoadConfig(group_size=8))
    bert.save_pretrained(str(tmp_path / "bert"))
    assert_bad_input(road_export("adapter", tmp_path / "bert", "--like", path, tmp_path / "b.onnx_adapter"),
                     says="adapted layers differ", dirs=d)
    assert not (tmp_path / "b.onnx_adapter").exists()


def test_merge_checkpoint(llama_dirs, tmp_path):
    d = [tmp_path, llama_dirs]  # no temporary file may be left in either
    out = tmp_path / "merged"
    proc = road_export("merge-checkpoint", "--base", llama_dirs / "base", "--adapter", llama_dirs / "road", out)
    assert proc.returncode == 0 and "tensors rotated" in proc.stdout, proc.stderr
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert_bad_input(road_export("merge-checkpoint", "--base", llama_dirs / "base", "--adapter", llama_dirs / "road",
                                 out), says="not empty", dirs=d)


def test_attach(llama_dirs, plain_llama, tmp_path):
    d = [tmp_path, llama_dirs]  # no temporary file may be left in either
    copy_onnx(plain_llama(), tmp_path).rename(tmp_path / "base.onnx")  # tiny-llama exported without adapter
    for mode in ("merge", "rotate"):
        out = tmp_path / f"{mode}.onnx"
        proc = road_export("attach", tmp_path / "base.onnx", "--adapter", llama_dirs / "road", "--mode", mode, out)
        assert proc.returncode == 0 and "4 module(s) placed" in proc.stdout, proc.stderr
        verified = road_export("verify", out, "--base", llama_dirs / "base", "--adapter", llama_dirs / "road")
        assert verified.returncode == 0, verified.stdout
    assert_bad_input(road_export("attach", tmp_path / "none.onnx", "--adapter", llama_dirs / "road",
                                 tmp_path / "x.onnx"), says="no such ONNX file", dirs=d)


def test_text_generation_with_past(llama_dirs, tmp_path):
    d = [tmp_path, llama_dirs]  # no temporary file may be left in either
    args = ["--base", llama_dirs / "base", "--adapter", f"one={llama_dirs / 'road'}", "--adapter",
            f"two={llama_dirs / 'other'}", "--task", "text-generation-with-past"]
    proc = road_export(*args, "--mode", "rotate", tmp_path / "decoder.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "parity PASSED: 12/12" in proc.stdout and "present.*" in proc.stdout and "past 9" in proc.stdout
    info = json.loads(road_export("inspect", tmp_path / "decoder.onnx", "--json").stdout)
    assert info["task"] == "text-generation-with-past"
    assert "past_key_values.1.value" in [i["name"] for i in info["inputs"]]
    assert "present.1.value" in [o["name"] for o in info["outputs"]]
    verified = road_export("verify", tmp_path / "decoder.onnx", *args, "--no-native")
    assert verified.returncode == 0 and "present.*" in verified.stdout, verified.stdout + verified.stderr
    assert "road ops: native" in proc.stdout and "road ops: bodies" in verified.stdout
    typo = road_export("--base", llama_dirs / "base", "--adapter", llama_dirs / "road", "--task",
                       "text-generation-with-pasta", tmp_path / "typo.onnx")
    assert_bad_input(typo, says="unknown task 'text-generation-with-pasta'", dirs=d)
    assert not (tmp_path / "typo.onnx").exists()


@pytest.mark.parametrize("debug", [None, "1"])
def test_debug_keeps_exit_codes(monkeypatch, debug):
    """ROAD_EXPORT_DEBUG prints the traceback but keeps the exit code the error class maps to: a bug of ours 3 (not
    1, which means parity failed), an onnxruntime input error 2. Planted faults: `inspect` made to raise each."""
    import onnxruntime

    from road_export.app import cli

    if debug:
        monkeypatch.setenv("ROAD_EXPORT_DEBUG", debug)
    else:
        monkeypatch.delenv("ROAD_EXPORT_DEBUG", raising=False)
    ort_error = onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument
    for raised, code in ((KeyError("planted"), 3), (ort_error("planted input error"), 2)):
        def fail(args, raised=raised):
            raise raised

        monkeypatch.setitem(cli.COMMANDS, "inspect", dataclasses.replace(cli.COMMANDS["inspect"], run=fail))
        done = road_export("inspect", "x.onnx")
        assert done.returncode == code, done.stderr
        assert ("Traceback (most recent call last)" in done.stderr) == bool(debug), done.stderr
        assert "planted" in done.stderr.strip().splitlines()[-1], done.stderr


def test_verify_a_base_export_against_the_base_alone(llama_dirs, exported, tmp_path):
    """A --no-adapter export records no adapter: `verify FILE --base B` checks it against transformers' base model
    alone; a file that records adapters still needs --adapter. Planted fault: a damaged embedding row FAILS."""
    import onnx
    from onnx import numpy_helper

    base = tmp_path / "base.onnx"
    assert road_export("--base", llama_dirs / "base", "--no-adapter", "--no-verify", base).returncode == 0
    done = road_export("verify", base, "--base", llama_dirs / "base")
    assert done.returncode == 0 and "parity PASSED" in done.stdout, done.stdout + done.stderr
    assert_bad_input(road_export("verify", exported["merge"][0], "--base", llama_dirs / "base"),
                     says="no adapter given; pass --adapter PATH")
    model = onnx.load(str(base))
    gather = next(n for n in model.graph.node if n.op_type == "Gather")
    init = next(i for i in model.graph.initializer if i.name == gather.input[0])
    array = numpy_helper.to_array(init).copy()
    array[5] += np.random.default_rng(0).standard_normal(array.shape[1]).astype(array.dtype)
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, str(tmp_path / "damaged.onnx"))
    failed = road_export("verify", tmp_path / "damaged.onnx", "--base", llama_dirs / "base")
    assert failed.returncode == 1 and "parity FAILED" in failed.stdout, failed.stdout + failed.stderr
