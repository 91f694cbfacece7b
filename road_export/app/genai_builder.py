"""One command to onnxruntime-genai's fast graph: the model builder's graph with RoAd attached, as a model directory.

    road-export --graph builder --base HF_DIR --adapter [NAME=]DIR [--adapter ...] --mode rotate OUT_DIR

runs onnxruntime-genai's model builder (`python -m onnxruntime_genai.models.builder -i HF_DIR -o ... -p fp32|fp16|
bf16|int4|int8 -e cpu|cuda`, its public command line, in a child process: the builder is the field's library and is
not re-implemented here), places the adapters on its graph (road_export.passes.attach.attach_builder) and writes, staged
beside OUT_DIR and renamed into place at the end (files.atomic_write):

    OUT_DIR/
      genai_config.json         the builder's, with model.decoder.filename = "onnx/model.onnx" and (rotate mode, when
                                the kernels build here) model.decoder.session_options.custom_ops_library = road_ort.so
      onnx/model.onnx (+ .data) the builder's graph with road.Rotate nodes (metadata road_export.graph = genai-builder);
                                for -e cuda each product and its rotation as one road.LinearRotate /
                                road.MatMulNBitsRotate node (passes/linear_rotate.py: one CUDA launch, CUDA-graph safe)
      onnx/model.<name>.onnx_adapter   one adapter, rotate mode (not --fixed): its coefficients, for og.Adapters
      road_ort.so               the native road kernels (rotate mode)
      config.json, generation_config.json, tokenizer files   from HF_DIR / the builder

Parity is checked against peft (transformers + peft.PeftModel on HF_DIR, an independent reference): one prefill
of batch 2 on onnxruntime against peft's forward, float32 max abs error <= atol (1e-4 by default), float16/bfloat16
2e-2, int4/int8 by cosine >= 0.98 (as the project judges quantized files); mixed graphs row by row (adapter_ids).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


from road_export.core.errors import RoadError

__all__ = ["AUTO_ARCHITECTURES", "BuilderResult", "available", "build", "choose_graph", "precision"]

# families whose builder graphs use the projection names road_export.passes.builder_graph maps (Llama, Qwen2, Phi-3
# tested)
AUTO_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                      "Phi3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM")
BUILDER_MODULE = "onnxruntime_genai.models.builder"


@dataclass
class BuilderResult:
    """What `build` wrote: the directory, its files, the builder's command line, placements and the parity rows
    (each {"case", "max_abs", "cosine", "ok"})."""

    path: Path
    files: list[str]
    command: list[str]
    road_nodes: int = 0
    placed: int = 0
    fused: int = 0  # -e cuda: products fused with their rotation (road.LinearRotate / road.MatMulNBitsRotate)
    adapter_files: list[str] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every parity row passed."""
        return all(r["ok"] for r in self.rows)


def available() -> bool:
    """Whether onnxruntime-genai's model builder can be imported here (nothing is imported)."""
    import importlib.util

    try:
        return importlib.util.find_spec(BUILDER_MODULE) is not None
    except (ImportError, ValueError):
        return False


def precision(dtype: str, quantize: str | None) -> str:
    """The builder's `-p` for road-export's --dtype / --quantize: int4/int8, else fp32/fp16/bf16."""
    if quantize is not None:
        return quantize
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype]


def choose_graph(graph: str, base: str | None, *, directory: bool, task: str | None, blockers: Sequence[str]
                 ) -> tuple[str, str]:
    """("builder" | "road", why) for `--graph` (auto, builder or road).

    auto picks the builder for a model directory output of a transformers directory whose architecture is in
    AUTO_ARCHITECTURES, a text-generation task (or none given), no option only our exporter has (`blockers`, e.g.
    "--opset") and onnxruntime-genai installed; road-export's own exporter otherwise. builder refuses (RoadError)
    what the builder path cannot do; road is road-export's exporter."""
    if graph == "road":
        return "road", "--graph road"
    problems = []
    arch = None
    if not directory:
        problems.append("the output is one ONNX file, not a model directory")
    if base is None or not Path(base).is_dir() or not (Path(base) / "config.json").is_file():
        problems.append("--base is not a transformers directory with config.json")
    else:
        config = Path(base) / "config.json"
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            problems.append(f"{config} is not readable JSON")
        else:
            names = data.get("architectures") if isinstance(data, dict) else None
            if not isinstance(data, dict) or not (names is None or isinstance(names, list) and all(
                    isinstance(n, str) for n in names)):
                problems.append(f"{config} is not a transformers config (a JSON object, its architectures a list of "
                                "class names)")
            else:
                arch = names[0] if names else None
    if task is not None and task not in ("text-generation", "text-generation-with-past", "causal-lm",
                                         "causal-lm-with-past"):
        problems.append(f"task {task} is not text generation")
    problems += [f"{b} applies to road-export's exporter only" for b in blockers]
    if not available():
        problems.append("onnxruntime-genai is not installed (pip install onnxruntime-genai)")
    if graph == "builder":
        if problems:
            raise RoadError(f"--graph builder: {problems[0]}; drop --graph builder for road-export's own exporter")
        return "builder", f"--graph builder ({arch})"
    if arch is not None and arch not in AUTO_ARCHITECTURES:
        problems.insert(0, f"architecture {arch} is not one auto sends to the builder "
                           f"({', '.join(AUTO_ARCHITECTURES)})")
    if problems:
        return "road", f"--graph auto: {problems[0]}"
    return "builder", f"--graph auto: {arch} is a decoder LLM family the model builder supports"


def _run_builder(base: Path, out: Path, cache: Path, prec: str, provider: str, extra: Sequence[str]) -> list[str]:
    command = [sys.executable, "-m", BUILDER_MODULE, "-i", str(base), "-o", str(out), "-p", prec, "-e", provider,
               "-c", str(cache), *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not (out / "model.onnx").is_file():
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        last = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines
                    else f"exit code {done.returncode}")
        hint = ("; the builder needs the base's tokenizer files (tokenizer.json, tokenizer_config.json: "
                "tokenizer.save_pretrained(BASE))" if "tokenizer" in last.lower() else "")
        raise RoadError(f"{base}: onnxruntime-genai's model builder failed (-p {prec} -e {provider}): {last[:300]}"
                        f"{hint}")
    return command


def build(base: str | os.PathLike, adapters: Sequence[tuple[str, str | os.PathLike]], out_dir: str | os.PathLike, *,
          mode: str = "rotate", dtype: str = "float32", quantize: str | None = None, provider: str = "cpu",
          swappable: bool = True, custom_ops_library: str | None = None, verify: bool = True,
          atol: float | None = None, builder_options: Sequence[str] = (), on_step=None) -> BuilderResult:
    """Build `out_dir` (see the module docstring) from a transformers directory and peft adapters [(name, dir)].

    Raises RoadError (one line; nothing left at `out_dir`) for an `out_dir` that exists and is not empty, a failed
    builder run, adapters that cannot be placed (road_export.passes.attach.attach_builder), merge into int4/int8."""
    from road_export.graph import model_dir
    from road_export.graph.adapter_files import read_adapter
    from road_export.passes.attach import attach_builder, check_no_adapter, record_attached
    from road_export.graph.files import atomic_write, load_model, save_model
    from road_export.core.names import GRAPH_BUILDER, METADATA_GRAPH

    step = on_step or (lambda _: None)
    base, out_dir = Path(base), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise RoadError(f"{out_dir}: exists and is not empty; choose a new directory for the model")
    files = {name: read_adapter(path) for name, path in adapters}
    if mode == "merge" and quantize is not None:
        raise RoadError(f"--mode merge with --quantize {quantize} on the builder path: a rotation cannot be folded "
                        "into quantized weights; use --mode rotate, or merge first (road-export merge-checkpoint) "
                        "and build the merged directory")
    prec = precision(dtype, quantize)
    with atomic_write(out_dir) as tmp:
        built = tmp / ".builder"
        step(f"building the graph with onnxruntime-genai's model builder (-p {prec} -e {provider})")
        command = _run_builder(base, built, tmp / ".builder_cache", prec, provider, builder_options)
        result = BuilderResult(out_dir, [], command)
        (tmp / "onnx").mkdir()
        model = load_model(built / "model.onnx")

        if files:
            step("placing the adapters on the builder graph")
            report = attach_builder(model, files, mode, swappable=swappable, where=str(base))
            result.road_nodes, result.placed = report.road_nodes, len(report.placed)
            record_attached(model, list(files.items()), mode, report.placed)
            if provider == "cuda" and mode == "rotate":
                # genai opens the file as it is: each product and its rotation become one node here, for the road
                # CUDA kernel (passes/linear_rotate.py); their standard-op bodies keep the file portable
                from road_export.passes.linear_rotate import LinearRotatePass

                fused = LinearRotatePass()(model)
                result.fused = fused.linear + fused.nbits
        else:
            check_no_adapter(dict(model.metadata_props), built / "model.onnx")
            report = None
        model.metadata_props[METADATA_GRAPH] = GRAPH_BUILDER
        step("saving")
        save_model(model, tmp / model_dir.MODEL_FILE, True)
        del model
        if report is not None:
            from road_export.graph import swap

            for name, values in report.swap_values.items():
                path = swap.write_adapter_file(swap.adapter_file_path(tmp / model_dir.MODEL_FILE, name), values)
                result.adapter_files.append(str(path.relative_to(tmp)))
        genai = json.loads((built / model_dir.GENAI_CONFIG).read_text())
        decoder = genai["model"]["decoder"]
        decoder["filename"] = model_dir.MODEL_FILE
        if custom_ops_library is not None and files and mode == "rotate":
            name = model_dir.library_name(custom_ops_library)
            shutil.copyfile(custom_ops_library, tmp / name)
            decoder.setdefault("session_options", {})["custom_ops_library"] = name
        (tmp / model_dir.GENAI_CONFIG).write_text(json.dumps(genai, indent=4) + "\n")
        for extra in sorted(built.iterdir()):
            if extra.is_file() and not extra.name.startswith("model.onnx") and extra.name != model_dir.GENAI_CONFIG:
                shutil.copyfile(extra, tmp / extra.name)
        for name in (model_dir.CONFIG, model_dir.GENERATION_CONFIG, *model_dir.TOKENIZER_FILES):
            if (base / name).is_file() and not (tmp / name).exists():
                shutil.copyfile(base / name, tmp / name)
        shutil.rmtree(built)
        shutil.rmtree(tmp / ".builder_cache", ignore_errors=True)
        # a -e cuda graph holds CUDA-only kernels, and onnxruntime's CPU provider lacks bfloat16 kernels the builder's
        # bf16 graph uses (Where): those are checked where they run
        if verify and provider == "cpu" and dtype != "bfloat16":
            step("verifying against peft")
            from road_export.app.parity.builder_reference import verify_builder

            result.rows = verify_builder(tmp / model_dir.MODEL_FILE, base, list(files.items()),
                                         quantized=quantize is not None, dtype=dtype, atol=atol)
        result.files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    return result
