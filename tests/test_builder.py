"""RoAd on onnxruntime-genai's model builder graphs: placement (attach), swapping, mixed batches, the directory
command, against peft's forward and greedy tokens. Tiny Llama and Qwen2 (random qkv biases, so the builder writes
its bias Add) built by the builder itself, fp32 and int4, `-e cpu`; skipped where onnxruntime-genai is missing."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

pytest.importorskip("onnxruntime_genai")
peft = pytest.importorskip("peft")

from conftest import genai_build, tiny, word_tokenizer  # noqa: E402
from test_cli import assert_bad_input, road_export  # noqa: E402

from road_export.passes import builder_graph  # noqa: E402
from road_export.app import genai_builder  # noqa: E402
from road_export.app.parity.builder_reference import verify_builder  # noqa: E402
from road_export.export.zoo import resolve  # noqa: E402
from road_export.graph.adapter_files import read_adapter  # noqa: E402
from road_export.passes.attach import attach  # noqa: E402

ADAPTERS = {  # name: (target modules, variant, group size)
    "one": ("all-linear", "road_4", 16),
    "two": (["q_proj", "v_proj", "down_proj"], "road_1", 16),
    "three": (["q_proj"], "road_2", 32),
}


@pytest.fixture(scope="session")
def built(tmp_path_factory, builder_llama):
    """{family: {"hf", "fp32", "int4", adapter name: dir}} for tiny Llama and Qwen2 built by the model builder (Llama:
    the session's `builder_llama`, shared with test_builder_graphs.py)."""
    root = tmp_path_factory.mktemp("builder")
    out = {}
    for family, name in (("llama", "tiny-llama"), ("qwen", "tiny-qwen2")):
        model = tiny(name)
        if family == "qwen":  # transformers initialises biases to 0, which the builder drops: make them real
            torch.manual_seed(5)
            with torch.no_grad():
                for key, p in model.named_parameters():
                    if key.endswith("bias"):
                        p.normal_(0, 0.5)
        if family == "llama":
            hf = builder_llama["hf"]
        else:
            hf = root / family
            model.save_pretrained(hf)
            word_tokenizer(hf, model.config.vocab_size)
        entry = {"hf": hf}
        for i, (adapter, (targets, variant, g)) in enumerate(ADAPTERS.items()):
            torch.manual_seed(10 + i)
            pm = peft.get_peft_model(copy.deepcopy(model), peft.RoadConfig(
                variant=variant, group_size=g, init_weights=False, target_modules=targets))
            pm.save_pretrained(root / f"{family}_{adapter}")
            entry[adapter] = root / f"{family}_{adapter}"
        for precision in ("fp32", "int4"):
            directory = (builder_llama[precision] if family == "llama"
                         else genai_build(hf, root / f"{family}_{precision}", precision))
            entry[precision] = directory / "model.onnx"
        out[family] = entry
    return out


def _prefill(path, ids, adapter_ids=None, extra=None):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feed[i.name] = np.zeros((ids.shape[0], i.shape[1], 0, 16), np.float32)
    if adapter_ids is not None:
        feed["adapter_ids"] = adapter_ids
    feed.update(extra or {})
    return session.run(["logits"], feed)[0]


def _peft(entry, names, ids, rows=None):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(entry["hf"]).eval()
    model = peft.PeftModel.from_pretrained(base, entry[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(entry[n], adapter_name=n)
    with torch.no_grad():
        kwargs = {"adapter_names": [(["__base__", *names])[i] for i in rows]} if rows is not None else {}
        return model(torch.from_numpy(ids), **kwargs).logits.numpy()


def _ids(batch=3, seq=7, seed=0):
    return np.random.default_rng(seed).integers(3, 256, (batch, seq)).astype(np.int64)


@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_fp32_builder_graph_with_road_matches_peft(built, family, tmp_path):
    entry = built[family]
    out = tmp_path / "model.onnx"
    report = attach(entry["fp32"], [entry["one"]], out, names=["one"])
    assert report.builder and len(report.placed) == len(read_adapter(entry["one"]).road) == 14
    assert report.road_nodes == 2 * 5  # per layer: qkv_proj (packed), o_proj, gate_proj, up_proj, down_proj
    ids = _ids()
    got, want = _prefill(out, ids), _peft(entry, ["one"], ids)
    assert np.abs(got - want).max() <= 1e-4
    base = _prefill(entry["fp32"], ids)
    assert np.abs(base - want).max() > 1e-2  # the adapter matters: the comparison can fail
    proto = onnx.load(str(out), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["road_export.graph"] == "genai-builder"
    records = json.loads(meta["road_export.swap"])
    qkv = records["model.layers.0.attn.qkv_proj"]
    assert [p[0].rsplit(".", 1)[1] for p in qkv["parts"]] == ["q_proj", "k_proj", "v_proj"]
    assert [p[2] for p in qkv["parts"]] == [64, 32, 32]
    assert {i.name for i in proto.graph.input} >= {qkv["c1"], qkv["c2"]}  # swappable: inputs with defaults
    assert (tmp_path / "model.one.onnx_adapter").is_file()
    if family == "qwen":
        add = next(n for n in proto.graph.node if n.name == "/model/layers.0/attn/qkv_proj/Add")
        road = next(n for n in proto.graph.node if n.name == "model.layers.0.attn.qkv_proj.road")
        assert road.input[0] == add.output[0]  # after the bias, as peft rotates the biased output


@pytest.mark.parametrize("family", ["llama", "qwen"])
def test_int4_builder_graph_with_road_matches_peft_by_cosine(built, family, tmp_path):
    entry = built[family]
    out = tmp_path / "model.onnx"
    report = attach(entry["int4"], [entry["one"]], out, names=["one"])
    assert len(report.placed) == 14
    proto = onnx.load(str(out), load_external_data=False)
    producers = {o: n for n in proto.graph.node for o in n.output}
    road = next(n for n in proto.graph.node if n.name == "model.layers.0.attn.o_proj.road")
    assert producers[road.input[0]].op_type == "MatMulNBits"
    ids = _ids()
    got, want = _prefill(out, ids), _peft(entry, ["one"], ids)
    cosine = (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)
    base = _prefill(entry["int4"], ids)
    cosine_base = (base * want).sum() / np.linalg.norm(base) / np.linalg.norm(want)
    assert cosine >= 0.98 and cosine > cosine_base + 0.01, (cosine, cosine_base)


def test_mixed_batch_matches_peft_per_row(built, tmp_path):
    entry = built["qwen"]
    out = tmp_path / "mixed.onnx"
    names = ["one", "two", "three"]
    report = attach(entry["fp32"], [entry[n] for n in names], out, names=names)
    assert not report.swap_values and not list(tmp_path.glob("*.onnx_adapter"))
    proto = onnx.load(str(out), load_external_data=False)
    assert "adapter_ids" in {i.name for i in proto.graph.input}
    assert "model.layers.0.attn.qkv_proj.road_bank_c1_g16" in {t.name for t in proto.graph.initializer}
    ids, rows = _ids(4), np.array([1, 0, 3, 2], np.int64)
    got, want = _prefill(out, ids, adapter_ids=rows), _peft(entry, ["one", "two", "three"], ids, rows)
    assert np.abs(got - want).max() <= 1e-4
    files = [(n, read_adapter(entry[n])) for n in names]  # the directory command's own check, row by row
    checked = verify_builder(out, entry["hf"], files, quantized=False, dtype="float32", atol=None)
    assert [r["case"] for r in checked] == ["adapter_ids [0, 1]", "adapter_ids [2, 3]"]
    assert all(r["ok"] for r in checked)
    swapped = verify_builder(out, entry["hf"], files[::-1], quantized=False, dtype="float32", atol=None)
    assert not all(r["ok"] for r in swapped)  # adapters in the wrong row order: caught


def test_mixed_banks_fuse_into_matmul_rotate_rows(built, tmp_path):
    import onnx_ir as ir

    from road_export.passes.matmul_rotate import MatMulRotatePass

    out = tmp_path / "mixed.onnx"
    attach(built["llama"]["fp32"], [built["llama"]["one"], built["llama"]["two"]], out, names=["one", "two"])
    model = ir.load(str(out))
    result = MatMulRotatePass()(model)
    assert result.rows == 10  # every adapted projection of both layers, one kernel each


def _genai_tokens(directory, ids, new, adapter=None, rows=None):
    import onnxruntime_genai as og

    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + new, min_length=ids.shape[1] + new, do_sample=False,
                              batch_size=ids.shape[0])
    generator = og.Generator(model, params)
    if adapter is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter[1]), adapter[0])
        generator.set_active_adapter(adapters, adapter[0])
    if rows is not None:
        generator.set_model_input("adapter_ids", rows)
    generator.append_tokens(ids.astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return np.stack([np.asarray(generator.get_sequence(i)) for i in range(ids.shape[0])])


def _peft_tokens(entry, names, ids, new, rows=None):
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(entry["hf"]), entry[names[0]],
                                           adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(entry[n], adapter_name=n)
    t = torch.from_numpy(ids)
    kwargs = {"adapter_names": [(["__base__", *names])[i] for i in rows]} if rows is not None else {}
    return model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0, **kwargs).numpy()


@pytest.fixture(scope="session")
def builder_dir(built, tmp_path_factory):
    """`road-export --graph builder` on the tiny Llama with adapter a: the command's result and directory."""
    out = tmp_path_factory.mktemp("dir") / "llama-road"
    entry = built["llama"]
    done = road_export("--graph", "builder", "--base", entry["hf"], "--adapter", f"one={entry['one']}", "--mode",
                       "rotate", out)
    return done, out


def test_directory_command_writes_a_genai_directory(builder_dir):
    done, out = builder_dir
    assert done.returncode == 0, done.stderr
    assert "path: onnxruntime-genai model builder graph (--graph builder" in done.stdout
    assert "ok   adapter one" in done.stdout
    config = json.loads((out / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["filename"] == "onnx/model.onnx"
    assert (out / "onnx" / "model.onnx").is_file() and (out / "onnx" / "model.one.onnx_adapter").is_file()
    library = decoder["session_options"].get("custom_ops_library")
    assert library is None or (out / library).is_file()
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # staging removed
    # our runtime reads the directory's genai_config.json above onnx/: the shared buffer, the context length
    from road_export.runtime.session import RoadSession

    layout = RoadSession(out).cache_layout
    assert layout is not None and layout.gqa and layout.share_buffer
    assert layout.context_length == config["model"]["context_length"]


def test_genai_generator_gives_peft_tokens_and_swaps_adapters(built, builder_dir, tmp_path):
    _, out = builder_dir
    entry = built["llama"]
    ids = _ids(2, 6, seed=1)
    assert (_genai_tokens(out, ids, 8) == _peft_tokens(entry, ["one"], ids, 8)).all()
    other = tmp_path / "model.two.onnx_adapter"
    done = road_export("adapter", entry["two"], "--like", out, other)
    assert done.returncode == 0, done.stderr
    swapped = _genai_tokens(out, ids, 8, adapter=("two", other))
    assert (swapped == _peft_tokens(entry, ["two"], ids, 8)).all()
    assert not (swapped == _peft_tokens(entry, ["one"], ids, 8)).all()


def test_genai_generator_mixed_batch_matches_peft_rows(built, tmp_path):
    import shutil

    entry = built["llama"]
    out = tmp_path / "mixed"
    out.mkdir()
    attach(entry["fp32"], [entry["one"], entry["two"]], out / "model.onnx", names=["one", "two"])
    for f in entry["fp32"].parent.iterdir():
        if f.name == "genai_config.json" or f.name.startswith("tokenizer"):
            shutil.copyfile(f, out / f.name)
    ids, rows = _ids(3, 6, seed=2), np.array([2, 0, 1], np.int64)
    assert (_genai_tokens(out, ids, 6, rows=rows) == _peft_tokens(entry, ["one", "two"], ids, 6, rows)).all()


def test_planted_part_order_fails_the_peft_comparison(built, tmp_path, monkeypatch):
    entry = built["llama"]
    monkeypatch.setitem(builder_graph.PACKED, "qkv_proj", ("q_proj", "v_proj", "k_proj"))  # k and v swapped
    out = tmp_path / "model.onnx"
    attach(entry["fp32"], [entry["two"]], out, names=["two"])  # q and v adapted: their order matters
    rows = verify_builder(out, entry["hf"], [("two", read_adapter(entry["two"]))], quantized=False,
                                dtype="float32", atol=None)
    assert not rows[0]["ok"] and rows[0]["max_abs"] > 1e-3


def test_group_straddling_two_packed_parts_is_refused(built, tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    # a packed qkv whose Split puts k (32 outputs, adapter group size 32) at offset 48: a group would straddle q/k
    weight = numpy_helper.from_array(np.zeros((64, 128), np.float32), "model.layers.0.attn.qkv_proj.MatMul.weight")
    sizes = numpy_helper.from_array(np.array([48, 32, 48], np.int64), "sizes")
    nodes = [helper.make_node("MatMul", ["x", weight.name], ["qkv"], name="/model/layers.0/attn/qkv_proj/MatMul"),
             helper.make_node("Split", ["qkv", "sizes"], ["q", "k", "v"], axis=-1, name="split")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 64])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "qkv"],
                              [weight, sizes])
    planted = tmp_path / "planted.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), planted)
    torch.manual_seed(3)
    pm = peft.get_peft_model(tiny("tiny-llama"), peft.RoadConfig(variant="road_2", group_size=32,
                                                                 init_weights=False, target_modules=["k_proj"]))
    pm.save_pretrained(tmp_path / "k")
    # only layer 0 is in the planted graph: keep the adapter's layer-0 tensors
    from safetensors.numpy import load_file, save_file

    file = tmp_path / "k" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(file).items() if ".layers.0." in k}, file)
    out = tmp_path / "out.onnx"
    assert_bad_input(road_export("attach", planted, "--adapter", tmp_path / "k", out),
                     says="a rotation group would straddle two parts", dirs=[tmp_path])
    assert not out.exists()


def test_unplaceable_module_on_a_builder_graph_names_the_projections(built, tmp_path):
    entry = built["llama"]
    adapter = tmp_path / "ad"
    import shutil

    shutil.copytree(entry["three"], adapter)
    from safetensors.numpy import load_file, save_file

    file = adapter / "adapter_model.safetensors"
    tensors = {k.replace("self_attn.q_proj", "self_attn.rotary"): v for k, v in load_file(file).items()}
    save_file(tensors, file)
    proc = road_export("attach", entry["int4"], "--adapter", adapter, tmp_path / "o.onnx")
    assert_bad_input(proc, says="on the model builder's graph", dirs=[tmp_path])
    assert "another tool" not in proc.stderr and "attn/qkv_proj" in proc.stderr


def test_graph_choice():
    assert genai_builder.choose_graph("road", None, directory=True, task=None, blockers=[])[0] == "road"
    graph, why = genai_builder.choose_graph("auto", str(resolve("tiny-bert")), directory=True, task=None, blockers=[])
    assert graph == "road" and "architecture BertModel is not one auto sends to the builder" in why
    graph, why = genai_builder.choose_graph("auto", "tiny-llama", directory=True, task=None, blockers=[])
    assert graph == "road" and why == "--graph auto: --base is not a transformers directory with config.json"
    with pytest.raises(Exception, match="--graph builder: the output is one ONNX file"):
        genai_builder.choose_graph("builder", None, directory=False, task=None, blockers=[])


def test_graph_auto_picks_the_builder_for_llama(built):
    graph, why = genai_builder.choose_graph("auto", str(built["llama"]["hf"]), directory=True, task=None,
                                            blockers=[])
    assert graph == "builder" and "LlamaForCausalLM" in why
    graph, why = genai_builder.choose_graph("auto", str(built["llama"]["hf"]), directory=True, task=None,
                                            blockers=["--opset"])
    assert graph == "road" and "--opset" in why


def test_fixed_attach_keeps_constants(built, tmp_path):
    out = tmp_path / "model.onnx"
    done = road_export("attach", built["llama"]["fp32"], "--adapter", built["llama"]["two"], "--fixed", out)
    assert done.returncode == 0, done.stderr
    assert "on the model builder graph" in done.stdout and "swappable" not in done.stdout
    proto = onnx.load(str(out), load_external_data=False)
    assert "road_export.swap" not in {p.key for p in proto.metadata_props}
    assert not any("road_c1" in i.name for i in proto.graph.input) and not list(tmp_path.glob("*.onnx_adapter"))
    ids = _ids()
    assert np.abs(_prefill(out, ids) - _peft(built["llama"], ["two"], ids)).max() <= 1e-4


def test_adapter_of_another_group_size_is_refused_for_a_builder_graph(built, builder_dir, tmp_path):
    _, out = builder_dir
    assert_bad_input(road_export("adapter", built["llama"]["three"], "--like", out, tmp_path / "m.3.onnx_adapter"),
                     says="group_size 32 does not fit model.onnx, attached with group size 16", dirs=[tmp_path])


@pytest.mark.parametrize("args, says", [
    (["--graph", "builder", "x.onnx"], "--graph builder writes a model directory"),
    (["--dtype", "bfloat16", "x.onnx"], "--dtype bfloat16 applies to the model builder's graph"),
    (["--device", "cuda", "--graph", "road", "out_dir"], "--device applies to the model builder's graph"),
    (["--graph", "builder", "--base", "tiny-llama", "out_dir"], "--graph builder: --base is not a transformers"),
])
def test_builder_path_bad_input(args, says, tmp_path):
    assert_bad_input(road_export(*args, cwd=tmp_path), says=says, dirs=[tmp_path])
    assert not (tmp_path / "out_dir").exists()


def test_builder_failure_is_one_line(tmp_path):
    tiny("tiny-bert").save_pretrained(tmp_path / "bert")
    done = road_export("--graph", "builder", "--base", tmp_path / "bert", tmp_path / "out")
    assert_bad_input(done, says="onnxruntime-genai's model builder failed (-p fp32 -e cpu): NotImplementedError",
                     dirs=[tmp_path])
    assert not (tmp_path / "out").exists()
    tiny("tiny-llama").save_pretrained(tmp_path / "llama")  # no tokenizer files: the builder's last step fails
    done = road_export("--graph", "builder", "--base", tmp_path / "llama", tmp_path / "out")
    assert_bad_input(done, says="the builder needs the base's tokenizer files", dirs=[tmp_path])
    assert not (tmp_path / "out").exists()


def test_phi3_packed_modules_split_and_repacked_by_the_builder(tmp_path):
    """Phi-3's own `self_attn.qkv_proj` (repacked by the builder as attn/qkv_proj) and `mlp.gate_up_proj` (written
    by the builder as mlp/gate_proj and mlp/up_proj: the module's coefficients are split over the two)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    from road_export.graph import swap
    from road_export.export.zoo import resolve

    config = json.loads((resolve("tiny-phi3") / "config.json").read_text())
    config.update(vocab_size=320, original_max_position_embeddings=config["max_position_embeddings"])
    torch.manual_seed(0)
    model = Phi3ForCausalLM(Phi3Config(**config)).eval()
    model.save_pretrained(tmp_path / "phi")
    word_tokenizer(tmp_path / "phi", 320)  # the builder writes genai's tokenizer files from it
    torch.manual_seed(7)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.RoadConfig(variant="road_4", group_size=16,
                                                                     init_weights=False, target_modules="all-linear"))
    pm.save_pretrained(tmp_path / "ad")
    base = genai_build(tmp_path / "phi", tmp_path / "gb", "fp32") / "model.onnx"
    out = tmp_path / "model.onnx"
    report = attach(base, [tmp_path / "ad"], out, names=["one"])
    assert report.placed["model.layers.0.mlp.gate_up_proj"] == "/model/layers.0/mlp/up_proj/MatMul"
    ids = np.random.default_rng(0).integers(3, 320, (2, 7)).astype(np.int64)
    with torch.no_grad():
        want = pm(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(_prefill(out, ids) - want).max() <= 1e-4
    converted = tmp_path / "model.again.onnx_adapter"
    swap.convert_adapter(tmp_path / "ad", out, converted)
    written = swap.read_adapter_values(tmp_path / "model.one.onnx_adapter")
    again = swap.read_adapter_values(converted)
    assert written.keys() == again.keys() and all(np.array_equal(written[k], again[k]) for k in written)


def test_merge_folds_into_the_builder_weights_and_bias(built, tmp_path):
    entry = built["qwen"]
    out = tmp_path / "model.onnx"
    report = attach(entry["fp32"], [entry["one"]], out, mode="merge", names=["one"])
    assert report.folded == 10 and not list(tmp_path.glob("*.onnx_adapter"))
    proto = onnx.load(str(out), load_external_data=False)
    assert not any(n.domain == "road" for n in proto.graph.node)
    ids = _ids()
    assert np.abs(_prefill(out, ids) - _peft(entry, ["one"], ids)).max() <= 1e-4
    assert_bad_input(road_export("attach", entry["int4"], "--adapter", entry["one"], "--mode", "merge",
                                 tmp_path / "q.onnx"), says="a rotation cannot be folded into quantized weights",
                     dirs=[tmp_path])


def test_placement_on_a_cuda_graph(built, tmp_path):
    """A `-e cuda -p fp16` graph (written here, run on the GPU machine): the same placement, float16 coefficients,
    the rotation after the qkv bias Add."""
    entry = built["qwen"]
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(entry["hf"]), "-o",
                    str(tmp_path / "gb"), "-p", "fp16", "-e", "cuda", "-c", str(tmp_path / "cache")], check=True,
                   capture_output=True)
    out = tmp_path / "model.onnx"
    report = attach(tmp_path / "gb" / "model.onnx", [entry["two"]], out, names=["two"])
    assert len(report.placed) == 6 and report.road_nodes == 4  # q, v in qkv_proj and down_proj, two layers
    proto = onnx.load(str(out), load_external_data=False)
    producers = {o: n for n in proto.graph.node for o in n.output}
    road = next(n for n in proto.graph.node if n.name == "model.layers.0.attn.qkv_proj.road")
    assert producers[road.input[0]].name == "/model/layers.0/attn/qkv_proj/Add"
    c1 = next(t for t in proto.graph.initializer if t.name == road.input[1])
    assert c1.data_type == onnx.TensorProto.FLOAT16
    assert road.input[1] in {i.name for i in proto.graph.input}


def test_an_fp32_cuda_graph_whose_attention_holds_q_k_v_is_refused_saying_why(built, tmp_path):
    """The builder's fp32 CUDA graph computes q, k and v inside onnxruntime's Attention op (its weights an input of
    that op): attach says so and what to build instead, not only that the modules were not found."""
    entry = built["llama"]
    genai_build(entry["hf"], tmp_path / "gb", "fp32", "-e", "cuda")
    nodes = onnx.load(str(tmp_path / "gb" / "model.onnx"), load_external_data=False).graph.node
    assert any(n.op_type == "Attention" for n in nodes) and not any("qkv_proj" in n.name for n in nodes)
    proc = road_export("attach", tmp_path / "gb" / "model.onnx", "--adapter", entry["one"], tmp_path / "o.onnx")
    assert_bad_input(proc, says="inside onnxruntime's Attention op", dirs=[tmp_path])
    assert "-p fp16" in proc.stderr


@pytest.fixture(scope="module")
def cpu_builder_dir(built, tmp_path_factory):
    """The planted comparison of the CUDA directory test: the same command for the CPU (`--no-verify`), run once for
    both of its cases."""
    entry = built["llama"]
    out = tmp_path_factory.mktemp("cpu_builder") / "cpu"
    return road_export("--graph", "builder", "--base", entry["hf"], "--adapter", entry["one"], "--mode", "rotate",
                       "--no-verify", out), out


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_cuda_directory_holds_the_fused_products(built, cpu_builder_dir, tmp_path, quantize):
    """--device cuda: genai opens the file as it is, so each product and its rotation are one road.LinearRotate
    (fp16) or road.MatMulNBitsRotate (int4) node in it, the coefficients still swappable inputs; planted: the same
    directory for the CPU keeps MatMul + road.Rotate (the rewrite is the CUDA target's, not a side effect)."""
    entry = built["llama"]
    extra = ["--quantize", quantize] if quantize else ["--dtype", "float16"]
    done = road_export("--graph", "builder", "--device", "cuda", *extra, "--base", entry["hf"], "--adapter",
                       entry["one"], "--mode", "rotate", tmp_path / "cuda")
    assert done.returncode == 0, done.stderr
    proto = onnx.load(str(tmp_path / "cuda" / "onnx" / "model.onnx"), load_external_data=False)
    road = [n for n in proto.graph.node if n.domain == "road"]
    fused_type = "MatMulNBitsRotate" if quantize else "LinearRotate"
    assert road and {n.op_type for n in road} == {fused_type}, {n.op_type for n in road}
    assert f"{len(road)} fused into their products for CUDA" in done.stdout + done.stderr
    inputs = {i.name for i in proto.graph.input}
    assert all(n.input[-1] in inputs and n.input[-2] in inputs for n in road)  # C1, C2: overridable
    assert list((tmp_path / "cuda" / "onnx").glob("*.onnx_adapter"))
    cpu, cpu_dir = cpu_builder_dir
    assert cpu.returncode == 0, cpu.stderr
    proto = onnx.load(str(cpu_dir / "onnx" / "model.onnx"), load_external_data=False)
    assert {n.op_type for n in proto.graph.node if n.domain == "road"} == {"Rotate"}


def test_builder_option_needs_key_value(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    done = road_export("--graph", "builder", "--base", tmp_path / "b", "--no-adapter", "--builder-option",
                       "fuse_qkv", tmp_path / "out")
    assert_bad_input(done, says="--builder-option 'fuse_qkv': expected KEY=VALUE", dirs=[tmp_path])


def test_directory_command_exits_1_when_its_parity_check_fails(built, tmp_path, monkeypatch):
    monkeypatch.setitem(builder_graph.PACKED, "qkv_proj", ("q_proj", "v_proj", "k_proj"))  # planted: k, v swapped
    entry = built["llama"]
    done = road_export("--graph", "builder", "--base", entry["hf"], "--adapter", entry["two"], "--mode", "rotate",
                       tmp_path / "out")
    assert done.returncode == 1, done.stderr
    assert "FAIL adapter default" in done.stdout
