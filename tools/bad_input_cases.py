"""Every CLI bad-input case of tests/test_bad_input.py run through road_export.app.cli.main, as a Markdown table of
case, exit code, stderr (and whether anything was left behind); then the full and read-only file system cases
on a 192 KiB tmpfs (root only). Run from the repository root: python tools/bad_input_cases.py (no options)"""
import contextlib
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_bad_input as t  # noqa: E402
from conftest import plain_llama_in  # noqa: E402

from road_export.app.cli import main  # noqa: E402

if len(sys.argv) > 1:
    sys.exit(__doc__)  # `--help` (or anything) prints what it does; the run takes no options
root = Path(tempfile.mkdtemp())
inputs = t.build_inputs(root / "in", plain_llama_in(root / "plain"))
print("| case | exit | stderr |\n|---|---|---|")
for name, argv, says in t.CASES:
    out = Path(tempfile.mkdtemp(dir=root))
    args = t.case_args(argv, inputs, out)
    if "--external-data" in args:
        (out / "d.onnx.data").mkdir()
    before = t.snapshot(inputs, out)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(args)
    lines = err.getvalue().strip().splitlines()
    left = "" if t.snapshot(inputs, out) == before else " LEFT FILES"
    line = lines[0].replace(str(inputs), "IN").replace(str(out), "OUT") if lines else ""
    print(f"| {name} | {code}{left} | {len(lines)} line: `{line[:150]}` |")

print("\n| file system case | exit | stderr |\n|---|---|---|")
FS_CASES = ["optimize", "attach", "adapter", "merge-checkpoint", "export", "read-only optimize", "read-only export"]
for command in FS_CASES:
    mount = Path(tempfile.mkdtemp(dir=root))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(mount)]).returncode:
        print("| (cannot mount a tmpfs here: run as root) | | |")
        break
    try:
        (mount / "old.onnx").write_bytes(b"x" * 1000)
        argv = {"optimize": ["optimize", inputs / "rotate.onnx", mount / "old.onnx"],
                "attach": ["attach", inputs / "ext.onnx", "--adapter", inputs / "road", mount / "m.onnx"],
                "adapter": ["adapter", inputs / "road", "--like", inputs / "rotate.onnx", mount / "m.big.onnx_adapter"],
                "merge-checkpoint": ["merge-checkpoint", "--base", inputs / "base", "--adapter", inputs / "road",
                                     mount / "merged"],
                "export": ["--base", "tiny-llama", "--adapter", inputs / "road", mount / "old.onnx"],
                "read-only optimize": ["optimize", inputs / "rotate.onnx", mount / "x.onnx"],
                "read-only export": ["--base", "tiny-llama", "--adapter", inputs / "road", mount / "x.onnx"]}[command]
        if command == "adapter":
            fd = os.open(mount / "fill", os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(fd, b"x" * 4096)
            except OSError:
                os.close(fd)
        if command.startswith("read-only"):
            subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        before = t.snapshot(mount)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main([str(a) for a in argv])
        lines = err.getvalue().strip().splitlines()
        left = "" if t.snapshot(mount) == before else " LEFT FILES"
        line = lines[0].replace(str(mount), "FS").replace(str(inputs), "IN")[:160]
        print(f"| {command} | {code}{left} | {len(lines)} line: `{line}` |")
    finally:
        subprocess.run(["umount", "-l", str(mount)])
