"""Parity against peft's own model: the faults a harness comparing road-export with itself cannot see.

Each case builds a tiny base directory and a peft adapter, runs the CLI in-process, and checks the report says the
reference was peft and what the largest |onnxruntime - peft| was; a planted loader fault must make it FAIL.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import warnings

import numpy as np
import onnx
import peft
import pytest
import torch
import transformers
from conftest import perturbing, tiny

import road_export as rx
from road_export.core import rotation
from road_export.export import zoo
from road_export.export.adapters import read_adapter
from road_export.app.cli import main
from road_export.core.errors import RoadError
from road_export.runtime.session import RoadSession
from road_export.app.testing import assert_peft_parity

warnings.filterwarnings("ignore")


def run(*args) -> int:
    return main([str(a) for a in args])


def figure(text: str) -> None:
    """A measured figure, shown with `pytest -s` even where the test captures output."""
    print(text, file=sys.__stdout__)


def report_of(path) -> dict:
    return json.loads(path.read_text())


def max_abs(report: dict) -> float:
    return max(r["max_abs"] for r in report["rows"])


def save_peft(model, config, path, perturb=()):
    """peft adapter at `path`; the modules_to_save copies named in `perturb` get other values (as trained)."""
    torch.manual_seed(3)
    pm = peft.get_peft_model(model, config)
    for name in perturb:
        copy = pm.base_model.model.get_submodule(name).modules_to_save["default"]
        with torch.no_grad():
            copy.weight.add_(torch.randn_like(copy.weight) * 0.5)
    pm.save_pretrained(str(path))
    return pm


def tied_llama():
    config = transformers.AutoConfig.from_pretrained(zoo.models_dir() / "tiny-llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    tied_llama().save_pretrained(root / "tied")
    for side, module in (("head", "lm_head"), ("embed", "model.embed_tokens")):
        save_peft(transformers.AutoModelForCausalLM.from_pretrained(root / "tied"),
                  peft.RoadConfig(variant="road_2", group_size=8, init_weights=False, target_modules=["q_proj"],
                                  modules_to_save=[module.rsplit(".", 1)[-1]]),
                  root / f"save_{side}", perturb=[module])
    tiny("tiny-gpt2").save_pretrained(root / "gpt2")  # GPT-2 ties lm_head to wte
    save_peft(transformers.AutoModelForCausalLM.from_pretrained(root / "gpt2"),
              peft.RoadConfig(variant="road_4", group_size=8, init_weights=False, target_modules=["lm_head"]),
              root / "gpt2_road")
    return root


def export_and_report(tmp_path, *args):
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    code = run(*args, out, "--report", rep, "--quiet")
    return code, out, report_of(rep) if rep.exists() else None


@pytest.mark.parametrize("side", ["head", "embed"])
def test_tied_embeddings_with_modules_to_save(dirs, tmp_path, side):
    """tie_word_embeddings=True with modules_to_save on either side: the trained copy stays on its side."""
    code, _, report = export_and_report(tmp_path, "--base", dirs / "tied", "--adapter", dirs / f"save_{side}")
    assert code == 0 and report["reference"] == "peft" and report["passed"], report
    assert max_abs(report) <= 1e-4
    figure(f"tied modules_to_save {side}: max |ORT - peft| = {max_abs(report):.2e}")


@pytest.mark.parametrize("side", ["head", "embed"])
def test_tied_modules_to_save_merge_checkpoint(dirs, tmp_path, side):
    out = tmp_path / "merged"
    assert run("merge-checkpoint", "--base", dirs / "tied", "--adapter", dirs / f"save_{side}", out, "--quiet") == 0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    reference = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(dirs / "tied"),
                                               str(dirs / f"save_{side}")).eval()
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (merged(ids).logits - reference(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4, diff
    figure(f"merge-checkpoint, tied modules_to_save {side}: max |merged - peft| = {diff:.2e}")


def test_road_on_a_tied_lm_head(dirs, tmp_path):
    """RoAd targeting GPT-2's lm_head (tied to wte; peft also saves lm_head.base_layer.weight)."""
    assert any(k.endswith("lm_head.base_layer.weight") for k in read_adapter(dirs / "gpt2_road").extra)
    code, _, report = export_and_report(tmp_path, "--base", dirs / "gpt2", "--adapter", dirs / "gpt2_road")
    assert code == 0 and report["reference"] == "peft" and report["passed"], report
    figure(f"RoAd on tied lm_head (export): max |ORT - peft| = {max_abs(report):.2e}")
    reference = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(dirs / "gpt2"),
                                               str(dirs / "gpt2_road")).eval()
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    ours = rx.load_adapter(zoo.load_model(dirs / "gpt2"), dirs / "gpt2_road")
    wte = ours.transformer.wte.weight.detach().clone()
    rx.merge_and_unload(ours)
    assert torch.equal(ours.transformer.wte.weight, wte) and not ours.config.tie_word_embeddings
    with torch.no_grad():
        assert (ours(ids).logits - expected).abs().max().item() <= 1e-4
    out = tmp_path / "merged"
    assert run("merge-checkpoint", "--base", dirs / "gpt2", "--adapter", dirs / "gpt2_road", out, "--quiet") == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.config.tie_word_embeddings is False
    with torch.no_grad():
        diff = (merged(ids).logits - expected).abs().max().item()
    assert diff <= 1e-4, diff
    figure(f"RoAd on tied lm_head (merge-checkpoint): max |merged - peft| = {diff:.2e}")


def test_gpt2_left_padded_generate_matches_peft(dirs, tmp_path):
    """Absolute positions: the text-generation export takes position_ids, so left padding generates as peft."""
    code, out, report = export_and_report(tmp_path, "--base", dirs / "gpt2", "--adapter", dirs / "gpt2_road",
                                          "--task", "causal-lm")
    assert code == 0 and report["passed"]
    model = onnx.load(str(out), load_external_data=False)
    assert "position_ids" in [i.name for i in model.graph.input]
    assert {p.key: p.value for p in model.metadata_props}["road_export.task"] == "text-generation"
    reference = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(dirs / "gpt2"),
                                               str(dirs / "gpt2_road")).eval()
    ids = torch.randint(3, 256, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, :1] = 0
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                      pad_token_id=0)
    got = RoadSession(out).generate(ids.numpy(), mask.numpy(), max_new_tokens=6)
    np.testing.assert_array_equal(got, expected.numpy())
    figure(f"GPT-2 left-padded: max |ORT - peft| = {max_abs(report):.2e}, generate equal")


def test_legacy_sharded_bin_base(tmp_path_factory, tmp_path):
    """pytorch_model-0000k-of-0000n.bin with its index: loaded by transformers, verified against peft."""
    root = tmp_path_factory.mktemp("legacy")
    model = tiny("tiny-llama")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    base = root / "base"
    base.mkdir()
    model.config.save_pretrained(base)
    weight_map = {}
    for i, part in enumerate(halves, 1):
        name = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: state[k] for k in part}, base / name)
        weight_map.update({k: name for k in part})
    (base / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_peft(tiny("tiny-llama"), peft.RoadConfig(variant="road_1", group_size=8, init_weights=False), root / "road")
    loaded = zoo.load_model(base)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    code, _, report = export_and_report(tmp_path, "--base", base, "--adapter", root / "road")
    assert code == 0 and report["reference"] == "peft" and report["passed"], report
    figure(f"legacy sharded .bin: max |ORT - peft| = {max_abs(report):.2e}")


def test_config_only_base_is_refused(dirs, tmp_path, capsys):
    base = tmp_path / "config_only"
    base.mkdir()
    (base / "config.json").write_text((dirs / "tied" / "config.json").read_text())
    out = tmp_path / "m.onnx"
    assert run("--base", base, "--adapter", dirs / "save_head", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no weights" in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".m.onnx*"))


def test_seq_cls_adapter_on_a_causal_lm_base(tmp_path_factory, tmp_path, capsys):
    """task_type SEQ_CLS on a LlamaForCausalLM checkpoint: AutoModelForSequenceClassification with 3 labels."""
    root = tmp_path_factory.mktemp("seqcls")
    causal = tiny("tiny-llama")
    causal.config.pad_token_id = 0  # a classifier pools each row's last token before padding
    causal.save_pretrained(root / "base")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(root / "base", num_labels=3)
    save_peft(model, peft.RoadConfig(task_type="SEQ_CLS", variant="road_2", group_size=8, init_weights=False),
              root / "road")
    for task in ([], ["--task", "sequence-classification"]):
        code, out, report = export_and_report(tmp_path, "--base", root / "base", "--adapter", root / "road", *task)
        assert code == 0 and report["reference"] == "peft" and report["passed"], report
        meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        assert meta["road_export.task"] == "text-classification"
        assert report["rows"][0]["shape"][-1] == 3
    figure(f"SEQ_CLS on causal-LM base: max |ORT - peft| = {max_abs(report):.2e}")
    capsys.readouterr()
    assert run("--base", root / "base", "--adapter", root / "road", "--task", "text-generation",
               tmp_path / "x.onnx") == 2
    err = capsys.readouterr().err
    assert "trained for text-classification" in err and not (tmp_path / "x.onnx").exists()
    shutil.copytree(root / "base", root / "nopad")  # no pad_token_id: refused before loading, with the fix
    config = json.loads((root / "nopad" / "config.json").read_text())
    config.pop("pad_token_id", None)
    (root / "nopad" / "config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    assert run("--base", root / "nopad", "--adapter", root / "road", tmp_path / "x.onnx") == 2
    assert "set pad_token_id in config.json" in capsys.readouterr().err and time.perf_counter() - started < 5
    assert not (tmp_path / "x.onnx").exists()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    tiny("tiny-llama").save_pretrained(root / "base")
    save_peft(tiny("tiny-llama"), peft.RoadConfig(variant="road_4", group_size=8, init_weights=False), root / "road")
    return root


def test_opset_is_the_one_asked_for(llama, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code = run("--base", llama / "base", "--adapter", llama / "road", "--opset", "17", out, "--quiet")
    if code == 0:
        assert onnx.load(str(out)).opset_import[0].version == 17
    else:
        assert code == 2 and "--opset: 17 is not supported" in capsys.readouterr().err and not out.exists()
    figure(f"--opset 17: exit {code}")
    code = run("--base", llama / "base", "--adapter", llama / "road", "--opset", "999", out, "--quiet")
    assert code == 2 and "--opset: 999 is not supported" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".m.onnx*"))
    code = run("--base", llama / "base", "--adapter", llama / "road", "--opset", "20", out, "--quiet",
               "--no-verify")
    assert code == 0 and onnx.load(str(out)).opset_import[0].version == 20
    assert assert_peft_parity(out, llama / "base", [str(llama / "road")]).reference == "peft"


def test_a_planted_loader_fault_fails_the_harness(llama, tmp_path, monkeypatch, capsys):
    """road-export's loader perturbs one weight: peft's independent reference catches it (exit 1, FAILED)."""
    monkeypatch.setattr(zoo, "load_model", perturbing(zoo.load_model, 0.05))
    code, _, report = export_and_report(tmp_path, "--base", llama / "base", "--adapter", llama / "road")
    assert code == 1 and report["reference"] == "peft" and not report["passed"]
    figure(f"planted fault: verdict {'PASSED' if report['passed'] else 'FAILED'}, max |ORT - peft| = "
          f"{max_abs(report):.2e}")
    with pytest.raises(AssertionError, match="reference: peft"):
        assert_peft_parity(tmp_path / "m.onnx", llama / "base", [str(llama / "road")])
    monkeypatch.setattr("road_export.export.source.peft_available", lambda: False)
    code = run("verify", tmp_path / "m.onnx", "--base", llama / "base", "--adapter", llama / "road")
    assert "reference: road-export loader" in capsys.readouterr().out  # without peft the table says so


def test_gpt2_conv1d_adapter_from_save_adapter_is_verified(dirs, tmp_path):
    """peft's RoAd cannot wrap Conv1D: an adapter made by rx.save_adapter on GPT-2's c_attn is verified against
    road-export's loader, the report saying so and why; a different adapter still fails (exit 1)."""
    for seed in (1, 2):
        model = zoo.load_model(dirs / "gpt2")
        torch.manual_seed(seed)
        rx.get_road_model(model, rx.RoadConfig(variant="road_2", group_size=8, init_weights=False,
                                               target_modules=["c_attn"]))
        rx.save_adapter(model, tmp_path / f"conv{seed}")
    code, out, report = export_and_report(tmp_path, "--base", dirs / "gpt2", "--adapter", tmp_path / "conv1")
    assert code == 0 and report["passed"], report
    assert report["reference"] == "road-export loader (peft cannot wrap Conv1D)"
    rep = tmp_path / "other.json"
    assert run("verify", out, "--base", dirs / "gpt2", "--adapter", tmp_path / "conv2", "--report", rep,
               "--quiet") == 1
    assert report_of(rep)["reference"] == "road-export loader (peft cannot wrap Conv1D)"


def test_openai_gpt_conv1d_merge_checkpoint(tmp_path):
    """Conv1D outside GPT-2: the axis comes from the layer. peft cannot wrap Conv1D with RoAd, so the adapter is
    road-export's save_adapter output and the reference rotates c_attn's output with forward hooks."""
    config = transformers.OpenAIGPTConfig(n_embd=32, n_head=2, n_layer=2, vocab_size=128, n_positions=64)
    torch.manual_seed(0)
    transformers.OpenAIGPTLMHeadModel(config).save_pretrained(tmp_path / "base")
    model = zoo.load_model(tmp_path / "base")
    torch.manual_seed(1)
    rx.get_road_model(model, rx.RoadConfig(variant="road_2", group_size=8, init_weights=False,
                                           target_modules=["c_attn"]))
    rx.save_adapter(model, tmp_path / "road")
    out = tmp_path / "merged"
    assert run("merge-checkpoint", "--base", tmp_path / "base", "--adapter", tmp_path / "road", out, "--quiet") == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    adapter = read_adapter(tmp_path / "road")
    for name, params in adapter.road.items():
        c1, c2 = rotation.coefficients("road_2", 8, params["road_theta"], params["road_alpha"])
        reference.get_submodule(name).register_forward_hook(
            lambda _m, _i, y, c1=c1, c2=c2: rotation.rotate(y, c1, c2, 8))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (merged(ids).logits - reference(ids).logits).abs().max().item()
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
        moved = (base(ids).logits - reference(ids).logits).abs().max().item()
    assert diff <= 1e-4 and moved > 1e-3, (diff, moved)  # the adapter moves logits by ~3e-3
    figure(f"OpenAI GPT Conv1D merge-checkpoint: max |merged - hooked reference| = {diff:.2e}")


def test_a_task_the_model_cannot_serve_is_refused():
    with pytest.raises(RoadError, match="cannot serve task text-generation"):
        zoo.model_class(transformers.ViTConfig(), "text-generation")


def test_a_file_onnxruntime_cannot_load_is_not_left_behind(tmp_path):
    import onnx_ir as ir

    from road_export.export.post import check_loadable
    from road_export.graph.files import save_model

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    node = ir.Node("", "NoSuchOp", [x], num_outputs=1)
    node.outputs[0].name = "y"
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 18}), ir_version=10)
    with pytest.raises(RoadError, match="onnxruntime .* cannot load"):
        save_model(model, tmp_path / "bad.onnx", None, check=check_loadable)
    assert not list(tmp_path.iterdir())
