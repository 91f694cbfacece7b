"""Peak memory of road-export's commands on a Llama-shaped model, each command in its own process.

    python tools/bench_scale.py                 # TinyLlama widths, 8 layers, float32: S ~ 1.9 GB of weights
    python tools/bench_scale.py --preset 7b     # Llama-7B shape, float16, 32 layers: S ~ 13.5 GB
    python tools/bench_scale.py --preset small  # a quick check of the tool itself (small16: its float16 path)

The base (random weights, fixed seed) is saved with transformers' `save_pretrained` (safetensors) and a peft RoAd
adapter (road_4 on every linear layer of the decoder, random theta/alpha) beside it, both in a child process. Then
each command runs as `python -m road_export.app.cli ...` in its own child; its peak RSS is the child's
`ru_maxrss` (os.wait4), wall time is measured around it. S is the bytes of the base's weights. The goal column is
issue 17's bound for that command. Wall times on a shared machine are noisy; the RSS ratios are what this measures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = {
    # hidden, intermediate, heads, kv heads, layers, vocab, dtype
    "small": (256, 704, 8, 2, 2, 32000, "float32"),
    "small16": (256, 704, 8, 2, 2, 32000, "float16"),  # the 7b preset's float16 path, small
    "medium": (1024, 2816, 16, 4, 4, 32000, "float32"),
    "tinyllama8": (2048, 5632, 32, 4, 8, 32000, "float32"),
    "7b": (4096, 11008, 32, 32, 32, 32000, "float16"),
}
GB = 1e9


def build(workdir: Path, preset: str, seed: int = 0) -> int:
    """Save base/ and adapter/ under `workdir` (in this process; call it in a child); returns S in bytes."""
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, heads, kv, layers, vocab, dtype = PRESETS[preset]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                         num_key_value_heads=kv, num_hidden_layers=layers, vocab_size=vocab,
                         max_position_embeddings=2048, tie_word_embeddings=False, torch_dtype=dtype)
    torch_dtype = getattr(torch, dtype)
    torch.set_default_dtype(torch_dtype)  # to_empty then allocates the weights once, in their dtype
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    torch.set_default_dtype(torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.model.rotary_emb.__init__(config)  # inv_freq, which to_empty left unset
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(workdir / "base", safe_serialization=True)
    road = peft.RoadConfig(variant="road_4", group_size=64, init_weights=False,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    torch.manual_seed(seed + 1)
    peft.get_peft_model(model, road).save_pretrained(workdir / "adapter")
    return size


def run(argv: list[str], log: Path) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of `python -m road_export.app.cli argv` in a child."""
    start = time.perf_counter()
    with open(log, "ab") as out:
        out.write(f"\n$ road-export {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen([sys.executable, "-m", "road_export.app.cli", *argv], stdout=out, stderr=out)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:  # stopped (SIGTERM from a time limit, Ctrl-C): the command removes its partial files
            proc.terminate()
            proc.wait()
            raise
    wall = time.perf_counter() - start
    return wall, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)


def commands(w: Path, dtype: str) -> list[tuple[str, list[str], str, str | None, tuple[str, ...]]]:
    """(label, argv, goal, output stem, stems of earlier outputs it reads) for each command, in order."""
    src = ["--base", str(w / "base"), "--adapter", str(w / "adapter"), "--dtype", dtype, "--quiet"]
    return [
        ("export merge, no verify", ["export", str(w / "merge.onnx"), *src, "--no-verify"], "1.3", "merge", ()),
        ("export rotate, no verify", ["export", str(w / "rotate.onnx"), *src, "--mode", "rotate", "--no-verify"],
         "1.3", "rotate", ()),
        ("export merge, with verify", ["export", str(w / "verified.onnx"), *src, "--atol", "1"], "2.3", "verified",
         ()),
        ("attach merge onto a base export (+.data)", ["attach", str(w / "plain.onnx"), "--adapter",
                                                      str(w / "adapter"), "--mode", "merge", str(w / "attached.onnx"),
                                                      "--quiet"], "0.35+0.5GB/S", "attached", ("merge",)),
        ("optimize --fold rotate.onnx", ["optimize", str(w / "rotate.onnx"), str(w / "folded.onnx"), "--fold",
                                         "--quiet"], "0.35+0.5GB/S", "folded", ("rotate",)),
        ("quantize int4: optimize merge.onnx --quantize int4", ["optimize", str(w / "merge.onnx"),
                                                                str(w / "merge_int4.onnx"), "--quantize", "int4",
                                                                "--quiet"], "0.35+0.5GB/S", "merge_int4", ("merge",)),
        ("export rotate --quantize int4, no verify", ["export", str(w / "int4.onnx"), *src, "--mode", "rotate",
                                                      "--quantize", "int4", "--no-verify"], "1.3", "int4", ()),
    ]


def plain_base(work: Path) -> None:
    """`plain.onnx`: merge.onnx's graph without its adapter record, its weights left in merge.onnx.data. attach
    refuses a file that records an adapter, and a merge export's graph is the base model's export with other
    values in the same tensors, so this measures attach on a base export of this size without a third export."""
    import onnx

    model = onnx.load(str(work / "merge.onnx"), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == "road_export.adapters":
            prop.value = "[]"  # as a base export records it
    onnx.save(model, str(work / "plain.onnx"))


def file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def goal_ok(goal: str, ratio: float, size: int) -> str:
    if goal == "-":
        return ""
    if goal.startswith("0.35"):
        bound = 0.35 + 0.5 * GB / size
    else:
        bound = float(goal)
    return "ok" if ratio <= bound else "OVER"


INTERPRETER_GB = 0.4  # resident before any weight: Python with torch, transformers and onnxruntime imported


def interpreter_note(size: int, rows: list[dict]) -> str | None:
    """A note under the table when rows read OVER on a model so small that the interpreter's own resident memory
    (INTERPRETER_GB) is a tenth of S or more: the RSS / S goals are meant for multi-GB models."""
    share = INTERPRETER_GB * GB / size
    if share < 0.1 or not any(r.get("verdict") == "OVER" for r in rows):
        return None
    return (f"note: S = {size / GB:.2f} GB is small: the interpreter alone (torch, transformers, onnxruntime "
            f"imported: about {INTERPRETER_GB} GB, {share:.2f} x S) dominates the peak here, so OVER on these rows "
            "says little; the goals are for multi-GB models (--preset 7b)")


def _stop(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tinyllama8")
    parser.add_argument("--workdir", help="where to build (default: a temporary directory, removed after)")
    parser.add_argument("--only", nargs="*", help="run only commands whose label starts with one of these, in "
                        "that order (later commands read merge.onnx / rotate.onnx: keep the exports first)")
    parser.add_argument("--keep", action="store_true", help="keep every output (default: outputs no later command "
                        "reads are deleted once measured and their sizes taken, which keeps a 7B run within a 64 GB "
                        "disk)")
    parser.add_argument("--json", help="write the rows as JSON here (rewritten after every command)")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)  # `timeout` on the device: the running command is stopped too
    if args.build_only:
        print(build(Path(args.workdir), args.preset))
        return 0
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_scale."))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    try:
        t0 = time.perf_counter()
        size = int(subprocess.check_output([sys.executable, __file__, "--build-only", "--preset", args.preset,
                                            "--workdir", str(work)]).split()[-1])
        print(f"preset {args.preset}: S = {size / GB:.2f} GB of weights (built in {time.perf_counter() - t0:.0f} s); "
              f"log: {log}", flush=True)
        dtype = PRESETS[args.preset][-1]
        rows: list[dict] = []
        sizes: dict[str, int] = {}  # output stem -> bytes (.onnx + .data), taken when written
        header = f"{'command':<50} {'wall s':>7} {'peak GB':>8} {'RSS/S':>6} {'goal':>13} {'':>4}"
        print(header, flush=True)
        selected = commands(work, dtype)
        if args.only:
            selected = [c for o in args.only for c in selected if c[0].startswith(o)]
        for index, (label, cmd, goal, stem, _reads) in enumerate(selected):
            if stem == "attached" and (work / "merge.onnx").exists():
                plain_base(work)
            wall, rss, code = run(cmd, log)
            ratio = rss / size
            verdict = goal_ok(goal, ratio, size) if code in (0, 1) else f"exit {code}"
            if goal.startswith("0.35"):
                goal = f"{0.35 + 0.5 * GB / size:.2f}"
            if (work / f"{stem}.onnx").exists():
                sizes[stem] = file_bytes(work / f"{stem}.onnx")
            rows.append({"command": label, "wall_s": wall, "peak_rss": rss, "ratio": ratio, "goal": goal,
                         "exit": code, "verdict": verdict})
            print(f"{label:<50} {wall:7.1f} {rss / GB:8.2f} {ratio:6.2f} {goal:>13} {verdict:>4}", flush=True)
            if args.json:  # after every command: a run stopped by a time limit keeps the rows it measured
                Path(args.json).write_text(json.dumps({"preset": args.preset, "S": size, "rows": rows,
                                                       "sizes": sizes}, indent=2))
            if not args.keep:  # outputs no later command reads (a 7B run's disk holds a few 13.5 GB files at most)
                needed = {r for later in selected[index + 1:] for r in later[4]}
                for name in set(sizes) - needed:
                    for f in [*work.glob(f"{name}.*"), *(work.glob("plain.*") if name == "merge" else [])]:
                        f.unlink()
        note = interpreter_note(size, rows)
        if note:
            print(note, flush=True)
        for name in ("merge", "merge_int4", "rotate", "int4"):
            if name in sizes:
                print(f"file size {name}.onnx (+.data): {sizes[name] / GB:.3f} GB", flush=True)
        for quantized, plain in (("int4", "rotate"), ("merge_int4", "merge")):
            if quantized in sizes and plain in sizes:
                print(f"file size {quantized} / {plain} ({dtype}): {sizes[quantized] / sizes[plain]:.3f} "
                      "(goal <= 0.40)", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
