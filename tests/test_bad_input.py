"""Bad input on every path: exit 2, one line on stderr, no traceback, nothing left behind.

The CLI cases run in-process through `road_export.app.cli.main`; a few run as subprocesses (the installed command's
path, SIGTERM/SIGINT while writing, a full or read-only file system). RoadSession's cases are at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import peft
import pytest
import torch
from conftest import copy_onnx, tiny

import road_export as rx
from road_export import RoadError
from road_export.graph import swap
from road_export.app.cli import COMMANDS, main
from road_export.runtime.session import RoadSession

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def snapshot(*dirs: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and directory under `dirs`, hidden ones included."""
    out: dict[str, bytes | None] = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            out[str(p)] = p.read_bytes() if p.is_file() else None
    return out


def assert_one_line(code: int, err: str, out: str, says: str, expected: int = 2) -> str:
    assert code == expected, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("road-export: error: " if expected == 2 else "road-export: "), lines[0]
    assert says in lines[0], lines[0]
    assert "Traceback" not in err + out
    return lines[0]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, plain_llama):
    return build_inputs(tmp_path_factory.mktemp("bad_input"), plain_llama)


def build_inputs(root: Path, plain_llama) -> Path:
    """Inputs shared by every case: a tiny Llama base and adapter, exports of it (rotate, with cache, merged with
    external data), a BERT export, and broken files."""
    tiny("tiny-llama").save_pretrained(root / "base")
    torch.manual_seed(0)
    adapted = peft.get_peft_model(tiny("tiny-llama"), peft.RoadConfig(variant="road_2", group_size=8,
                                                                      init_weights=False))
    adapted.save_pretrained(str(root / "road"))
    model = rx.load_adapter(tiny("tiny-llama"), root / "road")
    rx.export(model, root / "rotate.onnx", mode="rotate")
    rx.export(model, root / "past.onnx", mode="rotate", task="text-generation-with-past")
    rx.export(model, root / "ext.onnx", external_data=True)  # merged: its metadata records the adapter
    copy_onnx(plain_llama(external_data=True), root)  # plain.onnx (+ .data), attach's base: no adapter
    two = rx.load_adapter(rx.load_adapter(tiny("tiny-llama"), root / "road", "a"), root / "road", "b")
    rx.export(two, root / "mixed.onnx", mode="rotate")  # adapters a and b, input adapter_ids
    mislabeled = onnx.load(str(root / "rotate.onnx"))  # metadata says with-past, the graph has no cache
    next(p for p in mislabeled.metadata_props if p.key == "road_export.task").value = "text-generation-with-past"
    onnx.save(mislabeled, str(root / "mislabeled.onnx"))
    data = (root / "rotate.onnx").read_bytes()
    (root / "empty.onnx").write_bytes(b"")
    (root / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (root / "text.onnx").write_text("not a model\n")
    lost = root / "lost"  # an external-data model whose data file was not copied with it
    lost.mkdir()
    shutil.copy(root / "ext.onnx", lost / "ext.onnx")
    rx.export(tiny("tiny-bert"), root / "bert.onnx", require_adapter=False)
    (root / "adir.onnx").mkdir()
    (root / "adir.onnx_adapter").mkdir()
    (root / "afile").write_text("x")
    damaged_record = onnx.load(str(root / "plain.onnx"))  # a base whose adapter record is damaged
    onnx.helper.set_model_props(damaged_record, {**{p.key: p.value for p in damaged_record.metadata_props},
                                                 "road_export.adapters": "[1,2"})
    onnx.save(damaged_record, str(root / "record.onnx"))
    damaged_base_dirs(root)
    return root


def damaged_base_dirs(root: Path) -> None:
    """Base directories with one damaged JSON file each (only the files read before it): config.json, the
    safetensors index, a safetensors header."""
    config = (root / "base" / "config.json").read_text()
    weights = (root / "base" / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8:8 + length])
    header["model.layers.0.self_attn.q_proj.weight"]["shape"] = "x"
    shape_text = json.dumps(header).encode()
    index = "model.safetensors.index.json"
    for name, files in {
        "config-list": {"config.json": "[]"},
        "config-text": {"config.json": "{"},
        "index-list": {"config.json": config, index: "[]"},
        "index-map": {"config.json": config, index: '{"weight_map": ["model.safetensors"]}'},
        "header-list": {"config.json": config, "model.safetensors": struct.pack("<Q", 2) + b"[]"},
        "header-shape": {"config.json": config, "model.safetensors": struct.pack("<Q", len(shape_text)) + shape_text
                         + weights[8 + length:]},
    }.items():
        (root / name).mkdir()
        for file, content in files.items():
            (root / name / file).write_bytes(content if isinstance(content, bytes) else content.encode())


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# (id, argv with {r} = the shared inputs and {o} = an empty output directory, text the line must hold)
CASES = [
    # options checked before anything is loaded
    ("atol-negative", ["--atol", "-1", "{o}/m.onnx"], "finite number >= 0"),
    ("atol-nan", ["--atol", "nan", "{o}/m.onnx"], "finite number >= 0"),
    ("atol-inf", ["--atol", "inf", "{o}/m.onnx"], "finite number >= 0"),
    ("atol-text", ["--atol", "tight", "{o}/m.onnx"], "not a number"),
    ("opset-low", ["--opset", "5", "{o}/m.onnx"], "choose 18 to 25"),
    ("opset-high", ["--opset", "99", "{o}/m.onnx"], "choose 18 to 25"),
    ("seed-negative", ["--seed", "-3", "{o}/m.onnx"], "must be >= 0"),
    ("seed-too-large", ["--seed", str(2**63), "{o}/m.onnx"], f"{2**63} must be >= 0"),
    ("mode-unknown", ["--mode", "fold", "{o}/m.onnx"], "invalid choice: 'fold'"),
    ("fixed-with-merge", ["--fixed", "{o}/m.onnx"], "--fixed applies to --mode rotate"),
    ("target-with-merge", ["--target", "portable", "{o}/m.onnx"], "--target applies to --mode rotate"),
    ("report-without-verify", ["--no-verify", "--report", "{o}/p.json", "{o}/m.onnx"], "needs the parity check"),
    ("merge-two-adapters", ["--adapter", "a={r}/road", "--adapter", "b={r}/road", "{o}/m.onnx"], "add --mode rotate"),
    ("no-output", [], "required: OUTPUT.onnx"),
    ("task-unknown", ["--task", "speech", "{o}/m.onnx"], "unknown task 'speech'"),
    ("verify-task-unknown", ["verify", "{r}/rotate.onnx", "--task", "speech"], "unknown task 'speech'"),
    ("command-typo", ["verfy", "{r}/rotate.onnx"], "did you mean verify?"),
    ("help-unknown", ["help", "nope"], "no command 'nope'"),
    # output paths checked before anything is loaded
    ("report-no-dir", ["--report", "{o}/nodir/p.json", "{o}/m.onnx"], "does not exist"),
    ("report-is-dir", ["--report", "{o}", "{o}/m.onnx"], "is a directory"),
    ("report-is-output", ["--report", "{o}/m.onnx", "{o}/m.onnx"], "is also the command's"),
    ("output-suffix", ["{o}/m.txt"], "must end in .onnx"),
    ("output-is-dir", ["{r}/adir.onnx"], "is a directory"),
    ("output-no-dir", ["{o}/nodir/m.onnx"], "does not exist"),
    ("output-parent-is-file", ["{r}/afile/m.onnx"], "is a file, not a directory"),
    ("data-file-is-dir", ["--external-data", "{o}/d.onnx"], "external data file"),
    ("verify-report-no-dir", ["verify", "{r}/rotate.onnx", "--report", "{o}/nodir/p.json"], "does not exist"),
    ("verify-atol-nan", ["verify", "{r}/rotate.onnx", "--atol", "nan"], "finite number"),
    ("optimize-output-is-dir", ["optimize", "{r}/rotate.onnx", "{r}/adir.onnx"], "is a directory"),
    ("attach-output-suffix", ["attach", "{r}/rotate.onnx", "--adapter", "{r}/road", "{o}/x.bin"], "end in .onnx"),
    ("attach-no-adapter", ["attach", "{r}/rotate.onnx", "--adapter", "{o}/none", "{o}/x.onnx"], "no such adapter"),
    ("adapter-output-suffix", ["adapter", "{r}/road", "--like", "{r}/rotate.onnx", "{o}/x.onnx"], "onnx_adapter"),
    ("adapter-output-is-dir", ["adapter", "{r}/road", "--like", "{r}/rotate.onnx", "{r}/adir.onnx_adapter"],
     "is a directory"),
    ("adapter-no-dir", ["adapter", "{o}/none", "--like", "{r}/rotate.onnx", "{o}/x.onnx_adapter"],
     "no such adapter"),
    ("merge-checkpoint-output-is-file", ["merge-checkpoint", "--base", "{r}/base", "--adapter", "{r}/road",
                                         "{r}/afile"], "is a file"),
    ("merge-checkpoint-no-parent", ["merge-checkpoint", "--base", "{r}/base", "--adapter", "{r}/road",
                                    "{o}/no/dir"], "does not exist"),
    # adapter names peft and ONNX can carry, refused before loading
    ("adapter-name-dot", ["--adapter", "a.b={r}/road", "--mode", "rotate", "{o}/m.onnx"], "no '.'"),
    ("adapter-name-reserved", ["--adapter", "__base__={r}/road", "--mode", "rotate", "{o}/m.onnx"], "is reserved"),
    ("adapter-name-empty", ["--adapter", "={r}/road", "{o}/m.onnx"], "expected [NAME=]PATH"),
    ("adapter-name-twice", ["--adapter", "a={r}/road", "--adapter", "a={r}/road", "--mode", "rotate", "{o}/m.onnx"],
     "a given twice"),
    ("verify-adapter-name-dot", ["verify", "{r}/rotate.onnx", "--adapter", "a.b={r}/road"], "no '.'"),
    # the file's own adapter names, task, inputs and outputs, checked before anything runs
    ("verify-mixed-names", ["verify", "{r}/mixed.onnx", "--base", "{r}/base", "--adapter", "x={r}/road", "--adapter",
                            "y={r}/road"], "holds adapters a, b; the --adapter names must match the file's"),
    ("verify-task-metadata", ["verify", "{r}/mislabeled.onnx", "--base", "{r}/base", "--adapter", "{r}/road"],
     "task text-generation-with-past (from its road_export.task metadata) does not fit the file"),
    ("verify-task-no-cache", ["verify", "{r}/rotate.onnx", "--base", "{r}/base", "--adapter", "{r}/road", "--task",
                              "text-generation-with-past"], "(from --task) does not fit the file: it takes no "
                                                            "past_key_values"),
    ("verify-task-head", ["verify", "{r}/rotate.onnx", "--base", "{r}/base", "--adapter", "{r}/road", "--task",
                          "feature-extraction"], "the task does not fit the adapter"),
    # outputs never coincide with inputs
    ("attach-twice", ["attach", "{r}/ext.onnx", "--adapter", "{r}/road", "{o}/x.onnx"], "already holds adapter(s) "
                                                                                       "default (merge"),
    ("attach-out-is-in", ["attach", "{r}/plain.onnx", "--adapter", "{r}/road", "{r}/plain.onnx"], "is the input"),
    ("optimize-out-is-in", ["optimize", "{r}/rotate.onnx", "{r}/rotate.onnx"], "is the input"),
    ("verify-report-is-model", ["verify", "{r}/rotate.onnx", "--report", "{r}/rotate.onnx"], "is also the command's"),
    ("verify-report-is-data", ["verify", "{r}/ext.onnx", "--report", "{r}/ext.onnx.data"], "is the input"),
    ("verify-report-in-adapter", ["verify", "{r}/rotate.onnx", "--adapter", "x={r}/road", "--report",
                                  "{r}/road/adapter_config.json"], "is a file of the input"),
    ("export-report-is-base-file", ["--base", "{r}/base", "--report", "{r}/base/config.json", "{o}/m.onnx"],
     "is a file of the input"),
    ("export-output-is-adapter", ["--adapter", "{r}/road", "{r}/road"], "exists and is not empty"),
    # empty, truncated or incomplete ONNX input
    *[(f"{cmd}-{kind}", argv, says)
      for kind, says in (("empty", "empty file"), ("truncated", "not a readable ONNX model"),
                         ("text", "not a readable ONNX model"), ("lost-data", "external data file 'ext.onnx.data'"))
      for cmd, argv in (
          ("inspect", ["inspect", f"{{r}}/{kind}.onnx"]),
          ("verify", ["verify", f"{{r}}/{kind}.onnx"]),
          ("optimize", ["optimize", f"{{r}}/{kind}.onnx", "{o}/x.onnx"]),
          ("attach", ["attach", f"{{r}}/{kind}.onnx", "--adapter", "{r}/road", "{o}/x.onnx"]),
          ("adapter", ["adapter", "{r}/road", "--like", f"{{r}}/{kind}.onnx", "{o}/x.onnx_adapter"]),
      )],
    ("inspect-dir", ["inspect", "{r}/adir.onnx"], "is a directory"),
    ("inspect-missing", ["inspect", "{o}/none.onnx"], "no such ONNX file"),
    # a model of another architecture than the source
    ("verify-other-vocab", ["verify", "{r}/rotate.onnx"], "logits have 256 entries, the source model's vocab_size "
                                                          "is 2048"),
    ("verify-other-architecture", ["verify", "{r}/bert.onnx"], "does not fit the source model (llama)"),
    # damaged JSON in the user's files: a base's config.json, safetensors index or header, a file's metadata record
    ("builder-config-list", ["--base", "{r}/config-list", "--adapter", "{r}/road", "--graph", "builder", "{o}/d"],
     "config-list/config.json is not a transformers config (a JSON object"),
    ("auto-config-list", ["--base", "{r}/config-list", "--adapter", "{r}/road", "--graph", "auto", "{o}/d"],
     "config-list/config.json: cannot read the model config"),
    ("merge-checkpoint-config-text", ["merge-checkpoint", "--base", "{r}/config-text", "--adapter", "{r}/road",
                                      "{o}/m"], "config-text/config.json: not JSON (Expecting"),
    ("merge-checkpoint-index-list", ["merge-checkpoint", "--base", "{r}/index-list", "--adapter", "{r}/road", "{o}/m"],
     "model.safetensors.index.json: holds a JSON array, not an object; save the model again with save_pretrained"),
    ("merge-checkpoint-index-map", ["merge-checkpoint", "--base", "{r}/index-map", "--adapter", "{r}/road", "{o}/m"],
     "model.safetensors.index.json: not a safetensors index (its weight_map must map"),
    ("merge-checkpoint-header-list", ["merge-checkpoint", "--base", "{r}/header-list", "--adapter", "{r}/road",
                                      "{o}/m"], "model.safetensors: not a readable safetensors file (its header is "
                                                "not a JSON object)"),
    ("merge-checkpoint-header-shape", ["merge-checkpoint", "--base", "{r}/header-shape", "--adapter", "{r}/road",
                                       "{o}/m"], "its header's entry 'model.layers.0.self_attn.q_proj.weight' is not "
                                                 "{dtype, shape, data_offsets}"),
    ("attach-damaged-record", ["attach", "{r}/record.onnx", "--adapter", "{r}/road", "{o}/x.onnx"],
     "record.onnx: its road_export.adapters metadata is not JSON"),
]


def case_args(argv: list[str], inputs: Path, out: Path) -> list[str]:
    return [a.replace("{r}", str(inputs)).replace("{o}", str(out)).replace("lost-data.onnx", "lost/ext.onnx")
            for a in argv]


@pytest.mark.parametrize(("argv", "says"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_bad_input(ctx, tmp_path, capsys, argv, says):
    args = case_args(argv, ctx, tmp_path)
    (tmp_path / "d.onnx.data").mkdir() if "--external-data" in args else None
    before = snapshot(ctx, tmp_path)
    started = time.perf_counter()
    code, out, err = cli(capsys, *args)
    assert_one_line(code, err, out, says)
    assert snapshot(ctx, tmp_path) == before  # nothing written, no temporary file or directory left
    if "{o}/nodir" in " ".join(argv) or argv[:1] == ["--atol"]:
        assert time.perf_counter() - started < 5  # refused up front, not after an export


def test_every_option_has_help_and_help_is_torch_free(capsys):
    import argparse

    for command in COMMANDS.values():
        for action in command.parser()._actions:  # argparse's documented parser structure has no public list
            assert action.help and action.help != argparse.SUPPRESS, (command.name, action.dest)
    code, out, _ = cli(capsys, "--help")
    assert code == 0
    for name, command in COMMANDS.items():
        assert any(line.split()[:1] == [name] and command.help[:20] in line for line in out.splitlines()), name
    code, out, _ = cli(capsys, "help", "verify")
    assert code == 0 and "--base" in out and "MODEL.onnx" in out
    code, help_export, _ = cli(capsys, "export", "--help")
    assert code == 0 and "--mode" in help_export
    probe = ("import sys; from road_export.app.cli import main; main(['--help']); main(['help', 'attach']); "
             "print(sorted(m for m in ('torch', 'transformers', 'onnx', 'onnxruntime') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ENV, timeout=60)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


def test_export_is_explicit_and_the_bare_form_its_alias(ctx, tmp_path, capsys):
    for argv in (["export", "--base", "tiny-llama", "--adapter", ctx / "road", tmp_path / "a.onnx", "--report",
                  tmp_path / "r.json"],
                 ["--base", "tiny-llama", "--adapter", ctx / "road", tmp_path / "b.onnx", "--no-verify"]):
        code, out, err = cli(capsys, *argv, "--quiet")
        assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["passed"]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx", "r.json"]  # no temporary left


def test_subprocess_bad_input_smoke(ctx, tmp_path):
    """The command as users run it: one line, exit 2, nothing written."""
    for argv, says in ((["optimize", ctx / "empty.onnx", tmp_path / "x.onnx"], "empty file"),
                       (["--opset", "5", tmp_path / "m.onnx"], "choose 18 to 25")):
        done = subprocess.run([sys.executable, "-m", "road_export.app.cli", *map(str, argv)], capture_output=True,
                              text=True, env=ENV, timeout=120)
        assert_one_line(done.returncode, done.stderr, done.stdout, says)
    assert list(tmp_path.iterdir()) == []


# ---- the file system refuses: full, read-only ----

@pytest.fixture
def small_fs(tmp_path):
    """A 192 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()[:80]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("command", ["optimize", "attach", "adapter", "merge-checkpoint", "export"])
def test_full_file_system(ctx, small_fs, capsys, command):
    (small_fs / "old.onnx").write_bytes(b"x" * 1000)  # a target that exists must stay as it was
    argv = {"optimize": ["optimize", ctx / "rotate.onnx", small_fs / "old.onnx"],
            "attach": ["attach", ctx / "plain.onnx", "--adapter", ctx / "road", small_fs / "m.onnx"],
            "adapter": ["adapter", ctx / "road", "--like", ctx / "rotate.onnx", small_fs / "m.big.onnx_adapter"],
            "merge-checkpoint": ["merge-checkpoint", "--base", ctx / "base", "--adapter", ctx / "road",
                                 small_fs / "merged"],
            "export": ["--base", "tiny-llama", "--adapter", ctx / "road", small_fs / "old.onnx"]}[command]
    if command == "adapter":  # the adapter file is small: fill the disk first
        fd = os.open(small_fs / "fill", os.O_WRONLY | os.O_CREAT)
        with pytest.raises(OSError):
            while True:
                os.write(fd, b"x" * 4096)
        os.close(fd)
    before = snapshot(small_fs)
    code, out, err = cli(capsys, *argv)
    line = assert_one_line(code, err, out, "No space left on device")
    assert str(small_fs) in line
    assert snapshot(small_fs) == before


def test_read_only_file_system(ctx, small_fs, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    code, out, err = cli(capsys, "optimize", ctx / "rotate.onnx", small_fs / "x.onnx")
    assert_one_line(code, err, out, "Read-only file system")
    code, out, err = cli(capsys, "--base", "tiny-llama", "--adapter", ctx / "road", small_fs / "x.onnx")
    assert_one_line(code, err, out, "Read-only file system")
    assert list(small_fs.iterdir()) == []


# ---- interrupted while writing ----

SLOW_WRITER = """
import importlib, sys, time
owner = importlib.import_module({module!r})
*path, name = {name!r}.split(".")
for part in path:
    owner = getattr(owner, part)
real = getattr(owner, name)
def slow(*args, **kwargs):
    result = real(*args, **kwargs)
    open({marker!r}, "w").close()  # the temporary output is written; the rename has not happened
    time.sleep(120)
    return result
setattr(owner, name, slow)
from road_export.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("command", "sig", "code"), [
    ("export", signal.SIGTERM, 143),
    ("optimize", signal.SIGTERM, 143),
    ("optimize", signal.SIGINT, 130),
    ("merge-checkpoint", signal.SIGTERM, 143),
    ("adapter", signal.SIGTERM, 143),
])
def test_interrupted_while_writing(ctx, tmp_path, command, sig, code):
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "writing"
    module, name, argv = {
        "export": ("onnx_ir", "save", ["--base", "tiny-llama", "--adapter", ctx / "road", out / "m.onnx"]),
        "optimize": ("onnx_ir", "save", ["optimize", ctx / "rotate.onnx", out / "m.onnx"]),
        "merge-checkpoint": ("road_export.export.checkpoint", "_write_shard",
                             ["merge-checkpoint", "--base", ctx / "base", "--adapter", ctx / "road", out / "merged"]),
        "adapter": ("onnxruntime", "AdapterFormat.export_adapter",
                    ["adapter", ctx / "road", "--like", ctx / "rotate.onnx", out / "m.onnx_adapter"]),
    }[command]
    if command == "adapter":
        (out / "m.onnx_adapter").write_bytes(b"the previous file")
    elif command != "merge-checkpoint":
        (out / "m.onnx").write_bytes(b"the previous file")
    before = snapshot(out)
    script = tmp_path / "slow.py"
    script.write_text(SLOW_WRITER.format(module=module, name=name, marker=str(marker)))
    proc = subprocess.Popen([sys.executable, str(script), *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()
    assert any(p.name.startswith(".") for p in out.iterdir())  # the temporary output is there now
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert snapshot(out) == before  # temporary files removed, the target untouched


# ---- RoadSession ----

@pytest.fixture(scope="module")
def session(ctx):
    return RoadSession(ctx / "rotate.onnx", native=False)


@pytest.fixture(scope="module")
def past_session(ctx):
    return RoadSession(ctx / "past.onnx", native=False)


IDS = np.arange(8, dtype=np.int64).reshape(2, 4) + 3
ONES = np.ones_like(IDS)

SESSION_CASES = [
    ("batch-0", {"input_ids": IDS[:0], "attention_mask": ONES[:0]}, {}, "empty on axis 0 (batch_size)"),
    ("sequence-0", {"input_ids": IDS[:, :0], "attention_mask": ONES[:, :0]}, {},
     "empty on axis 1 (sequence_length)"),
    ("mask-length", {"input_ids": IDS, "attention_mask": np.ones((2, 5), np.int64)}, {}, "they must agree"),
    ("mask-batch", {"input_ids": IDS, "attention_mask": ONES[:1]}, {},
     "attention_mask has batch_size 1, input_ids has 2"),
    ("ids-float", {"input_ids": IDS.astype(np.float32), "attention_mask": ONES}, {}, "dtype float32; rotate.onnx "
                                                                                    "takes int64"),
    ("mask-float", {"input_ids": IDS, "attention_mask": ONES.astype(np.float64)}, {}, "dtype float64"),
    ("ids-rank", {"input_ids": IDS[0], "attention_mask": ONES}, {}, "takes rank 2 [batch_size, sequence_length]"),
    ("unknown-input", {"input_ids": IDS, "attention_mask": ONES, "token_type_ids": ONES}, {}, "no input "
                                                                                             "token_type_ids"),
    ("missing-input", {"input_ids": IDS}, {}, "missing inputs ['attention_mask']"),
    ("adapter-ids-by-hand", {"input_ids": IDS, "attention_mask": ONES, "adapter_ids": IDS[:, 0]}, {},
     "leave it out"),
    ("names-vs-batch", {"input_ids": IDS, "attention_mask": ONES}, {"adapter_names": ["default"] * 3},
     "3 adapter names for a batch of 2 rows"),
    ("names-string", {"input_ids": IDS, "attention_mask": ONES}, {"adapter_names": "default"}, "one name per row"),
    ("names-none", {"input_ids": IDS, "attention_mask": ONES}, {"adapter_names": [None, "default"]},
     "give each row an adapter name"),
    ("unknown-adapter", {"input_ids": IDS, "attention_mask": ONES}, {"adapter": "nope"}, "holds ['default'] only"),
    ("unknown-output", {"input_ids": IDS, "attention_mask": ONES}, {"output_names": ["hidden"]}, "no output hidden"),
    ("not-a-mapping", [IDS, ONES], {}, "must be a mapping"),
    ("id-negative", {"input_ids": IDS - 4, "attention_mask": ONES}, {}, "token id -1; rotate.onnx takes ids 0 to 255"),
    ("id-vocab", {"input_ids": IDS + 248, "attention_mask": ONES}, {}, "token id 258; rotate.onnx takes ids 0 to 255"),
]


@pytest.mark.parametrize(("inputs", "kwargs", "says"), [c[1:] for c in SESSION_CASES],
                         ids=[c[0] for c in SESSION_CASES])
def test_session_bad_input(session, inputs, kwargs, says):
    with pytest.raises(RoadError) as caught:
        session.run(inputs, **kwargs)
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_onnxruntime_errors_are_not_logged(session, capfd):
    """Past the checks (run_feeds), onnxruntime's failure is one RoadError; its coloured error log stays quiet."""
    capfd.readouterr()
    with pytest.raises(RoadError, match="onnxruntime failed on inputs"):
        session.run_feeds(None, {"input_ids": IDS + 1000, "attention_mask": ONES})
    assert "onnxruntime" not in capfd.readouterr().err


def test_session_accepts_what_it_should(session):
    got = session.run({"input_ids": IDS.astype(np.int32), "attention_mask": ONES.astype(bool)})["logits"]
    assert got.shape == (2, 4, 256)  # integer and boolean arrays are converted to the model's int64


def test_session_with_cache_bad_input(past_session):
    heads, size = 2, 16
    past = {n: np.zeros((2, heads, 3, size), np.float32) for n in past_session.input_names
            if n.startswith("past_key_values.")}
    feeds = {"input_ids": IDS[:, :1], "position_ids": IDS[:, :1], **past}
    with pytest.raises(RoadError, match=r"attention_mask covers 2 positions; with 3 past and 1 new tokens it must "
                                        r"cover 4"):
        past_session.run({**feeds, "attention_mask": np.ones((2, 2), np.int64)})
    wrong = {n: np.zeros((2, heads + 1, 3, size), np.float32) for n in past}
    with pytest.raises(RoadError, match=r"has size 3 on axis 1; past.onnx takes "
                                        r"\[batch_size, 2, past_sequence_length, 16\]"):
        past_session.run({**feeds, **wrong, "attention_mask": np.ones((2, 4), np.int64)})
    empty = {n: np.zeros((2, heads, 0, size), np.float32) for n in past}  # a prefill: past length 0 is fine
    out = past_session.run({**feeds, **empty, "attention_mask": np.ones((2, 1), np.int64)})
    assert out["logits"].shape == (2, 1, 256)


@pytest.mark.parametrize(("ids", "options", "says"), [
    (IDS[:0], {}, "at least one row and one prompt token"),
    (IDS[:, :0], {}, "at least one row and one prompt token"),
    (IDS.astype(np.float32), {}, "integer token ids"),
    (IDS, {"attention_mask": ONES[:, :3]}, "attention_mask shape [2, 3] differs from input_ids shape [2, 4]"),
    (IDS, {"attention_mask": ONES * 2}, "0 (padding) and 1 (token)"),
    (IDS, {"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    (IDS, {"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1"),
    (IDS, {"adapter_names": ["default"]}, "1 adapter names for a batch of 2 rows"),
    (IDS + 1000, {}, "input_ids must lie in [0, 256)"),
    (IDS, {"pad_token_id": None}, "pad_token_id must be an integer"),
], ids=["batch-0", "prompt-0", "float-ids", "mask-shape", "mask-values", "max-new-0", "max-new-float",
        "names-vs-batch", "ids-range", "pad-none"])
@pytest.mark.parametrize("call", ["generate", "stream"])
def test_generation_bad_input(past_session, ids, options, says, call):
    options = dict(options)
    mask = options.pop("attention_mask", None)
    with pytest.raises(RoadError) as caught:
        result = getattr(past_session, call)(ids, mask, max_new_tokens=options.pop("max_new_tokens", 2), **options)
        list(result) if call == "stream" else None
    assert says in str(caught.value), str(caught.value)


# ---- .onnx_adapter files: only those made for this model ----

def test_adapter_discovery_takes_only_files_made_for_the_model(ctx, tmp_path, caplog):
    for name in ("rotate.onnx", "rotate.default.onnx_adapter"):
        shutil.copy(ctx / name, tmp_path / name)
    model = tmp_path / "rotate.onnx"
    records = json.loads(RoadSession(model, native=False).session.get_modelmeta()
                         .custom_metadata_map["road_export.swap"])
    values = {name: np.full(shape, 0.5, np.dtype(dtype)) for name, (shape, dtype) in swap.parameters(records).items()}
    shutil.copy(ctx / "rotate.default.onnx_adapter", tmp_path / "rotate.v2.default.onnx_adapter")  # a sibling's
    swap.write_adapter_file(tmp_path / "rotate.half.onnx_adapter",
                            {k: v.astype(np.float16) for k, v in values.items()})  # fp16 on an fp32 model
    swap.write_adapter_file(tmp_path / "rotate.part.onnx_adapter", dict(list(values.items())[2:]))  # another model
    swap.write_adapter_file(tmp_path / "rotate.good.onnx_adapter", values)
    session = RoadSession(model, native=False)
    assert session.adapters == ["default", "good"]
    assert "holds float16 values" in caplog.text and "was not made for rotate.onnx" in caplog.text
    with pytest.raises(RoadError, match=r"holds float16 values \(.*\), rotate.onnx takes float32"):
        session.load_adapter(tmp_path / "rotate.half.onnx_adapter")
    with pytest.raises(RoadError, match="was not made for rotate.onnx: 2 of its parameters missing"):
        session.load_adapter(tmp_path / "rotate.part.onnx_adapter")
    with pytest.raises(RoadError, match="not an onnxruntime adapter file"):
        (tmp_path / "junk.onnx_adapter").write_bytes(b"junk")
        session.load_adapter(tmp_path / "junk.onnx_adapter")
    fingerprint = int(session.session.get_modelmeta().custom_metadata_map["road_export.swap_fingerprint"])
    assert swap.read_adapter_file(tmp_path / "rotate.good.onnx_adapter")[0] == fingerprint
    assert swap.read_adapter_file(tmp_path / "rotate.default.onnx_adapter")[0] == fingerprint  # the export's own
    assert swap.read_adapter_file(tmp_path / "rotate.half.onnx_adapter")[0] != fingerprint
    a = session.run({"input_ids": IDS, "attention_mask": ONES}, adapter="good")["logits"]
    b = session.run({"input_ids": IDS, "attention_mask": ONES})["logits"]
    assert np.abs(a - b).max() > 1e-3  # the discovered file really is applied


@pytest.mark.parametrize(("name", "says"), [("empty.onnx", "onnxruntime cannot load it"),
                                            ("truncated.onnx", "onnxruntime cannot load it"),
                                            ("none.onnx", "no such ONNX file")])
def test_session_refuses_broken_files(ctx, name, says):
    with pytest.raises(RoadError, match=says):
        RoadSession(ctx / name, native=False)


def test_renames_are_not_split_by_a_signal():
    """deferred_signals holds SIGTERM back until the renames are done, then delivers it."""
    from road_export.graph.checks import deferred_signals

    got = []
    previous = signal.signal(signal.SIGTERM, lambda *_: got.append("delivered"))
    try:
        with deferred_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert got == []
        assert got == ["delivered"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def _onnxruntime_refuses(path):
    """A real onnxruntime failure on the user's model: a feed of the wrong type, past every check of ours."""
    import onnxruntime as ort

    ort.InferenceSession(str(path)).run(None, {"input_ids": IDS.astype(np.float32), "attention_mask": ONES})


def test_onnxruntime_failures_are_one_line(ctx, session, capsys, monkeypatch):
    with pytest.raises(RoadError, match=r"rotate.onnx: onnxruntime failed on inputs input_ids \[2, 4\]"):
        session.run_feeds(None, {"input_ids": IDS.astype(np.float32), "attention_mask": ONES})
    import road_export.app.verify

    monkeypatch.setattr(road_export.app.verify, "verify", lambda path, *a, **k: _onnxruntime_refuses(path))
    code, out, err = cli(capsys, "verify", ctx / "rotate.onnx", "--base", "tiny-llama", "--adapter", ctx / "road")
    assert_one_line(code, err, out, "rotate.onnx: onnxruntime cannot run it (")


@pytest.mark.parametrize("name", ["a.b", "__base__", "", "a b", "x/y"])
def test_adapter_names_are_checked_in_the_api(name):
    config = rx.RoadConfig(variant="road_1", group_size=8)
    with pytest.raises(RoadError, match="reserved|letters, digits"):
        rx.get_road_model(tiny("tiny-llama"), config, name)


# ---- damaged JSON files of a model directory ----

@pytest.mark.parametrize(("genai", "says"), [
    ('{"model": {"decoder": {"session_options": []}}}', "not an onnxruntime-genai config (no "
                                                        "model.decoder.session_options object); export the model "
                                                        "directory again with road-export"),
    ('{"model": ', "genai_config.json: not JSON (Expecting value"),
], ids=["session-options-list", "not-json"])
def test_kernels_genai_config_damaged(tmp_path, capsys, monkeypatch, genai, says):
    """`kernels --genai-config DIR` on a damaged genai_config.json: one line, the file unchanged, no library copied
    (the kernels themselves are not built here: a stand-in library)."""
    from road_export.graph import native

    library = tmp_path / "libroad_ort.so"
    library.write_bytes(b"a stand-in library")
    monkeypatch.setattr(native, "library_path", lambda: library)
    model = tmp_path / "model"
    model.mkdir()
    (model / "genai_config.json").write_text(genai)
    before = snapshot(model)
    code, out, err = cli(capsys, "kernels", "--genai-config", model)
    assert_one_line(code, err, out, says)
    assert snapshot(model) == before


def test_custom_ops_entry_of_another_kind_is_dropped(tmp_path):
    """Removing the custom_ops_library entry (library None) where it holds something else than a file name."""
    from road_export.graph.model_dir import set_custom_ops_library

    (tmp_path / "genai_config.json").write_text('{"model": {"decoder": {"session_options": '
                                                '{"custom_ops_library": 5}}}}')
    path = set_custom_ops_library(tmp_path, None)
    assert json.loads(path.read_text())["model"]["decoder"]["session_options"] == {}


@pytest.mark.parametrize(("config", "says"), [
    ("{", "tokenizer_config.json: not JSON (Expecting property name"),
    ("[]", "tokenizer_config.json: holds a JSON array, not an object"),
], ids=["not-json", "list"])
def test_serving_tokenizer_config_damaged(tmp_path, config, says):
    pytest.importorskip("tokenizers")
    from conftest import word_tokenizer

    from road_export.app.serving.text import TextTokenizer

    word_tokenizer(tmp_path, 16)
    (tmp_path / "tokenizer_config.json").write_text(config)
    with pytest.raises(RoadError) as caught:
        TextTokenizer(tmp_path)
    message = str(caught.value)
    assert says in message and "\n" not in message, message
    assert message.endswith(f"save the tokenizer again with tokenizer.save_pretrained('{tmp_path}')"), message


def test_serving_tokenizer_named_templates_of_another_kind(tmp_path):
    """A `chat_template` list holding something else than {name, template} objects: no template, not a crash."""
    pytest.importorskip("tokenizers")
    from conftest import word_tokenizer

    from road_export.app.serving.text import TextTokenizer

    word_tokenizer(tmp_path, 16)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = ["{{ messages }}"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert TextTokenizer(tmp_path).chat_template is None
