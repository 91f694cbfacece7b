"""Model directories (`road-export ... OUT_DIR`) as onnxruntime-genai, optimum and transformers.js load them.

One tiny Llama with a byte-level BPE tokenizer trained here (the `tokenizers` library; nothing downloaded), two
peft RoAd adapters, and three directories exported once per module: merged, rotate (one adapter, swappable) and
rotate with both adapters (adapter_ids). peft's own `generate` is the reference for every greedy token.
optimum and transformers.js live in other environments: their tests run when ROAD_EXPORT_OPTIMUM_PYTHON (a python
with optimum-onnx) or ROAD_EXPORT_TRANSFORMERS_JS (a directory with node_modules/@huggingface/transformers) is set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers

import road_export.graph.ops as road_ops
from road_export.graph import model_dir
from road_export.app.cli import main
from road_export.runtime.session import RoadSession

warnings.filterwarnings("ignore")
peft = pytest.importorskip("peft")

PROMPT = "the quick brown fox"
NEW_TOKENS = 8
OTHER_ROW = [12, 40, 77, 101, 5]  # a second prompt, as token ids, for the mixed batch
ADAPTED = ["q_proj", "v_proj", "o_proj"]


def run(*args) -> int:
    return main([str(a) for a in args])


def make_base(root: Path) -> Path:
    """A tiny Llama whose vocabulary is a byte-level BPE tokenizer trained on a few sentences, saved as transformers
    saves a fast tokenizer (tokenizer.json + tokenizer_config.json) beside config and weights."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = ["the quick brown fox jumps over the lazy dog", "road adapters rotate the outputs of linear layers",
            "onnx runtime runs the exported graph", "hello world"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                          eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    from road_export.export import zoo

    config = transformers.AutoConfig.from_pretrained(zoo.models_dir() / "tiny-llama")
    config.vocab_size = len(fast)
    config.bos_token_id = config.eos_token_id = fast.eos_token_id
    torch.manual_seed(0)
    base = root / "base"
    transformers.LlamaForCausalLM(config).eval().save_pretrained(base)
    fast.save_pretrained(base)
    return base


def make_adapter(base: Path, path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    config = peft.RoadConfig(variant="road_1", group_size=8, init_weights=False, target_modules=ADAPTED)
    peft.get_peft_model(model, config).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_dir")
    base = make_base(root)
    road, road2 = make_adapter(base, root / "road", 3), make_adapter(base, root / "road2", 4)
    assert run("--base", base, "--adapter", road, root / "merged", "--quiet") == 0  # verified against peft
    assert run("--base", base, "--adapter", road, "--mode", "rotate", root / "rotate", "--no-verify", "--quiet") == 0
    assert run("--base", base, "--adapter", f"road={road}", "--adapter", f"road2={road2}", "--mode", "rotate",
               root / "mixed", "--no-verify", "--quiet") == 0
    return {"root": root, "base": base, "road": road, "road2": road2, "merged": root / "merged",
            "rotate": root / "rotate", "mixed": root / "mixed"}


@pytest.fixture(scope="module")
def reference(dirs):
    """peft's greedy tokens: {adapter names per row (tuple): [[ids...], ...]}, and the prompt's ids."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(dirs["base"])
    prompt = tokenizer(PROMPT)["input_ids"]
    base = transformers.AutoModelForCausalLM.from_pretrained(dirs["base"])
    model = peft.PeftModel.from_pretrained(base, str(dirs["road"]), adapter_name="road")
    model.load_adapter(str(dirs["road2"]), adapter_name="road2")
    model.eval()

    def greedy(rows, names):
        x = torch.tensor(rows)
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 adapter_names=list(names), pad_token_id=tokenizer.eos_token_id)
        return out.tolist()

    table = {("road",): greedy([prompt], ["road"]), ("road2",): greedy([prompt], ["road2"]),
             ("road2", "road"): greedy([prompt[:5], OTHER_ROW], ["road2", "road"])}
    assert table[("road",)] != table[("road2",)], "the two adapters must generate differently for the swap to show"
    return prompt, table


# ---- the layout ----

def test_layout_and_configs(dirs):
    merged, rotate = dirs["merged"], dirs["rotate"]
    assert {p.name for p in merged.iterdir()} == {"config.json", "generation_config.json", "genai_config.json",
                                                  "tokenizer.json", "tokenizer_config.json", "onnx"}
    assert {p.name for p in (rotate / "onnx").iterdir()} == {"model.onnx", "model.default.onnx_adapter"}
    assert (rotate / "road_ort.so").is_file() or sys.platform != "linux"
    config = transformers.AutoConfig.from_pretrained(merged)  # transformers reads it back as the base's config
    assert config.model_type == "llama" and config.vocab_size == 320
    genai = json.loads((merged / "genai_config.json").read_text())
    decoder = genai["model"]["decoder"]
    assert genai["model"]["type"] == "llama" and genai["model"]["vocab_size"] == 320
    assert genai["model"]["context_length"] == config.max_position_embeddings
    assert (decoder["head_size"], decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == (16, 2, 2)
    assert genai["search"]["past_present_share_buffer"] is False
    assert (merged / decoder["filename"]).is_file()
    assert "custom_ops_library" not in decoder["session_options"]  # merged: no road ops
    library = json.loads((rotate / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert (rotate / library["custom_ops_library"]).is_file()


def test_axis_names_are_optimums(dirs):
    graph = onnx.load(dirs["rotate"] / model_dir.MODEL_FILE, load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    assert dims["input_ids"] == ["batch_size", "sequence_length"]
    assert dims["attention_mask"] == ["batch_size", "past_sequence_length + sequence_length"]
    assert dims["position_ids"] == ["batch_size", "sequence_length"]
    assert dims["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 16]
    assert dims["present.1.value"] == ["batch_size", 2, "past_sequence_length + sequence_length", 16]
    assert dims["logits"] == ["batch_size", "sequence_length", 320]


def test_directory_is_refused_when_not_empty_and_left_absent_on_failure(dirs, capsys, monkeypatch):
    taken = dirs["root"] / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert run("--base", dirs["base"], "--adapter", dirs["road"], taken, "--no-verify") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exists and is not empty" in err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    import road_export as rx

    def export_then_fail(model, path, **kwargs):
        Path(path).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(rx, "export", export_then_fail)
    target = dirs["root"] / "interrupted"
    assert run("--base", dirs["base"], "--adapter", dirs["road"], target, "--no-verify", "--quiet") == 130
    assert not target.exists() and not [p for p in dirs["root"].iterdir() if p.name.startswith(".interrupted")]


@pytest.mark.parametrize(("argv", "says"), [
    (["{o}/nodir/out"], "does not exist"),
    (["--fixed", "{o}/out"], "--fixed applies to --mode rotate"),
    (["--adapter", "a={r}", "--adapter", "b={r}", "{o}/out"], "add --mode rotate"),
    (["--no-verify", "--atol", "1e-3", "{o}/out"], "needs the parity check"),
], ids=["parent-missing", "fixed-merge", "merge-two", "atol-no-verify"])
def test_directory_bad_input_is_one_line_before_loading(dirs, tmp_path, capsys, argv, says):
    args = [a.replace("{o}", str(tmp_path)).replace("{r}", str(dirs["road"])) for a in argv]
    assert run(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert list(tmp_path.iterdir()) == []


def test_commands_take_the_directory(dirs, capsys, tmp_path):
    rotate = dirs["rotate"]
    assert run("inspect", rotate, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mode"] == "rotate"
    assert run("verify", rotate, "--base", dirs["base"], "--adapter", dirs["road"], "--quiet") == 0
    session = RoadSession(rotate)
    assert session.path == rotate / model_dir.MODEL_FILE and "default" in session.adapters
    out = tmp_path / "other.onnx_adapter"
    assert run("adapter", dirs["road2"], "--like", rotate, out) == 0 and out.is_file()
    capsys.readouterr()
    assert run("inspect", dirs["root"] / "base") == 2  # a directory without onnx/model.onnx: one line
    assert "without onnx/model.onnx" in capsys.readouterr().err


# ---- onnxruntime-genai ----

def genai_generate(directory: Path, rows: list[list[int]], *, adapter: tuple[Path, str] | None = None,
                   adapter_ids: list[int] | None = None) -> list[list[int]]:
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(rows[0]) + NEW_TOKENS, do_sample=False, batch_size=len(rows))
    generator = og.Generator(model, params)
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter[0]), adapter[1])
        generator.set_active_adapter(adapters, adapter[1])
    if adapter_ids is not None:
        generator.set_model_input("adapter_ids", np.array(adapter_ids, dtype=np.int64))
    generator.append_tokens(np.array(rows, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [[int(t) for t in generator.get_sequence(i)] for i in range(len(rows))]


@pytest.mark.parametrize("kind", ["merged", "rotate"])
def test_genai_greedy_tokens_equal_pefts(dirs, reference, kind):
    og = pytest.importorskip("onnxruntime_genai")
    prompt, table = reference
    model = og.Model(str(dirs[kind]))
    assert list(og.Tokenizer(model).encode(PROMPT)) == prompt  # genai's tokenizer reads the copied files
    assert genai_generate(dirs[kind], [prompt]) == table[("road",)]


def test_genai_swaps_a_second_adapter(dirs, reference, tmp_path):
    prompt, table = reference
    swap = tmp_path / "model.road2.onnx_adapter"
    assert run("adapter", dirs["road2"], "--like", dirs["rotate"], swap) == 0
    assert genai_generate(dirs["rotate"], [prompt], adapter=(swap, "road2")) == table[("road2",)]
    assert genai_generate(dirs["rotate"], [prompt]) == table[("road",)]  # the file's own adapter without a swap


def test_genai_mixed_batch_through_adapter_ids(dirs, reference):
    prompt, table = reference
    rows = [prompt[:5], OTHER_ROW]
    assert genai_generate(dirs["mixed"], rows, adapter_ids=[2, 1]) == table[("road2", "road")]


def test_genai_reads_the_custom_ops_entry_and_kernels_command_adds_it(dirs, tmp_path, capsys):
    og = pytest.importorskip("onnxruntime_genai")
    copy = tmp_path / "copy"
    shutil.copytree(dirs["rotate"], copy)
    config = copy / "genai_config.json"
    data = json.loads(config.read_text())
    data["model"]["decoder"]["session_options"]["custom_ops_library"] = "missing.so"  # a planted fault
    config.write_text(json.dumps(data))
    with pytest.raises(Exception, match="missing.so|custom_ops_library"):
        og.Model(str(copy))
    (copy / "road_ort.so").unlink()
    assert run("kernels", "--genai-config", copy) == 0
    capsys.readouterr()
    entry = json.loads(config.read_text())["model"]["decoder"]["session_options"]["custom_ops_library"]
    assert entry == "road_ort.so" and (copy / entry).is_file()
    og.Model(str(copy))
    assert run("kernels", "--genai-config", tmp_path) == 2  # no genai_config.json there: one line
    assert "no genai_config.json" in capsys.readouterr().err


# ---- stock onnxruntime: the overridable-initializer warnings ----

def test_initializer_warnings_two_per_layer_and_silenced_by_log_severity(dirs, capfd):
    import onnxruntime as ort

    path = str(dirs["rotate"] / model_dir.MODEL_FILE)
    layers = 2 * len(ADAPTED)
    capfd.readouterr()
    ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert capfd.readouterr().err.count("appears in graph inputs") == 2 * layers
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the documented way: errors only
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    assert capfd.readouterr().err.count("appears in graph inputs") == 0
    # swapping still works on the quiet session: the road2 file changes the logits, its absence restores them
    swap = dirs["root"] / "quiet.road2.onnx_adapter"
    assert run("adapter", dirs["road2"], "--like", dirs["rotate"], swap) == 0
    inputs = {i.name: i for i in session.get_inputs()}
    ids = np.array([[5, 6, 7]], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(3)[None]}
    for name, info in inputs.items():
        if name.startswith("past_key_values."):
            feed[name] = np.zeros((1, info.shape[1], 0, info.shape[3]), np.float32)
    run_options = ort.RunOptions()
    adapter = ort.LoraAdapter()
    adapter.Load(str(swap))
    run_options.add_active_adapter(adapter)
    plain = session.run(["logits"], feed)[0]
    swapped = session.run(["logits"], feed, run_options)[0]
    assert not np.allclose(plain, swapped)
    assert np.allclose(session.run(["logits"], feed)[0], plain)


# ---- shape inference on rotate files ----

@pytest.fixture(scope="module")
def road_files(dirs):
    """The rotate directory's model (road.RotateTied) and its portable lowering (road.Rotate)."""
    tied = dirs["rotate"] / model_dir.MODEL_FILE
    portable = dirs["root"] / "portable.onnx"
    assert run("optimize", tied, portable, "--target", "portable", "--quiet") == 0
    return {"RotateTied": tied, "Rotate": portable}


def _road_nodes(model: onnx.ModelProto):
    return [n for n in model.graph.node if n.domain == road_ops.DOMAIN]


@pytest.mark.parametrize("op_type", ["RotateTied", "Rotate"])
def test_shape_inference_on_road_ops(road_files, op_type, tmp_path, monkeypatch):
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    monkeypatch.chdir(tmp_path)  # onnxruntime's tools may write temporary `<uuid>.data` files where they run
    model = onnx.load(road_files[op_type])
    assert {n.op_type for n in _road_nodes(model)} == {op_type}
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    for auto_merge in (False, True):
        symbolic = SymbolicShapeInference.infer_shapes(model, auto_merge=auto_merge)
        for result in (inferred, symbolic):
            info = {v.name: v.type.tensor_type for v in result.graph.value_info}
            for node in _road_nodes(result):
                x, y = info[node.input[0]], info[node.output[0]]
                assert y.elem_type == x.elem_type and y.shape == x.shape and len(y.shape.dim) == 3
    out = tmp_path / "pre.onnx"
    monkeypatch.chdir(tmp_path)  # onnxruntime's shape tools may write temporary files into the current directory
    quant_pre_process(str(road_files[op_type]), str(out))
    assert np.allclose(_logits(out), _logits(road_files[op_type]), atol=1e-5)  # pre-processed, it computes the same


def _logits(path: Path) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ids = np.array([[5, 6, 7], [8, 9, 10]], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.tile(np.arange(3), (2, 1))}
    for info in session.get_inputs():
        if info.name.startswith("past_key_values."):
            feed[info.name] = np.zeros((2, info.shape[1], 0, info.shape[3]), np.float32)
    return session.run(["logits"], feed)[0]


def test_symbolic_shape_inference_fails_without_the_schemas(road_files, tmp_path, monkeypatch):
    """The planted fault: with the road schemas taken out of onnx's registry the tools fail as they did before."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    monkeypatch.chdir(tmp_path)  # on failure it saves sym_shape_infer_temp.onnx (+ external data) in the cwd

    model = onnx.load(road_files["RotateTied"])
    onnx.defs.deregister_schema(road_ops.TIED_OP_TYPE, road_ops.VERSION, road_ops.DOMAIN)
    try:
        with pytest.raises(Exception, match="Incomplete symbolic shape inference"):
            SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    finally:
        assert road_ops.register_schemas() == [road_ops.TIED_OP_TYPE]


# ---- optimum and transformers.js, in their own environments ----

OPTIMUM_SCRIPT = """
import sys
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer
import onnxruntime as ort
options = ort.SessionOptions()
options.log_severity_level = 3
model = ORTModelForCausalLM.from_pretrained(sys.argv[1], session_options=options)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
out = model.generate(**tokenizer(sys.argv[2], return_tensors="pt"), max_new_tokens=int(sys.argv[3]), do_sample=False)
print(out[0].tolist())
"""

JS_SCRIPT = """
import { env, AutoTokenizer, AutoModelForCausalLM } from "@huggingface/transformers";
import path from "node:path";
const [dir, prompt, n] = process.argv.slice(2);
env.allowRemoteModels = false;
env.localModelPath = path.dirname(path.resolve(dir));
const name = path.basename(dir);
const tokenizer = await AutoTokenizer.from_pretrained(name, { local_files_only: true });
const model = await AutoModelForCausalLM.from_pretrained(name, { local_files_only: true, dtype: "fp32" });
const out = await model.generate({ ...tokenizer(prompt), max_new_tokens: Number(n), do_sample: false });
console.log(JSON.stringify(Array.from(out.tolist()[0], Number)));
"""


@pytest.mark.parametrize("kind", ["merged", "rotate"])
def test_optimum_greedy_tokens_equal_pefts(dirs, reference, kind, tmp_path):
    python = os.environ.get("ROAD_EXPORT_OPTIMUM_PYTHON")
    if not python:
        pytest.skip("set ROAD_EXPORT_OPTIMUM_PYTHON to a python with optimum-onnx (transformers < 4.58)")
    _, table = reference
    done = subprocess.run([python, "-c", OPTIMUM_SCRIPT, str(dirs[kind]), PROMPT, str(NEW_TOKENS)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          cwd=tmp_path)  # optimum leaves a `<uuid>.data` copy of the weights in its working directory
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == table[("road",)][0]
    assert "appears in graph inputs" not in done.stderr


@pytest.mark.parametrize("kind", ["merged", "rotate"])
def test_transformers_js_greedy_tokens_equal_pefts(dirs, reference, kind, tmp_path):
    where = os.environ.get("ROAD_EXPORT_TRANSFORMERS_JS")
    if not where or not shutil.which("node"):
        pytest.skip("set ROAD_EXPORT_TRANSFORMERS_JS to a directory with node_modules/@huggingface/transformers")
    _, table = reference
    script = Path(where) / f"road_export_test_{os.getpid()}.mjs"  # node resolves packages from the script's place
    script.write_text(JS_SCRIPT)
    try:
        done = subprocess.run(["node", str(script), str(dirs[kind]), PROMPT, str(NEW_TOKENS)], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)
    finally:
        script.unlink()
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == table[("road",)][0]
