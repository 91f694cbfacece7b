"""RoAd on onnxruntime-genai's model builder graph against the builder's base graph: genai generator tokens/s.

    python tools/bench_builder.py --work /tmp/bb [--hidden 1024 --layers 4 --threads 1 --rounds 7
                                  --precisions fp32,int4 --device cpu] [--steps | --engine]

Model: Llama (tools/benchlib.llama_config: heads of 64, 4 query heads per KV head), random weights (seed 0); RoAd
road_4 g=64 on all linear layers (seeds 1..8). Per precision the builder writes the base graph once (`-p fp32|int4
-e cpu`); `road_export.passes.attach` places the adapters on it:
  - "builder base"             the builder's graph as written
  - "builder base, re-saved"   the same graph loaded and saved by road-export's writer (road_export.graph.files), as the
                               RoAd files are: on the CPU this alone changes the step time (the writer aligns the
                               external data), so RoAd's own cost is the ratio against this one
  - "builder + RoAd"           one adapter, swappable (coefficients as overridable inputs, road.Rotate nodes)
  - "8 rows on 8 adapters"     the mixed form, 8 adapters, batch rows 1..8 through `adapter_ids` (batch 8 only)
each with the native road kernels registered (genai_config custom_ops_library; `--no-native` runs the road ops'
standard-op bodies). Greedy, prompt 32, 64 new tokens, batch 1 and 8, `intra_op_num_threads` = --threads.
Timed interleaved (base, road, mixed, base, road, mixed, ...), one generate per sample; medians of tokens/s and the
median of the paired ratios against the base of the same round (tools/benchlib.py's rule). Prints a table and writes
JSON with --json.

`--steps`: instead of genai's generator, one decode step (1 new token after 64 cached positions) on an onnxruntime
InferenceSession per file, 3 steps a sample, interleaved; adds "builder + RoAd, standard-op bodies" (no native
kernels). This is the graph's own cost, which the generator's per-token work dilutes.

`--engine`: `road-export serve`'s engine (road_export.app.serving.engine.Engine) on the two RoAd directories, its cache
kept as numpy arrays fed to `InferenceSession.run` ("host") against OrtValues bound through IOBinding, the shared
buffer written in place ("bound", `io_binding=True`), with genai's generator on the same directory beside them;
every row asks for 64 tokens (ignore_eos), all submitted at once; tokens/s and the paired speed ratio bound / host,
and whether both give genai's tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchlib import engine_runner, llama_config  # noqa: E402

PROMPT, NEW = 32, 64


def prepare(work: Path, hidden: int, layers: int, adapters: int) -> None:
    """The HF directory (with a word-level tokenizer) and `adapters` peft RoAd adapters, once."""
    if (work / "prep.done").is_file():
        return
    import peft
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    work.mkdir(parents=True, exist_ok=True)
    config = llama_config(hidden, layers, vocab=4000, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    base.save_pretrained(work / "hf")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, config.vocab_size)}}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<unk>").save_pretrained(work / "hf")
    for i in range(adapters):
        torch.manual_seed(1 + i)
        pm = peft.get_peft_model(copy.deepcopy(base), peft.RoadConfig(variant="road_4", group_size=64,
                                                                         init_weights=False,
                                                                         target_modules="all-linear"))
        pm.save_pretrained(work / f"adapter{i}")
    (work / "prep.done").write_text("ok")


def build(work: Path, precision: str, device: str, threads: int, native: bool, adapters: int) -> dict[str, Path]:
    """{variant: genai model directory} for one precision (built once, reused)."""
    from road_export.passes.attach import attach

    base = work / f"base_{precision}_{device}"
    if not (base / "model.onnx").is_file():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(work / "hf"), "-o",
                        str(base), "-p", precision, "-e", device, "-c", str(work / "cache")], check=True,
                       capture_output=True)
    dirs = {"builder base": base}
    resaved = work / f"resaved_{precision}_{device}"
    if not (resaved / "model.onnx").is_file():  # the same writer as the RoAd files: isolates RoAd's own cost
        from road_export.graph.files import load_model, save_model

        resaved.mkdir(parents=True, exist_ok=True)
        save_model(load_model(base / "model.onnx"), resaved / "model.onnx", True)
        for f in base.iterdir():
            if f.name.startswith("tokenizer"):
                shutil.copyfile(f, resaved / f.name)
    dirs["builder base, re-saved"] = resaved
    for variant, count in (("builder + RoAd (swappable)", 1), ("8 rows on 8 adapters", adapters)):
        target = work / f"{variant.split()[0]}_{count}_{precision}_{device}"
        if not (target / "model.onnx").is_file():
            target.mkdir(parents=True, exist_ok=True)
            attach(base / "model.onnx", [work / f"adapter{i}" for i in range(count)], target / "model.onnx",
                   names=[f"a{i}" for i in range(count)])
            for f in base.iterdir():
                if f.name.startswith("tokenizer"):
                    shutil.copyfile(f, target / f.name)
        dirs[variant] = target
    library = None
    if native:
        from road_export.graph import native as road_native

        library = road_native.library_path()
    for variant, d in dirs.items():
        genai = json.loads((base / "genai_config.json").read_text())
        options = genai["model"]["decoder"].setdefault("session_options", {})
        options["intra_op_num_threads"] = threads
        options["inter_op_num_threads"] = 1
        if library is not None and variant != "builder base":
            shutil.copyfile(library, d / ("road_ort" + Path(library).suffix))
            options["custom_ops_library"] = "road_ort" + Path(library).suffix
        else:
            options.pop("custom_ops_library", None)
        (d / "genai_config.json").write_text(json.dumps(genai, indent=4))
    return dirs


def runner(directory: Path, device: str, rows: np.ndarray | None):
    import onnxruntime_genai as og

    config = og.Config(str(directory))
    if device == "cuda":
        config.clear_providers()
        config.append_provider("cuda")
    model = og.Model(config)

    def run(ids: np.ndarray) -> np.ndarray:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + NEW, min_length=ids.shape[1] + NEW, do_sample=False,
                                  batch_size=ids.shape[0])
        generator = og.Generator(model, params)
        if rows is not None:
            generator.set_model_input("adapter_ids", rows[: ids.shape[0]])
        generator.append_tokens(ids.astype(np.int32))
        while not generator.is_done():
            generator.generate_next_token()
        return np.stack([np.asarray(generator.get_sequence(i)) for i in range(ids.shape[0])])

    return run


def step_runner(directory: Path, threads: int, native: bool, rows: np.ndarray | None, batch: int, past: int = 64):
    """One decode step of the directory's model.onnx on onnxruntime's CPU provider, `threads` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    if native:
        from road_export.graph import native as road_native

        options.register_custom_ops_library(str(road_native.library_path()))
    session = ort.InferenceSession(str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.full((batch, 1), 5, np.int64), "attention_mask": np.ones((batch, past + 1), np.int64)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            head = i.shape[3] if isinstance(i.shape[3], int) else 64
            feed[i.name] = np.zeros((batch, i.shape[1], past, head), np.float32)
        elif i.name == "adapter_ids":
            feed[i.name] = rows[:batch]

    def run() -> None:
        for _ in range(3):
            session.run(["logits"], feed)

    return run


def steps(args, dirs: dict[str, Path], precision: str, results: dict) -> None:
    rows = np.arange(1, 9, dtype=np.int64)
    for batch in map(int, args.batches.split(",")):
        runs = {name: step_runner(d, args.threads, name != "builder base" and not name.startswith("builder base,"),
                                  rows if name.startswith("8 rows") else None, batch)
                for name, d in dirs.items() if batch == 8 or not name.startswith("8 rows")}
        runs["builder + RoAd, standard-op bodies"] = step_runner(dirs["builder + RoAd (swappable)"], args.threads,
                                                                 False, None, batch)
        for run in runs.values():
            run()
        times: dict[str, list[float]] = {n: [] for n in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) / 3)
        again = times["builder base, re-saved"]
        for name, values in times.items():
            ratio = statistics.median(a / v for v, a in zip(values, again, strict=True))  # speed ratio
            results[f"steps {precision} b{batch} {name}"] = {"ms_per_step": statistics.median(values) * 1e3,
                                                             "speed_ratio_to_resaved_base": ratio}
            print(f"{precision:5} batch {batch}  {name:<36} {statistics.median(values) * 1e3:8.3f} ms/step   "
                  f"speed x re-saved base {ratio:.3f}", flush=True)


def engines(args, dirs: dict[str, Path], precision: str, adapters: int, results: dict) -> None:
    rows = np.arange(1, adapters + 1, dtype=np.int64)
    for variant, models in (("builder + RoAd (swappable)", ["a0"] * 8),
                            ("8 rows on 8 adapters", [f"a{i}" for i in range(adapters)])):
        for batch in map(int, args.batches.split(",")):
            if variant.startswith("8 rows") and batch != 8:
                continue
            ids = np.random.default_rng(batch).integers(3, 4000, (batch, PROMPT)).astype(np.int64)
            runs = {"genai": runner(dirs[variant], args.device, rows if variant.startswith("8 rows") else None),
                    "engine, host": engine_runner(dirs[variant], models, NEW, threads=args.threads, io_binding=False),
                    "engine, bound": engine_runner(dirs[variant], models, NEW, threads=args.threads, io_binding=True)}
            tokens = {name: run(ids) for name, run in runs.items()}
            for name in ("engine, host", "engine, bound"):
                same = bool(np.array_equal(tokens[name], tokens["genai"]))
                results[f"engine {precision} b{batch} {variant} {name} equals genai"] = same
                print(f"{precision:5} batch {batch}  {variant}, {name}: tokens {'equal' if same else 'DIFFER from'} "
                      "genai's", flush=True)
            times: dict[str, list[float]] = {n: [] for n in runs}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run(ids)
                    times[name].append(time.perf_counter() - start)
            host = times["engine, host"]
            for name, values in times.items():
                ratio = statistics.median(h / v for v, h in zip(values, host, strict=True))  # speed over host
                rate = batch * NEW / statistics.median(values)
                results[f"engine {precision} b{batch} {variant} {name}"] = {"tokens_per_s": rate,
                                                                            "speed_ratio_to_host": ratio}
                print(f"{precision:5} batch {batch}  {variant}, {name:<14} {rate:9.1f} tok/s   speed x engine on host "
                      f"arrays {ratio:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--precisions", default="fp32,int4")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--no-native", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--steps", action="store_true", help="time onnxruntime decode steps, not genai generation")
    parser.add_argument("--engine", action="store_true", help="time serve's engine, host arrays against IOBinding")
    args = parser.parse_args()
    adapters = 8
    prepare(args.work, args.hidden, args.layers, adapters)
    results = {}
    print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab 4000, road_4 g=64 all-linear; {args.device}, "
          f"{args.threads} thread(s), prompt {PROMPT}, {NEW} new tokens, {args.rounds} interleaved rounds, native "
          f"road kernels {'off' if args.no_native else 'on'}")
    for precision in args.precisions.split(","):
        dirs = build(args.work, precision, args.device, args.threads, not args.no_native, adapters)
        if args.steps:
            steps(args, dirs, precision, results)
            continue
        if args.engine:
            engines(args, dirs, precision, adapters, results)
            continue
        rows = np.arange(1, adapters + 1, dtype=np.int64)
        runs = {name: runner(d, args.device, rows if name.startswith("8 rows") else None)
                for name, d in dirs.items()}
        for batch in map(int, args.batches.split(",")):
            ids = np.random.default_rng(batch).integers(3, 4000, (batch, PROMPT)).astype(np.int64)
            live = {n: r for n, r in runs.items() if batch == 8 or not n.startswith("8 rows")}
            for run in live.values():  # warm-up
                run(ids)
            rates: dict[str, list[float]] = {n: [] for n in live}
            for _ in range(args.rounds):
                for name, run in live.items():
                    start = time.perf_counter()
                    run(ids)
                    rates[name].append(batch * NEW / (time.perf_counter() - start))
            base, again = rates["builder base"], rates["builder base, re-saved"]
            for name, values in rates.items():
                ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
                ratio2 = statistics.median(v / b for v, b in zip(values, again, strict=True))
                key = f"{precision} b{batch} {name}"
                results[key] = {"tokens_per_s": statistics.median(values), "ratio_to_base": ratio,
                                "ratio_to_resaved_base": ratio2, "all": values}
                print(f"{precision:5} batch {batch}  {name:<28} {statistics.median(values):9.1f} tok/s   "
                      f"x base {ratio:.3f}   x re-saved base {ratio2:.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
