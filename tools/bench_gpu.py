"""RoAd on onnxruntime's CUDA execution provider against the base model, every ratio measured side by side in one run.

Llama with TinyLlama-1.1B widths (hidden 2048, MLP 5632, 32 heads, 4 KV heads, vocab 32000), 8 layers, fp16,
road_4 (group size 64) on all linear layers (56 rotations), exported with --task text-generation-with-past.
IOBinding with every input and output in GPU memory (preallocated, so the same buffers on every run); each
figure is the median of paired ratios of interleaved runs (tools/benchlib.py: A B A B ...).

  - decode step with 256 cached positions at batch 1 and 8, and a prefill of 512 tokens at batch 1:
    base, merged, rotate on the road CUDA kernels (MatMul + rotation fused into road.MatMulRotate, as a GPU
    RoadSession opens it), the same kernels unfused (fuse=False), rotate on the road ops' standard-op bodies (stock
    onnxruntime-gpu), and the peft-traced anchor (torch.onnx.export of the peft model);
    the same for base and rotate with onnxruntime's CUDA graphs (enable_cuda_graph, same settings for both);
  - a mixed export of 8 road_4 all-linear adapters: 8 rows on 8 adapters against one adapter on all rows and
    against the base model's batch of 8 (fused, and unfused against the base);
  - RoadSession.generate tokens/s (GPU path: cache and logits on the GPU) against the base export;
  - parity: fp16 logits (kernels, bodies, merged) against torch fp32, and one rotation [512, 2048] in fp16 and
    bf16 on the CUDA kernel against torch fp32.

Two phases, so that the exports can run on the CPU onnxruntime while onnxruntime-gpu is being installed:

    python tools/bench_gpu.py export DIR [--layers 8]     # torch + CPU onnxruntime: the ONNX files, torch references
    python tools/bench_gpu.py bench DIR [--rounds 100]    # onnxruntime-gpu: the timings and the table
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchlib import interleave  # noqa: E402

TASK = "text-generation-with-past"
VOCAB = 32000
CACHE = 256
PREFILL = 512
ADAPTERS = 8
DEVICE = "cuda"  # --device cpu: a smoke test of this script on a machine without a GPU (no figures)


def config(layers: int, hidden: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                       num_attention_heads=hidden // 64, num_key_value_heads=hidden // 512,
                       vocab_size=VOCAB, max_position_embeddings=4096)


def providers(cuda_graph: bool = False):
    from road_export.runtime.gpu import cuda_providers

    return cuda_providers(cuda_graph=cuda_graph) if DEVICE == "cuda" else ["CPUExecutionProvider"]


def on_device(array: np.ndarray):
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), DEVICE, 0)


def export_all(root: Path, layers: int, hidden: int) -> None:
    """The ONNX files (fp16) and the torch fp32 reference logits of a fixed prompt."""
    import peft
    import torch
    from transformers import LlamaForCausalLM

    import road_export as rx
    from bench_generate import peft_traced_export

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config(layers, hidden)).eval()
    road_cfg = dict(variant="road_4", group_size=64, init_weights=False, target_modules="all-linear")
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.RoadConfig(**road_cfg)).eval()
    ours = rx.get_road_model(copy.deepcopy(base), rx.RoadConfig(**road_cfg))
    ours.load_state_dict({k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()
                          if "road_" in k}, strict=False)
    ids = np.random.default_rng(0).integers(3, VOCAB, (2, 24))
    with torch.no_grad():
        reference = theirs(input_ids=torch.from_numpy(ids)).logits.float().numpy()
        with theirs.disable_adapter():
            base_reference = theirs(input_ids=torch.from_numpy(ids)).logits.float().numpy()
    np.savez(root / "reference.npz", ids=ids, logits=reference, base_logits=base_reference)
    mixed = copy.deepcopy(base)
    for i in range(ADAPTERS):
        torch.manual_seed(100 + i)
        rx.get_road_model(mixed, rx.RoadConfig(**road_cfg), f"a{i}")
    jobs = {
        "base": lambda p: rx.export(base, p, task=TASK, require_adapter=False, dtype="float16"),
        "merged": lambda p: rx.export(ours, p, mode="merge", task=TASK, dtype="float16"),
        "rotate": lambda p: rx.export(ours, p, mode="rotate", task=TASK, dtype="float16"),
        "mixed": lambda p: rx.export(mixed, p, mode="rotate", task=TASK, dtype="float16"),
        "peft-traced": lambda p: peft_traced_export(copy.deepcopy(theirs).half(), p),
    }
    for name, job in jobs.items():
        start = time.perf_counter()
        try:
            job(root / f"{name}.onnx")
            print(f"exported {name:<12} {time.perf_counter() - start:6.1f} s", flush=True)
        except Exception:
            print(f"export of {name} failed:\n{traceback.format_exc()}", flush=True)
    (root / "done").write_text("ok")


# --- the GPU phase -----------------------------------------------------------------------------------------------


def positions(mask):
    from road_export.runtime.generation import positions as pos

    return pos(mask)


class Static:
    """One run of a session with every input and output bound to fixed GPU buffers: `call()` reruns it."""

    def __init__(self, session, feeds: dict, cache: dict | None = None):
        import onnxruntime as ort

        self.session = session
        self.io = session.session.io_binding()
        self.keep = []
        probe = session.session.io_binding()  # learn the output shapes, then bind preallocated buffers
        for name in session.input_names:
            value = cache[name] if cache and name in cache else on_device(feeds[name])
            self.keep.append(value)
            self.io.bind_ortvalue_input(name, value)
            probe.bind_ortvalue_input(name, value)
        for name in session.output_names:
            probe.bind_output(name, DEVICE, 0)
        session.session.run_with_iobinding(probe)
        self.outputs = {}
        for name, value in zip(session.output_names, probe.get_outputs(), strict=True):
            out = ort.OrtValue.ortvalue_from_shape_and_type(value.shape(), _numpy_type(value.data_type()), DEVICE, 0)
            self.outputs[name] = out
            self.io.bind_ortvalue_output(name, out)
        self.probe_outputs = dict(zip(session.output_names, probe.get_outputs(), strict=True))

    def call(self) -> None:
        self.session.session.run_with_iobinding(self.io)


def _numpy_type(ort_type: str):
    return {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(int64)": np.int64}[ort_type]


def prefill_feeds(session, batch: int, length: int, seed: int = 0, adapter_ids=None) -> dict:
    from road_export.runtime.generation import _empty_cache

    ids = np.random.default_rng(seed).integers(3, VOCAB, (batch, length))
    mask = np.ones((batch, length), np.int64)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask),
             **_empty_cache(session, batch)}
    if adapter_ids is not None:
        feeds["adapter_ids"] = np.asarray(adapter_ids, np.int64)
    return feeds


def decode_step(session, batch: int, adapter_ids=None) -> Static:
    """A decode step after CACHE cached positions, every tensor on the GPU."""
    from road_export.runtime.generation import PAST, PRESENT

    prefill = Static(session, prefill_feeds(session, batch, CACHE, adapter_ids=adapter_ids))
    cache = {PAST + n[len(PRESENT):]: v for n, v in prefill.probe_outputs.items() if n.startswith(PRESENT)}
    mask = np.ones((batch, CACHE + 1), np.int64)
    feeds = {"input_ids": np.full((batch, 1), 7, np.int64), "attention_mask": mask,
             "position_ids": positions(mask)[:, -1:]}
    if adapter_ids is not None:
        feeds["adapter_ids"] = np.asarray(adapter_ids, np.int64)
    return Static(session, feeds, cache)


def prefill_step(session, length: int = PREFILL) -> Static:
    return Static(session, prefill_feeds(session, 1, length))


def rotation_parity() -> list[str]:
    """One rotation [512, 2048] on the CUDA kernel in fp16 and bf16 against torch fp32."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto

    from road_export.graph import native

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from passes import testutil
    from test_gpu import torch_rotate
    from test_native import rotation_model

    lines = []
    rng = np.random.default_rng(0)
    c1, c2 = testutil.coefficients("road_4", 2048, 64, rng)
    x = rng.standard_normal((512, 2048)).astype(np.float32)
    reference = torch_rotate(*(torch.from_numpy(a).double() for a in (x, c1, c2)), 64).numpy()
    for label, dtype, io in (("fp16", TensorProto.FLOAT16, np.float16), ("bf16", TensorProto.BFLOAT16, np.float32)):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        native.register(options, True)
        s = ort.InferenceSession(rotation_model(c1, c2, 64, x_rank=2, dtype=dtype, bodies=False), options,
                                 providers=providers())
        got = s.run(None, {"x": x.astype(io)})[0].astype(np.float64)
        err = np.abs(got - reference).max()
        lines.append(f"one rotation [512, 2048] {label} (CUDA kernel) vs torch fp32: max abs {err:.2e}, "
                     f"relative {err / np.abs(reference).max():.2e}")
    return lines


def bench(root: Path, rounds: int, inner: int, new_tokens: int, skip: list[str]) -> None:
    import onnxruntime as ort

    from road_export.runtime.session import RoadSession

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}", flush=True)
    rows: list[tuple[str, str, str]] = []  # (section, label, figure)
    results: dict = {}

    def section(title, fn):
        if any(word in title for word in skip):
            return
        print(f"\n== {title}", flush=True)
        try:
            fn()
        except Exception:
            message = traceback.format_exc()
            print(message, flush=True)
            rows.append((title, "FAILED", message.strip().splitlines()[-1][:160]))

    files = {n: root / f"{n}.onnx" for n in ("base", "merged", "rotate", "mixed", "peft-traced")}
    sessions = {}

    def load():
        for name, path in files.items():
            if not path.is_file():
                print(f"  {name}: no export", flush=True)
                continue
            start = time.perf_counter()
            sessions[name] = RoadSession(path, providers=providers())
            if name in ("rotate", "mixed"):
                sessions[f"{name}, unfused"] = RoadSession(path, providers=providers(), fuse=False)
            if name == "rotate":  # fused, but every product on cuBLAS then the rotation (no one-launch GEMV)
                os.environ["ROAD_EXPORT_GEMV"] = "0"
                sessions["rotate, fused on cuBLAS"] = RoadSession(path, providers=providers())
                del os.environ["ROAD_EXPORT_GEMV"]
            if name == "rotate":
                sessions["rotate, bodies"] = RoadSession(path, providers=providers(), native=False)
                assert sessions["rotate"].native and not sessions["rotate, bodies"].native
            print(f"  loaded {name:<12} native={sessions[name].native} fused={sessions[name].fused} "
                  f"{time.perf_counter() - start:5.1f} s", flush=True)

    section("sessions", load)

    def ratio_vs(a: Static, b: Static, names) -> tuple[float, float, float]:
        for _ in range(5):
            a.call()
            b.call()
        cmp = interleave(a.call, b.call, rounds=rounds, inner=inner, names=names)
        print("  " + cmp.line(), flush=True)
        return cmp.median_a, cmp.median_b, cmp.ratio

    table: dict[str, dict[str, str]] = {"base": {}}

    def step_table():
        shapes = {"batch 1": lambda s: decode_step(s, 1), "batch 8": lambda s: decode_step(s, 8),
                  f"prefill {PREFILL}": lambda s: prefill_step(s)}
        for column, make in shapes.items():
            base = make(sessions["base"])
            base_times = []
            for name in ("merged", "rotate", "rotate, fused on cuBLAS", "rotate, unfused", "rotate, bodies",
                         "peft-traced"):
                if name not in sessions:
                    continue
                try:
                    other = make(sessions[name])
                    a, b, r = ratio_vs(other, base, (f"{name} {column}", f"base {column}"))
                    base_times.append(b)
                    table.setdefault(name, {})[column] = f"{r:.3f} x"
                    if name.startswith("rotate"):
                        print(f"    {(a - b) / 56 * 1e6:.1f} us per rotation node ({name}, {column})", flush=True)
                    del other
                except Exception as e:
                    table.setdefault(name, {})[column] = f"failed: {str(e).splitlines()[0][:60]}"
            if base_times:
                table.setdefault("base", {})[column] = f"{statistics.median(base_times) * 1e3:.2f} ms"
        results["steps"] = table

    section(f"decode step with {CACHE} cached positions, prefill {PREFILL} (fp16, IOBinding on the GPU)", step_table)

    graph_table: dict[str, dict[str, str]] = {}

    def graphs():
        for column, make in {"batch 1": lambda s: decode_step(s, 1), "batch 8": lambda s: decode_step(s, 8),
                             f"prefill {PREFILL}": lambda s: prefill_step(s)}.items():
            pair = {}
            for name in ("base", "rotate"):
                s = RoadSession(files[name], providers=providers(cuda_graph=True))
                pair[name] = make(s)
                for _ in range(3):  # onnxruntime runs, then captures, then replays
                    pair[name].call()
            a, b, r = ratio_vs(pair["rotate"], pair["base"], (f"rotate+graph {column}", f"base+graph {column}"))
            graph_table.setdefault("base, CUDA graph", {})[column] = f"{b * 1e3:.2f} ms"
            graph_table.setdefault("rotate, CUDA graph", {})[column] = f"{r:.3f} x"
            del pair
        results["graphs"] = graph_table

    section("the same with onnxruntime CUDA graphs (enable_cuda_graph) for base and rotate", graphs)

    def mixed():
        s = sessions["mixed"]
        eight = decode_step(s, 8, adapter_ids=list(range(1, ADAPTERS + 1)))
        one = decode_step(s, 8, adapter_ids=[1] * 8)
        base8 = decode_step(sessions["base"], 8)
        _, _, r1 = ratio_vs(eight, one, ("8 rows on 8 adapters", "one adapter x 8"))
        _, _, r2 = ratio_vs(eight, base8, ("8 rows on 8 adapters", "base batch 8"))
        results["mixed"] = {"vs one adapter": r1, "vs base batch 8": r2}
        rows.append(("mixed", "8 rows on 8 adapters / one adapter on all 8 rows", f"{r1:.3f} x"))
        rows.append(("mixed", "8 rows on 8 adapters / base batch 8", f"{r2:.3f} x"))
        if "mixed, unfused" in sessions:
            unfused = decode_step(sessions["mixed, unfused"], 8, adapter_ids=list(range(1, ADAPTERS + 1)))
            _, _, r3 = ratio_vs(unfused, base8, ("8 rows on 8 adapters, unfused", "base batch 8"))
            results["mixed"]["unfused vs base batch 8"] = r3
            rows.append(("mixed", "8 rows on 8 adapters, MatMul and rotation unfused / base batch 8", f"{r3:.3f} x"))

    section("mixed export: 8 road_4 all-linear adapters, decode step at batch 8", mixed)

    def generate():
        ids = np.random.default_rng(1).integers(3, VOCAB, (1, 32))
        rates: dict[str, list[float]] = {"base": [], "rotate": []}
        outputs = {n: sessions[n].generate(ids, max_new_tokens=8) for n in rates}  # warm-up
        assert outputs["base"].shape == outputs["rotate"].shape
        for _ in range(9):
            for name in rates:
                start = time.perf_counter()
                sessions[name].generate(ids, max_new_tokens=new_tokens)
                rates[name].append(new_tokens / (time.perf_counter() - start))
        r = statistics.median(a / b for a, b in zip(rates["rotate"], rates["base"], strict=True))
        line = (f"rotate {statistics.median(rates['rotate']):.1f} tokens/s, base {statistics.median(rates['base']):.1f}"
                f" tokens/s (batch 1, prompt 32, {new_tokens} new, greedy)")
        print("  " + line, flush=True)
        rows.append(("generate", line, f"{r:.3f} x"))
        results["generate"] = r

    section("RoadSession.generate on the GPU, tokens/s", generate)

    def parity():
        ref = np.load(root / "reference.npz")
        feeds_np = {"input_ids": ref["ids"], "attention_mask": np.ones_like(ref["ids"])}
        feeds_np["position_ids"] = positions(feeds_np["attention_mask"])
        for name, expected in (("rotate", ref["logits"]), ("rotate, bodies", ref["logits"]),
                               ("merged", ref["logits"]), ("base", ref["base_logits"])):
            from road_export.runtime.generation import _empty_cache

            s = sessions[name]
            got = s.run_on_device({**feeds_np, **_empty_cache(s, 2)}, output_names=["logits"])["logits"].numpy()
            err = np.abs(got.astype(np.float32) - expected).max()
            line = f"fp16 {name} logits vs torch fp32: max abs {err:.2e}, relative {err / np.abs(expected).max():.2e}"
            print("  " + line, flush=True)
            rows.append(("parity", line, ""))
        for line in rotation_parity():
            print("  " + line, flush=True)
            rows.append(("parity", line, ""))

    section("parity against torch fp32", parity)

    columns = ["batch 1", "batch 8", f"prefill {PREFILL}"]
    print(f"\n| export (decode step, {CACHE} cached; fp16; IOBinding on the GPU) | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, cells in {**table, **graph_table}.items():
        print(f"| {name} | " + " | ".join(cells.get(c, "") for c in columns) + " |")
    for title, label, figure in rows:
        print(f"{title}: {label} {figure}")
    (root / "results.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("phase", choices=("export", "bench"))
    parser.add_argument("dir", type=Path)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument("--new", type=int, default=64, help="new tokens per generate call")
    parser.add_argument("--skip", default="", help="comma-separated words: skip the sections whose title has one")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if args.phase == "export":
        export_all(args.dir, args.layers, args.hidden)
    else:
        bench(args.dir, args.rounds, args.inner, args.new, [w for w in args.skip.split(",") if w])


if __name__ == "__main__":
    main()
