"""RoAd on onnxruntime-genai's model builder graphs on the GPU: tokens/s side by side in one run.

Model: a Llama with TinyLlama-1.1B widths (hidden 2048, MLP 5632, 32 heads, 4 KV heads, vocab 32000), 22 layers by
default, random weights (seed 0); RoAd road_4, group size 64, on all linear layers (seed 1), and 8 such adapters
(seeds 100..107) for the mixed form. Everything through onnxruntime-genai's generator on the CUDA provider, greedy,
prompt 32, 64 new tokens, batch 1 and 8, rounds interleaved (every runner once a round), medians of paired ratios:

    builder base              the builder's graph (`-p fp16|int4 -e cuda`), no RoAd
    builder base + graph      the same with onnxruntime's CUDA graphs (`enable_cuda_graph`)
    RoAd                      the same graph with one adapter attached, swappable (road-export attach: packed
                              parts side by side, coefficients overridable initializers + .onnx_adapter), the
                              rotations fused into their products (passes/linear_rotate.py: road.LinearRotate /
                              road.MatMulNBitsRotate, one launch each, road kernels named in genai_config.json)
    RoAd + graph              the same with CUDA graphs
    mixed                     8 adapters in one graph (adapter_ids), 8 rows on 8 adapters (batch 8)
    own export                road-export's own exporter (`--mode rotate --dtype float16`, text-generation-with-past)
                              run by a GPU RoadSession (fused GEMV kernels, IOBinding loop): what the builder path
                              replaces for LLMs (fp16 only)
    RoAd, RoadSession         the RoAd directory run by our runtime instead of genai's generator:
                              `RoadSession.generate` (IOBinding loop, the shared buffer written in place)
    RoAd / mixed, engine      the same through `road-export serve`'s engine (continuous batching, the cache kept in
                              device memory), 8 rows on 8 adapters for the mixed directory; tokens compared with
                              genai's on the same directory
    ... + graph (ours)        RoadSession and the engine on a session with onnxruntime's CUDA graphs: decode steps
                              on static buffers, recorded and replayed (road_export.runtime.graphs)

    python tools/bench_builder_gpu.py prep W [--layers 22]   # torch + CPU: HF model, adapters, builder graphs, RoAd,
                                                             # our own export
    python tools/bench_builder_gpu.py bench W OUT [--rounds 7] # onnxruntime-genai-cuda: the table, JSON in OUT
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import engine_runner  # noqa: E402

VOCAB, HIDDEN = 32000, 2048
PROMPT, NEW = 32, 64
ADAPTERS = 8


def config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=HIDDEN, intermediate_size=HIDDEN * 11 // 4, num_hidden_layers=layers,
                       num_attention_heads=HIDDEN // 64, num_key_value_heads=HIDDEN // 512, vocab_size=VOCAB,
                       max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)


def save_tokenizer(path: Path) -> None:
    """A word-level tokenizer over the vocabulary (the builder wants one; the benchmark feeds token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<unk>").save_pretrained(path)


def road_directory(base_dir: Path, adapters: list[Path], names: list[str], out: Path) -> None:
    """A genai directory: the builder's files, RoAd attached (swappable for one adapter, adapter_ids for several),
    the rotations fused for CUDA, the road kernels named in genai_config.json."""
    import shutil

    from road_export.passes.attach import attach
    from road_export.graph.files import load_model, save_model
    from road_export.passes.linear_rotate import LinearRotatePass

    out.mkdir(parents=True, exist_ok=True)
    for f in base_dir.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copy(f, out / f.name)
    staged = out / "attached"
    staged.mkdir(exist_ok=True)
    attach(base_dir / "model.onnx", adapters, staged / "model.onnx", names=names)
    model = load_model(staged / "model.onnx")
    result = LinearRotatePass()(model)
    print(f"{out.name}: fused {result.linear} LinearRotate, {result.nbits} MatMulNBitsRotate ({result.rows} per-row)",
          flush=True)
    save_model(model, out / "model.onnx", True)  # lazy tensors read from the staged files while they are written
    for swap in staged.glob("*.onnx_adapter"):
        shutil.move(swap, out / swap.name)
    shutil.rmtree(staged)
    subprocess.run([sys.executable, "-m", "road_export.app.cli", "kernels", "--genai-config", str(out)], check=True)


def prep(w: Path, layers: int) -> None:
    """The HF model, the adapters and the builder's fp16 and int4 CUDA graphs."""
    import peft
    import torch
    from transformers import LlamaForCausalLM

    w.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config(layers)).eval()
    base.save_pretrained(w / "hf")
    save_tokenizer(w / "hf")
    road = dict(variant="road_4", group_size=64, init_weights=False, target_modules="all-linear")
    for i, seed in [(-1, 1), *[(i, 100 + i) for i in range(ADAPTERS)]]:
        torch.manual_seed(seed)
        pm = peft.get_peft_model(copy.deepcopy(base), peft.RoadConfig(**road))
        pm.save_pretrained(w / ("adapter" if i < 0 else f"a{i}"))
    for precision, name in (("fp16", "gb16"), ("int4", "gb4")):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(w / "hf"), "-o",
                        str(w / name), "-p", precision, "-e", "cuda", "-c", str(w / "cache")], check=True,
                       capture_output=True)
        print(f"builder {precision}: {time.perf_counter() - start:.1f} s", flush=True)
    (w / "base.done").write_text("ok")


def prep_road(w: Path) -> None:
    """The RoAd directories on the builder's graphs (prep's second half: needs road-export, not torch)."""
    for name in ("gb16", "gb4"):
        road_directory(w / name, [w / "adapter"], ["default"], w / f"{name}_road")
        road_directory(w / name, [w / f"a{i}" for i in range(ADAPTERS)], [f"a{i}" for i in range(ADAPTERS)],
                       w / f"{name}_mixed")
    (w / "prep.done").write_text("ok")


def prep_own(w: Path) -> None:
    """Our own exporter's file of the same model and adapter (rotate, fp16, with a KV cache), as a user writes it."""
    (w / "own").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "road_export", "--base", str(w / "hf"), "--adapter", str(w / "adapter"),
                    "--mode", "rotate", "--dtype", "float16", "--task", "text-generation-with-past", "--no-verify",
                    "--quiet", str(w / "own" / "model.onnx")], check=True)
    print(f"road-export own export: {time.perf_counter() - start:.1f} s", flush=True)


def own_runner(path: Path, providers: list | None = None):
    """Greedy generation through a RoadSession (GPU by default: road_export.runtime.gpu.cuda_providers), NEW tokens."""
    from road_export.runtime import RoadSession
    from road_export.runtime.gpu import cuda_providers

    session = RoadSession(path, providers=providers or cuda_providers())

    def run(ids: np.ndarray) -> np.ndarray:
        return session.generate(ids, np.ones_like(ids), max_new_tokens=NEW)

    return run


def runner(model_dir: Path, cuda_graph: bool, adapter_ids: list[int] | None = None):
    import onnxruntime_genai as og

    cfg = og.Config(str(model_dir))
    cfg.clear_providers()
    cfg.append_provider("cuda")
    if cuda_graph:
        cfg.set_provider_option("cuda", "enable_cuda_graph", "1")
    model = og.Model(cfg)

    def run(ids: np.ndarray) -> np.ndarray:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + NEW, min_length=ids.shape[1] + NEW, do_sample=False,
                                  batch_size=ids.shape[0])
        gen = og.Generator(model, params)
        if adapter_ids is not None:
            gen.set_model_input("adapter_ids", np.asarray(adapter_ids[: ids.shape[0]], np.int64))
        gen.append_tokens(ids.astype(np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        return np.stack([np.asarray(gen.get_sequence(i)) for i in range(ids.shape[0])])

    return run


COMPARISONS = [  # (what, batch, numerator, denominator, goal)
    ("fp16 RoAd + graph / builder base + graph", 1, "fp16 RoAd + graph", "fp16 base + graph", 0.97),
    ("fp16 RoAd / builder base", 1, "fp16 RoAd", "fp16 base", None),
    ("fp16 RoAd / builder base", 8, "fp16 RoAd", "fp16 base", 0.97),
    ("fp16 8 rows on 8 adapters / builder base", 8, "fp16 mixed", "fp16 base", 0.95),
    ("int4 RoAd + graph / builder int4 + graph", 1, "int4 RoAd + graph", "int4 base + graph", 0.97),
    ("int4 RoAd / builder int4", 1, "int4 RoAd", "int4 base", None),
    ("int4 RoAd / builder int4", 8, "int4 RoAd", "int4 base", 0.97),
    ("int4 8 rows on 8 adapters / builder int4", 8, "int4 mixed", "int4 base", 0.95),
    ("fp16 own export / builder base", 1, "fp16 own export", "fp16 base", None),
    ("fp16 own export / builder base", 8, "fp16 own export", "fp16 base", None),
    ("fp16 RoAd, RoadSession / builder base", 1, "fp16 RoAd, RoadSession", "fp16 base", None),
    ("fp16 RoAd, RoadSession / builder base", 8, "fp16 RoAd, RoadSession", "fp16 base", None),
    ("fp16 RoAd, engine / builder base", 1, "fp16 RoAd, engine", "fp16 base", None),
    ("fp16 RoAd, engine / builder base", 8, "fp16 RoAd, engine", "fp16 base", None),
    ("fp16 mixed, engine / builder base", 8, "fp16 mixed, engine", "fp16 base", None),
    ("fp16 RoAd, RoadSession + graph / builder base + graph", 1, "fp16 RoAd, RoadSession + graph",
     "fp16 base + graph", None),
    ("fp16 RoAd, RoadSession + graph / builder base", 8, "fp16 RoAd, RoadSession + graph", "fp16 base", None),
    ("fp16 RoAd, engine + graph / builder base + graph", 1, "fp16 RoAd, engine + graph", "fp16 base + graph", None),
    ("fp16 RoAd, engine + graph / builder base", 8, "fp16 RoAd, engine + graph", "fp16 base", None),
    ("fp16 mixed, engine + graph / builder base", 8, "fp16 mixed, engine + graph", "fp16 base", None),
    ("fp16 RoAd, RoadSession + graph / genai, same directory + graph", 1, "fp16 RoAd, RoadSession + graph",
     "fp16 RoAd + graph", None),
    ("fp16 RoAd, engine + graph / genai, same directory + graph", 1, "fp16 RoAd, engine + graph",
     "fp16 RoAd + graph", None),
    ("fp16 RoAd, engine + graph / genai, same directory", 8, "fp16 RoAd, engine + graph", "fp16 RoAd", None),
    ("fp16 RoAd, engine / genai, same directory", 8, "fp16 RoAd, engine", "fp16 RoAd", None),
    ("fp16 mixed, engine + graph / genai mixed, same directory", 8, "fp16 mixed, engine + graph", "fp16 mixed",
     None),
]
SAME_DIRECTORY = {"fp16 RoAd, RoadSession": "fp16 RoAd", "fp16 RoAd, engine": "fp16 RoAd",
                  "fp16 mixed, engine": "fp16 mixed", "fp16 RoAd, RoadSession + graph": "fp16 RoAd",
                  "fp16 RoAd, engine + graph": "fp16 RoAd",
                  "fp16 mixed, engine + graph": "fp16 mixed"}  # our runtime's row: genai's on the same directory


def peft_tokens(w: Path, ids: np.ndarray) -> np.ndarray:
    """peft's own greedy tokens for `ids` (torch, fp16 on the GPU): the reference the RoAd directory's tokens are
    compared with (fp16 on both sides, so a late token may differ by rounding)."""
    import peft
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(w / "hf", dtype=torch.float16).cuda().eval()
    model = peft.PeftModel.from_pretrained(model, w / "adapter").eval()
    with torch.no_grad():
        t = torch.from_numpy(ids).cuda()
        out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=NEW, min_new_tokens=NEW,
                             do_sample=False, pad_token_id=0)
    del model
    torch.cuda.empty_cache()
    return out[:, ids.shape[1]:].cpu().numpy()


def bench(w: Path, out: Path, rounds: int, only: list[str] | None = None) -> None:
    import onnxruntime as ort

    from road_export.runtime.gpu import cuda_providers

    out.mkdir(parents=True, exist_ok=True)
    ids_of = list(range(1, ADAPTERS + 1))
    makers = {}
    for p, name in (("fp16", "gb16"), ("int4", "gb4")):
        makers |= {
            (f"{p} base", (1, 8)): lambda d=w / name: runner(d, False),
            # genai's CUDA graphs take one row (GroupQueryAttention: "batch_size must be 1 when sequence_length > 1
            # and past context is given" for a batch's prompt)
            (f"{p} base + graph", (1,)): lambda d=w / name: runner(d, True),
            (f"{p} RoAd", (1, 8)): lambda d=w / f"{name}_road": runner(d, False),
            (f"{p} RoAd + graph", (1,)): lambda d=w / f"{name}_road": runner(d, True),
            (f"{p} mixed", (8,)): lambda d=w / f"{name}_mixed": runner(d, False, ids_of),
        }
    if (w / "own" / "model.onnx").is_file():
        makers[("fp16 own export", (1, 8))] = lambda: own_runner(w / "own" / "model.onnx")
    makers[("fp16 RoAd, RoadSession", (1, 8))] = lambda: own_runner(w / "gb16_road" / "model.onnx")
    makers[("fp16 RoAd, engine", (1, 8))] = lambda: engine_runner(w / "gb16_road", ["default"] * 8, NEW,
                                                                  providers=cuda_providers(), cuda_graph=False)
    makers[("fp16 mixed, engine", (8,))] = lambda: engine_runner(w / "gb16_mixed", [f"a{i}" for i in range(ADAPTERS)],
                                                                 NEW, providers=cuda_providers(), cuda_graph=False)
    graphs = cuda_providers(cuda_graph=True)
    makers[("fp16 RoAd, RoadSession + graph", (1, 8))] = lambda: own_runner(w / "gb16_road" / "model.onnx", graphs)
    makers[("fp16 RoAd, engine + graph", (1, 8))] = lambda: engine_runner(w / "gb16_road", ["default"] * 8, NEW,
                                                                          providers=graphs)
    makers[("fp16 mixed, engine + graph", (8,))] = lambda: engine_runner(
        w / "gb16_mixed", [f"a{i}" for i in range(ADAPTERS)], NEW, providers=graphs)
    if only:
        makers = {key: make for key, make in makers.items() if any(word in key[0] for word in only)}
    runners, errors = {}, {}
    for key, make in makers.items():
        try:
            runners[key] = make()
        except Exception:
            errors[key[0]] = traceback.format_exc()[-1500:]
            print(f"setup {key[0]} failed:\n{errors[key[0]]}", flush=True)
    results: dict = {"onnxruntime": ort.__version__, "rounds": rounds, "tokens_per_s": {}, "ratios": {}}
    for batch in (1, 8):
        ids = np.random.default_rng(1).integers(3, VOCAB, (batch, PROMPT)).astype(np.int64)
        live, tokens = {}, {}
        for (name, batches), run in runners.items():
            if batch not in batches:
                continue
            try:
                tokens[name] = run(ids)[:, PROMPT:]
                run(ids)
                live[name] = run
            except Exception:
                errors[f"{name} b{batch}"] = traceback.format_exc()[-1500:]
                print(f"run {name} b{batch} failed:\n{errors[f'{name} b{batch}']}", flush=True)
        if batch == 1:
            try:
                reference = peft_tokens(w, ids)
                for name in ("fp16 RoAd", "fp16 RoAd + graph"):
                    if name in tokens:
                        agree = np.cumprod(tokens[name][0] == reference[0])
                        results[f"b1 {name} tokens equal to peft's (fp16), leading"] = int(agree.sum())
                        print(f"b1 {name}: first {int(agree.sum())} of {NEW} tokens equal peft's (torch fp16)",
                              flush=True)
            except Exception:
                errors["peft tokens"] = traceback.format_exc()[-1500:]
        for ours, theirs in SAME_DIRECTORY.items():
            if ours in tokens and theirs in tokens:
                agree = np.cumprod(tokens[ours] == tokens[theirs], axis=1).sum(1)
                results[f"b{batch} {ours} leading tokens equal to genai's"] = agree.tolist()
                print(f"b{batch} {ours}: leading tokens equal to genai's on the same directory {agree.tolist()} of "
                      f"{NEW}", flush=True)
        times = {n: [] for n in live}
        for _ in range(rounds):
            for name, run in live.items():
                start = time.perf_counter()
                run(ids)
                times[name].append(time.perf_counter() - start)
        for name in live:
            rate = batch * NEW / statistics.median(times[name])
            results["tokens_per_s"][f"b{batch} {name}"] = rate
            print(f"b{batch} {name:<22} {rate:9.1f} tok/s", flush=True)
        for what, b, num, den, goal in COMPARISONS:
            if b != batch or num not in times or den not in times:
                continue
            ratio = statistics.median(d / n for n, d in zip(times[num], times[den], strict=True))  # tokens/s ratio
            results["ratios"][f"b{batch} {what}"] = {"ratio": ratio, "goal": goal}
            mark = "" if goal is None else ("  meets" if ratio >= goal else "  MISSES") + f" {goal}"
            print(f"b{batch} {what:<44} {ratio:6.3f}x{mark}", flush=True)
    results["errors"] = errors
    (out / "bench_builder_gpu.json").write_text(json.dumps(results, indent=1, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["prep", "base", "road", "own", "bench"])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("out", type=Path, nargs="?", default=Path("."))
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", metavar="WORDS", help="bench: only the rows whose name holds one of these "
                        "comma-separated words (e.g. 'fp16 base,fp16 RoAd')")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.phase in ("prep", "base"):
        prep(args.workdir, args.layers)
    if args.phase in ("prep", "road"):
        prep_road(args.workdir)
    if args.phase in ("prep", "own"):
        prep_own(args.workdir)
    if args.phase == "bench":
        bench(args.workdir, args.out, args.rounds, args.only.split(",") if args.only else None)


if __name__ == "__main__":
    main()
