"""Quantized bases (road_export.graph.quantize): int4/int8 MatMul weights through onnxruntime's MatMulNBitsQuantizer,
road nodes float and swappable on top; parity against peft fp32 judged by cosine; bad input refused."""

from __future__ import annotations

import json

import numpy as np
import onnx
import peft
import pytest
import torch
from conftest import copy_onnx, perturbing, tiny
from test_cli import assert_bad_input, road_export

import road_export as rx
from road_export.graph import files, quantize
from road_export.app.parity import TOKEN_COSINE_MIN
from road_export.app.verify import COSINE_MIN, verify


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, plain_llama):
    """A tiny Llama base, two peft RoAd adapters for it, the peft fp32 reference, and exports from the CLI."""
    root = tmp_path_factory.mktemp("quantize")
    tiny("tiny-llama").save_pretrained(root / "base")
    for name, seed in (("road", 0), ("other", 1)):
        torch.manual_seed(seed)
        pm = peft.get_peft_model(tiny("tiny-llama"), peft.RoadConfig(variant="road_2", group_size=8,
                                                                     init_weights=False))
        pm.save_pretrained(str(root / name))
    src = ["--base", root / "base", "--adapter", root / "road"]
    for mode in ("rotate", "merge"):
        proc = road_export(*src, "--mode", mode, "--quantize", "int4", "--report", root / f"{mode}.json",
                           root / f"int4_{mode}.onnx")
        assert proc.returncode == 0, proc.stderr + proc.stdout
    proc = road_export(*src, "--mode", "merge", "--no-verify", root / "float.onnx")
    assert proc.returncode == 0, proc.stderr
    copy_onnx(plain_llama(), root)  # plain.onnx, attach's base: tiny-llama exported without adapter
    return root


def peft_model(root, adapter="road"):
    return peft.PeftModel.from_pretrained(tiny("tiny-llama"), str(root / adapter)).eval()


@pytest.mark.parametrize("mode", ["rotate", "merge"])
def test_int4_export_matches_peft_by_cosine(dirs, mode):
    report = json.loads((dirs / f"{mode}.json").read_text())
    assert report["passed"] and report["quantized"] == "int4" and report["reference"] == "peft"
    assert report["judged_by"] == f"cosine >= {COSINE_MIN:g}, each token >= {TOKEN_COSINE_MIN:g}"
    assert all(r["cosine"] >= COSINE_MIN for r in report["rows"])
    model = onnx.load(str(dirs / f"int4_{mode}.onnx"))
    ops = [n.op_type for n in model.graph.node]
    weights = {i.name for i in model.graph.initializer}
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert ops.count("MatMulNBits") == 15  # 2 layers x 7 linears + lm_head
    assert ("Rotate" in ops or any(n.domain == "road" for n in model.graph.node)) == (mode == "rotate")
    record = json.loads({p.key: p.value for p in model.metadata_props}["road_export.quantize"])
    assert record["bits"] == 4 and record["block_size"] == quantize.INT4_BLOCK_SIZE == 16
    assert record["int8_nodes"] == 1 and record["int8_layers"] == 0  # 2 layers: only the output head at int8


def test_cosine_judgement_can_fail(dirs):
    """A planted fault: the quantized file checked against another adapter's peft model fails on cosine... unless
    the adapters are too alike, so the fault is made large: the int4 rows against a model with scaled weights."""
    reference = peft_model(dirs)
    with torch.no_grad():
        reference.base_model.model.lm_head.weight.mul_(-1.0)
    report = verify(dirs / "int4_rotate.onnx", reference)
    assert report.quantized == "int4" and not report.passed
    assert all(r.cosine < COSINE_MIN for r in report.rows if r.output == "logits")
    assert "judged by cosine >= 0.98" in report.table()


def test_int8_is_closer_than_int4(dirs, tmp_path):
    rq = quantize.quantize_file(dirs / "float.onnx", tmp_path / "int8.onnx", "int8")
    assert rq.bits == 8 and rq.quantized == 15
    r8 = verify(tmp_path / "int8.onnx", peft_model(dirs))
    r4 = verify(dirs / "int4_merge.onnx", peft_model(dirs))
    assert r8.passed and r8.quantized == "int8"
    assert min(r.cosine for r in r8.rows) > min(r.cosine for r in r4.rows)


def test_swap_on_the_quantized_file(dirs, tmp_path):
    """The .onnx_adapter of another adapter swaps onto the int4 rotate file: its outputs follow peft with that
    adapter (cosine), and differ from the default adapter's."""
    from road_export.runtime.session import RoadSession

    other = tmp_path / "other.onnx_adapter"
    proc = road_export("adapter", dirs / "other", "--like", dirs / "int4_rotate.onnx", other)
    assert proc.returncode == 0, proc.stderr
    session = RoadSession(dirs / "int4_rotate.onnx")
    session.load_adapter(other, "other")
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((2, 9), dtype=np.int64)}
    first = lambda out: out["logits"] if isinstance(out, dict) else out[0]  # noqa: E731
    got = first(session.run(feeds, adapter="other"))
    default = first(session.run(feeds))
    with torch.no_grad():
        want = peft_model(dirs, "other")(input_ids=ids).logits.numpy()
        want_default = peft_model(dirs)(input_ids=ids).logits.numpy()
    cos = lambda a, b: float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    assert cos(got, want) >= COSINE_MIN and cos(default, want_default) >= COSINE_MIN
    assert cos(got, want) > cos(got, want_default)  # the swap took: closer to "other" than to the default


def test_attach_rotate_onto_int4_base(dirs, tmp_path):
    """A float base quantized by the CLI, then attach --mode rotate: each rotation follows its MatMulNBits node,
    found through the module path copied onto it; parity against peft by cosine."""
    base_int4 = tmp_path / "base_int4.onnx"
    proc = road_export("optimize", dirs / "plain.onnx", base_int4, "--quantize", "int4", "--quiet")
    assert proc.returncode == 0, proc.stderr
    # attach "other" onto the base's quantized copy and check the node placement
    out = tmp_path / "attached.onnx"
    proc = road_export("attach", base_int4, "--adapter", dirs / "other", out)
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(str(out))
    producers = {o: n for n in model.graph.node for o in n.output}
    roads = [n for n in model.graph.node if n.domain == "road"]
    assert len(roads) == 4  # peft's default targets: q_proj, v_proj of 2 layers
    assert all(producers[n.input[0]].op_type in ("MatMulNBits", "Add") for n in roads)
    # its fixed coefficients are checked against the reference adapter by name; planted: the reference holds
    # the other adapter (same config, other values), which cosine alone may not tell from int4 noise
    right = verify(out, peft_model(dirs, "other"), coverage=False)
    assert right.passed and [r.ok for r in right.rows if r.output == "coefficients"] == [True]
    wrong = verify(out, peft_model(dirs, "road"), coverage=False)
    assert [r.ok for r in wrong.rows if r.output == "coefficients"] == [False] and not wrong.passed


def test_bad_input(dirs, tmp_path):
    out = tmp_path / "out.onnx"
    assert_bad_input(road_export("optimize", dirs / "int4_merge.onnx", out, "--quantize", "int8"),
                     says="is quantized already (int4)", dirs=[tmp_path])
    assert_bad_input(road_export("--base", dirs / "base", "--adapter", dirs / "road", "--quantize", "int3", out),
                     says="--quantize", dirs=[tmp_path])
    base_int4 = tmp_path / "base_int4.onnx"
    assert road_export("optimize", dirs / "plain.onnx", base_int4, "--quantize", "int4", "--quiet").returncode == 0
    proc = road_export("attach", base_int4, "--adapter", dirs / "other", "--mode", "merge", out)
    assert_bad_input(proc, says="cannot be folded into quantized weights", dirs=[tmp_path])
    # the base is to blame, not the adapter
    assert f"error: {base_int4}: its MatMul weights are quantized (MatMulNBits: " in proc.stderr
    assert str(dirs / "other") not in proc.stderr
    # a layout attach cannot place onto: MatMulInteger from onnxruntime's dynamic quantization
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dynamic = tmp_path / "dynamic.onnx"
    quantize_dynamic(str(dirs / "plain.onnx"), str(dynamic), op_types_to_quantize=["MatMul"],
                     weight_type=QuantType.QInt8)
    assert_bad_input(road_export("attach", dynamic, "--adapter", dirs / "other", out), says="is quantized as",
                     dirs=[tmp_path])
    assert not out.exists()
    # quantizing it again names what it holds: every MatMulInteger, not only the first quantized node
    matmuls = sum(n.op_type == "MatMulInteger" for n in files.load_model(dynamic).graph.all_nodes())
    assert_bad_input(road_export("optimize", dynamic, out, "--quantize", "int4"),
                     says=f"is quantized already ({matmuls} MatMulInteger", dirs=[tmp_path])
    assert files.load_model(dirs / "int4_merge.onnx") is not None


def _bits_by_layer(path) -> dict:
    """{layer index or "head": sorted set of (bits, block_size)} of a quantized file's MatMulNBits nodes."""
    model = files.load_model(path)
    out: dict = {}
    for node in model.graph.all_nodes():
        if node.op_type == "MatMulNBits":
            key = quantize.layer_index(node)
            out.setdefault("head" if key is None else key, set()).add(
                (node.attributes.get_int("bits"), node.attributes.get_int("block_size")))
    return out


def test_int4_keeps_the_first_layers_and_the_head_at_int8(tmp_path):
    """An 8-layer model: layers 0 and 1 (a quarter of 8) and the output head at int8 (blocks of 32), layers 2-7 at
    int4 (blocks of 16); the record says so; parity against the model by cosine. `int8_layers=0` keeps only the
    head; a model of 4 layers keeps one (a quarter)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=8, vocab_size=256, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    rx.get_road_model(model, rx.RoadConfig(variant="road_4", group_size=8, init_weights=False))
    result = rx.export(model, tmp_path / "m.onnx", mode="rotate", quantize="int4")
    layers = _bits_by_layer(result.path)
    assert layers == {**{i: {(8, 32)} for i in (0, 1)}, **{i: {(4, 16)} for i in range(2, 8)}, "head": {(8, 32)}}
    record = json.loads(onnx_meta(result.path)["road_export.quantize"])
    assert record["int8_nodes"] == 2 * 7 + 1 and record["int8_layers"] == 2 and record["block_size"] == 16
    report = verify(result.path, model)
    assert report.passed and report.quantized == "int4"

    float_file = rx.export(model, tmp_path / "f.onnx", mode="merge").path
    ir_model = files.load_model(float_file)
    assert quantize.int8_nodes(ir_model, layers=0)[1] == 0
    quantized, rep = quantize.quantize_model(ir_model, "int4", int8_layers=0)
    assert rep.int8_nodes == 1 and rep.quantized == 8 * 7 + 1
    config.num_hidden_layers = 4
    small = rx.export(LlamaForCausalLM(config).eval(), tmp_path / "s.onnx", require_adapter=False,
                      quantize="int4").path
    assert {k: v for k, v in _bits_by_layer(small).items() if v == {(8, 32)}}.keys() == {0, "head"}


def test_int4_without_module_paths_is_int4_all_through(dirs, tmp_path):
    """A file whose nodes carry no module path (another exporter's): no layer is known, every MatMul is int4."""
    model = files.load_model(dirs / "float.onnx")
    for node in model.graph.all_nodes():
        node.metadata_props.pop("pkg.torch.onnx.name_scopes", None)
    assert quantize.int8_nodes(model) == (set(), 0)
    quantized, report = quantize.quantize_model(model, "int4")
    assert report.int8_nodes == 0 and report.quantized == 15
    assert {n.attributes.get_int("bits") for n in quantized.graph.all_nodes() if n.op_type == "MatMulNBits"} == {4}


def test_layer_index_reads_the_module_path():
    node = onnx_ir_node({"pkg.torch.onnx.name_scopes": "['', 'model', 'model.model.layers.12', "
                                                       "'model.model.layers.12.mlp.down_proj', 'linear_3']"})
    assert quantize.layer_index(node) == 12
    assert quantize.layer_index(onnx_ir_node({"pkg.torch.onnx.name_scopes": "['', 'transformer.h.3.attn']"})) == 3
    assert quantize.layer_index(onnx_ir_node({"pkg.torch.onnx.name_scopes": "['', 'model.lm_head']"})) is None
    assert quantize.layer_index(onnx_ir_node({})) is None
    assert quantize.layer_index(onnx_ir_node({"pkg.torch.onnx.name_scopes": "not a list ["})) is None


def onnx_ir_node(metadata: dict):
    import onnx_ir as ir

    node = ir.Node("", "MatMul", [])
    node.metadata_props.update(metadata)
    return node


def onnx_meta(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def test_min_cosine_counts_zero_and_broken_tokens():
    """Two zero vectors agree (1), a zero output against a nonzero one does not (0), NaN fails; the per-token
    cosine sees one broken token that the whole output's cosine (>= 0.98) hides."""
    from road_export.app.parity import TOKEN_COSINE_MIN, compare, min_cosine

    rng = np.random.default_rng(0)
    expected = rng.standard_normal((2, 60, 50)).astype(np.float32)
    assert min_cosine(np.zeros((3, 4), np.float32), np.zeros((3, 4), np.float32), rows=True) == 1.0
    assert min_cosine(np.zeros_like(expected), expected, rows=False) == 0.0
    nan = expected.copy()
    nan[0, 0, 0] = np.nan
    assert np.isnan(min_cosine(nan, expected, rows=True))
    got = expected + 0.05 * rng.standard_normal(expected.shape).astype(np.float32)
    assert compare("logits", "noise", got, expected, None, 0.0, logits=True, by_cosine=True).ok
    got[1, 7] = rng.standard_normal(50)  # one token's logits replaced by unrelated values
    row = compare("logits", "one broken token", got, expected, None, 0.0, logits=True, by_cosine=True)
    assert row.cosine >= COSINE_MIN and row.token_cosine < TOKEN_COSINE_MIN and not row.ok
    zero = compare("logits", "zeros", np.zeros_like(expected), expected, None, 0.0, logits=True, by_cosine=True)
    assert zero.cosine == 0.0 and not zero.ok


def zero_head(path, out):
    """A copy of the quantized file `path` at `out` with its output head's scales zeroed: all logits 0."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    head = [n for n in model.graph.node if n.op_type == "MatMulNBits"][-1]
    scales = onnx.numpy_helper.to_array(inits[head.input[2]])
    inits[head.input[2]].CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(scales), head.input[2]))
    onnx.save(model, str(out))
    return out


def test_zero_logits_fail_the_check(dirs, tmp_path):
    """Planted fault: the output head's scales zeroed in the int4 file (all logits 0). Before, the cosine of a
    zero output counted 1 and the file passed."""
    broken = zero_head(dirs / "int4_rotate.onnx", tmp_path / "zero.onnx")
    report = verify(broken, peft_model(dirs), coverage=False)
    logits = [r for r in report.rows if r.output == "logits"]
    assert not report.passed and logits and all(r.cosine == 0.0 and not r.ok for r in logits)


def test_a_file_without_its_adapter_fails(dirs, tmp_path):
    """A quantized base export (no adapter in it) checked against peft with an adapter: int4 noise and a small
    adapter move the cosine alike, so the file's adapter record decides: an "adapters" row fails. Against the
    plain base model the same file passes."""
    torch.manual_seed(5)
    small = peft.get_peft_model(tiny("tiny-llama"), peft.RoadConfig(variant="road_1", group_size=8,
                                                                     init_weights=False))
    with torch.no_grad():
        for name, p in small.named_parameters():
            if "road_theta" in name:
                p.mul_(0.02)
            elif "road_alpha" in name:
                p.copy_(1 + 0.02 * (p - 1))
    small.eval()
    base_int4 = tmp_path / "base_int4.onnx"
    rx.export(tiny("tiny-llama"), base_int4, require_adapter=False, quantize="int4")
    report = verify(base_int4, small, coverage=False)
    assert not report.passed
    assert [r.output for r in report.rows if not r.ok] == ["adapters"]
    assert "file records none; reference carries road_1 on" in report.rows[0].case
    assert verify(base_int4, tiny("tiny-llama"), coverage=False).passed


def test_verify_against_a_float_file_judges_a_quantized_one_by_cosine(dirs, tmp_path):
    """int4 against its float export passes by cosine (it failed on max abs before); the int4 file with its head
    zeroed does not."""
    from road_export.app.parity.file_reference import verify_against_file

    float_rotate = tmp_path / "float_rotate.onnx"
    proc = road_export("--base", dirs / "base", "--adapter", dirs / "road", "--mode", "rotate", "--no-verify",
                       float_rotate)
    assert proc.returncode == 0, proc.stderr
    report = verify_against_file(dirs / "int4_rotate.onnx", float_rotate)
    assert report.passed and report.quantized == "int4" and report.judged_by.startswith("cosine")
    broken = zero_head(dirs / "int4_rotate.onnx", tmp_path / "zero.onnx")
    assert not verify_against_file(broken, float_rotate).passed
    same = verify_against_file(broken, dirs / "int4_rotate.onnx")  # quantized alike: judged by max abs
    assert same.quantized is None and not same.passed


def test_gemm_layers_are_quantized_too(tmp_path):
    """GPT-2's Conv1D layers export as Gemm: rewritten as MatMul (+ Add) and quantized with the rest (before,
    only the head was); the rewrite alone computes what the Gemm did, transB included; parity against the
    model by cosine."""
    import onnxruntime as ort
    import onnx_ir as ir

    graph_text = """
        <ir_version: 10, opset_import: ["" : 18]>
        g (float[3, 4] x) => (float[3, 5] y, float[3, 5] z) {
            y = Gemm <transB = 1> (x, wt, b)
            z = Gemm (x, w)
        }"""
    proto = onnx.parser.parse_model(graph_text)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(w.T.copy(), "wt"),
                                    onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(b, "b")])
    x = rng.standard_normal((3, 4)).astype(np.float32)
    run = lambda p: ort.InferenceSession(p.SerializeToString()).run(None, {"x": x})  # noqa: E731
    before = run(proto)
    model = ir.serde.deserialize_model(proto)
    assert quantize.gemm_as_matmul(model) == 2
    after_proto = ir.serde.serialize_model(model)
    assert sorted(n.op_type for n in after_proto.graph.node) == ["Add", "MatMul", "MatMul"]
    assert [o.name for o in after_proto.graph.output] == ["y", "z"]
    for got, want in zip(run(after_proto), before, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    gpt2 = tiny("tiny-gpt2")
    torch.manual_seed(0)
    rx.get_road_model(gpt2, rx.RoadConfig(variant="road_2", group_size=8, init_weights=False,
                                          target_modules=["c_attn", "c_proj"]))
    path = rx.export(gpt2, tmp_path / "g.onnx", mode="rotate", quantize="int4").path
    saved = onnx.load(str(path))
    ops = [n.op_type for n in saved.graph.node]
    assert "Gemm" not in ops and ops.count("MatMulNBits") == 4 * gpt2.config.n_layer + 1  # c_attn, c_proj, c_fc,
    # mlp c_proj per layer, and the head
    assert verify(path, gpt2.eval(), coverage=False).passed


def test_quantize_reaches_model_directories_and_refuses_seq2seq(dirs, tmp_path):
    """`road-export ... --quantize int4 OUT_DIR` writes an int4 onnx/model.onnx (it was written float before);
    an encoder-decoder model is refused with one line (it was silently written float)."""
    out = tmp_path / "dir"
    proc = road_export("--base", dirs / "base", "--adapter", dirs / "road", "--mode", "rotate", "--quantize", "int4",
                       "--no-verify", out)
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(str(out / "onnx" / "model.onnx"))
    assert any(n.op_type == "MatMulNBits" for n in model.graph.node)
    t5 = tmp_path / "t5"
    tiny("tiny-t5").save_pretrained(t5)
    peft.get_peft_model(tiny("tiny-t5"), peft.RoadConfig(variant="road_1", group_size=8, init_weights=False,
                                                         target_modules=["q", "v"])).save_pretrained(str(t5 / "a"))
    assert_bad_input(road_export("--base", t5, "--adapter", t5 / "a", "--quantize", "int4", "--no-verify",
                                 tmp_path / "t5out"), says="encoder-decoder model", dirs=[tmp_path])
    assert_bad_input(road_export("attach", t5, "--adapter", t5 / "a", "--quantize", "int4", tmp_path / "t5att"),
                     says="encoder-decoder model", dirs=[tmp_path])
    with pytest.raises(rx.RoadError, match="encoder-decoder"):
        rx.export(tiny("tiny-t5"), tmp_path / "t5api", quantize="int4", require_adapter=False)


def test_the_float_model_is_checked_before_quantizing(dirs, tmp_path, monkeypatch):
    """`export --quantize` verifies the float model the quantizer reads against peft by max abs, ahead of the
    quantized file's cosine rows. Planted fault: road-export's loader adds 0.01 to one q_proj weight, a change the
    int4 file's cosine is not built to see; the float rows fail and so does the export (exit 1)."""
    from road_export.export import zoo
    from road_export.app.cli import main

    load = zoo.load_model
    for name, loader in (("clean", load), ("faulty", perturbing(load, 0.01))):
        monkeypatch.setattr(zoo, "load_model", loader)
        out, rep = tmp_path / f"{name}.onnx", tmp_path / f"{name}.json"
        code = main([str(a) for a in ("--base", dirs / "base", "--adapter", dirs / "road", "--mode", "rotate",
                                      "--quantize", "int4", "--report", rep, "--quiet", out)])
        report = json.loads(rep.read_text())
        floats = [r for r in report["rows"] if r["case"].startswith("float, before quantizing (max abs <= 0.0001)")]
        assert len(floats) >= 5 and len(floats) < len(report["rows"])
        if name == "clean":
            assert code == 0 and report["passed"] and all(r["max_abs"] <= 1e-4 for r in floats)
        else:
            failed = [r["case"] for r in floats if not r["ok"]]  # seq 1 attends to one key: q does not matter there
            assert code == 1 and not report["passed"] and len(failed) >= 3, failed


def test_coefficients_are_checked_against_the_reference_adapter(dirs, tmp_path):
    """A swappable quantized file's c1/c2, and its sidecar's, must be the reference adapter's value for value: the
    clean file passes these rows; planted fault: the sidecar `.default.onnx_adapter` replaced by another adapter's
    (converted with `adapter --like`), which the cosine rows may not tell from int4 noise, fails its row."""
    import shutil

    copy = tmp_path / "m.onnx"
    shutil.copy(dirs / "int4_rotate.onnx", copy)
    shutil.copy(dirs / "int4_rotate.default.onnx_adapter", tmp_path / "m.default.onnx_adapter")
    report = verify(copy, peft_model(dirs), coverage=False)
    rows = [r for r in report.rows if r.output == "coefficients"]
    assert [r.case.split(":")[0] for r in rows] == ["file", "m.default.onnx_adapter"] and all(r.ok for r in rows)
    assert report.passed
    proc = road_export("adapter", dirs / "other", "--like", copy, tmp_path / "m.default.onnx_adapter")
    assert proc.returncode == 0, proc.stderr
    report = verify(copy, peft_model(dirs), coverage=False)
    failed = [r.case.split(":")[0] for r in report.rows if not r.ok]
    assert "m.default.onnx_adapter" in failed and not report.passed
    assert [r.ok for r in report.rows if r.output == "coefficients"] == [True, False]
