"""Architectures users bring (issue 26): harness inputs built from the model's own rules, loading what the export
needs, validation before writing, directories every client loads, exit 3 only for our bugs.

Every example is checked against peft's own forward / generate (fp32 atol 1e-4) or its one-line refusal, with a
sibling not named in the issue and a planted fault for each new check. Tiny models are built from configs with fixed
seeds and saved once per module; nothing is downloaded.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from conftest import tiny
from onnx import numpy_helper

import road_export as rx
from road_export.graph import model_dir
from road_export.export import zoo
from road_export.app import verify as verify_mod
from road_export.app.cli import main
from road_export.core.errors import ExportBug, RoadError
from road_export.core.legacy_tokenizers import TRANSFORMERS_4_TOKENIZERS
from road_export.export.source import load_reference

warnings.filterwarnings("ignore")
peft = pytest.importorskip("peft")


def run(*args) -> int:
    return main([str(a) for a in args])


def one_line_error(capsys, says: str) -> str:
    """The CLI's stderr is exactly one `road-export: error: ...` line holding `says`."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("road-export: error: "), lines
    assert says in lines[0], lines[0]
    return lines[0]


def save_adapter(model: torch.nn.Module, out: Path, task_type: str, targets: list[str], seed: int = 1, **kw) -> Path:
    torch.manual_seed(seed)
    peft.get_peft_model(model, peft.RoadConfig(variant="road_1", group_size=8, init_weights=False, task_type=task_type,
                                               target_modules=targets, **kw)).save_pretrained(str(out))
    return out


def roberta_config(cls=transformers.RobertaConfig, positions: int = 130) -> transformers.PretrainedConfig:
    """BERTweet's shape of position table (130 rows, padding_idx 1: 128 usable positions), tiny widths."""
    return cls(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=positions, pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)


@pytest.fixture(scope="module")
def roberta(tmp_path_factory):
    """A RoBERTa base with 130 positions, a feature-extraction RoAd adapter saved by peft, exported by the CLI."""
    root = tmp_path_factory.mktemp("roberta")
    torch.manual_seed(0)
    transformers.RobertaModel(roberta_config()).save_pretrained(root / "base")
    save_adapter(transformers.RobertaModel.from_pretrained(root / "base"), root / "adapter", "FEATURE_EXTRACTION",
                 ["query", "value"])
    code = run("--base", root / "base", "--adapter", root / "adapter", "--quiet", "--report", root / "report.json",
               root / "model.onnx")
    return root, code


def ort_against_peft(path: Path, reference: torch.nn.Module, ids: torch.Tensor, output: str) -> float:
    """max |onnxruntime - peft| on one row of ids (mask all ones)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    mask = torch.ones_like(ids)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": np.zeros_like(ids.numpy())}
    feeds = {i.name: feeds[i.name] for i in session.get_inputs()}
    got = session.run([output], feeds)[0]
    with torch.no_grad():
        expected = getattr(reference(input_ids=ids, attention_mask=mask), output).numpy()
    return float(np.abs(got - expected).max())


# ---- 3. harness inputs from the model's own rules: position offsets ----

def test_roberta_130_positions_exports_verifies_and_equals_peft(roberta, capsys):
    root, code = roberta
    assert code == 0
    report = json.loads((root / "report.json").read_text())
    assert report["passed"] and report["longest_sequence"] == 128  # 130 rows - (padding_idx 1 + 1)
    assert run("verify", root / "model.onnx", "--base", root / "base", "--adapter", root / "adapter") == 0
    assert "parity PASSED" in capsys.readouterr().out
    reference = load_reference(root / "base", [str(root / "adapter")])
    ids = torch.randint(3, 120, (1, 128), generator=torch.Generator().manual_seed(3))
    assert ort_against_peft(root / "model.onnx", reference, ids, "last_hidden_state") <= 1e-4


@pytest.mark.parametrize("cls,model_cls", [(transformers.XLMRobertaConfig, transformers.XLMRobertaModel),
                                           (transformers.CamembertConfig, transformers.CamembertModel),
                                           (transformers.BertConfig, transformers.BertModel)])
def test_usable_positions_follow_the_models_own_table(cls, model_cls):
    """Siblings: XLM-RoBERTa and CamemBERT number positions from padding_idx + 1 as RoBERTa does; BERT from 0. The
    count is checked against the model itself: the longest row it runs, and one more fails."""
    with torch.device("meta"):
        model = model_cls(roberta_config(cls, positions=40))
    usable = verify_mod.usable_positions(model)
    assert usable == (40 if cls is transformers.BertConfig else 38)
    torch.manual_seed(0)
    real = model_cls(roberta_config(cls, positions=40)).eval()
    with torch.no_grad():
        real(input_ids=torch.full((1, usable), 5))
        with pytest.raises((IndexError, RuntimeError)):
            real(input_ids=torch.full((1, usable + 1), 5))


def _damaged_position_row(path: Path, out: Path, row: int) -> None:
    """A copy of the file whose position table has row `row` changed (a file wrong only at that position)."""
    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if "position_embeddings" in i.name)
    array = numpy_helper.to_array(init).copy()
    array[row] += np.random.default_rng(0).standard_normal(array.shape[1]).astype(array.dtype)
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, str(out))


def test_long_check_still_reaches_the_last_usable_position(roberta, tmp_path):
    """Planted fault: a file wrong only at position 129 (the last row RoBERTa uses with 130 rows) fails the long
    sequence, and only it (the shapes and the sweep stay below position 66)."""
    root, _ = roberta
    bad = tmp_path / "bad.onnx"
    _damaged_position_row(root / "model.onnx", bad, 129)
    reference = load_reference(root / "base", [str(root / "adapter")])
    report = verify_mod.verify(bad, reference)
    failed = [r.case for r in report.rows if not r.ok]
    assert failed == ["long sequence: seq 128"], failed


def test_a_check_that_cannot_be_built_is_a_skipped_row(roberta, monkeypatch):
    """A long sequence past what the model accepts: the reference cannot run it either, so the table says the check
    is skipped and why, and the file is not blamed; planted fault: when the reference runs it and the file does not,
    the failure still comes out (the row is not skipped)."""
    root, _ = roberta
    reference = load_reference(root / "base", [str(root / "adapter")])
    from road_export.app.parity import cases

    monkeypatch.setattr(cases, "max_positions", lambda model: 200)
    report = verify_mod.verify(root / "model.onnx", reference)
    assert report.passed
    skipped = [r for r in report.rows if r.skipped]
    assert len(skipped) == 1 and skipped[0].case.startswith("long sequence: seq 200")
    assert "reference" in skipped[0].skipped
    assert "skipped" in report.table() and "(1 skipped: cannot be built for this model)" in report.table()
    # a reference with a larger table runs 200 tokens: the file that cannot is to blame
    torch.manual_seed(0)
    wider = transformers.RobertaModel(roberta_config(positions=300)).eval()
    with pytest.raises(Exception, match="indices element out of data bounds"):
        verify_mod.verify(root / "model.onnx", wider)


# ---- 3. dtypes of every feed from the file's declared input types ----

@pytest.fixture(scope="module")
def t5_fp16(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5fp16")
    for name, seed in (("adapter", 1), ("other", 2)):
        save_adapter(tiny("tiny-t5"), root / name, "SEQ_2_SEQ_LM", ["q", "v"], seed=seed)
    code = run("--base", "tiny-t5", "--adapter", root / "adapter", "--dtype", "float16", "--quiet",
               "--report", root / "report.json", root / "model")
    return root, code


def test_t5_float16_exports_and_verifies(t5_fp16, capsys):
    """The merged decoder is fed float16 past and encoder states, as the file declares (it took float32 before)."""
    root, code = t5_fp16
    assert code == 0
    report = json.loads((root / "report.json").read_text())
    assert report["passed"] and report["dtype"] == "float16"
    assert any("decoder_model_merged.onnx (with past)" in r["case"] for r in report["rows"])
    assert run("verify", root / "model", "--base", "tiny-t5", "--adapter", root / "adapter") == 0
    assert "parity PASSED: 27/27" in capsys.readouterr().out


def test_t5_float16_verify_fails_against_another_adapter(t5_fp16, capsys):
    """Planted fault: the float16 tolerance (relative to the outputs' size) still fails a file against another
    adapter's reference."""
    root, _ = t5_fp16
    assert run("verify", root / "model", "--base", "tiny-t5", "--adapter", root / "other") == 1
    assert "parity FAILED" in capsys.readouterr().out


def test_feeds_follow_the_declared_types():
    """`cast_feeds` gives each float feed the file's declared type and leaves integers alone; `round_as_fed` rounds
    the reference's copy the same way."""
    declared = {"past": np.float16, "enc": np.float32}
    feeds = verify_mod.cast_feeds({"past": np.full(3, 1 / 3, np.float32), "enc": np.ones(2, np.float32),
                                   "ids": np.arange(2)}, declared)
    assert feeds["past"].dtype == np.float16 and feeds["enc"].dtype == np.float32 and feeds["ids"].dtype == np.int64
    rounded = verify_mod.round_as_fed({"past": torch.full((3,), 1 / 3), "enc": torch.full((3,), 1 / 3)}, declared)
    assert rounded["past"].dtype == torch.float32 and float(rounded["past"][0]) == float(np.float16(1 / 3))
    assert float(rounded["enc"][0]) == pytest.approx(1 / 3, abs=1e-8)


# ---- 4. load what the export needs ----

@pytest.fixture(scope="module")
def masked_lm(tmp_path_factory):
    """A RoBERTa masked-LM checkpoint (no pooler tensors, as roberta-large ships) and a feature-extraction adapter."""
    root = tmp_path_factory.mktemp("mlm")
    torch.manual_seed(0)
    transformers.RobertaForMaskedLM(roberta_config()).save_pretrained(root / "base")
    base = transformers.RobertaModel.from_pretrained(root / "base")
    save_adapter(base, root / "adapter", "FEATURE_EXTRACTION", ["query", "value"])
    return root


def test_feature_extraction_on_a_masked_lm_checkpoint_equals_peft(masked_lm):
    root = masked_lm
    assert run("--base", root / "base", "--adapter", root / "adapter", "--quiet", root / "m.onnx") == 0
    reference = load_reference(root / "base", [str(root / "adapter")])
    ids = torch.randint(3, 120, (1, 20), generator=torch.Generator().manual_seed(4))
    assert ort_against_peft(root / "m.onnx", reference, ids, "last_hidden_state") <= 1e-4


def test_missing_weights_that_feed_the_output_stay_refused(masked_lm, tmp_path, capsys):
    """Planted fault: the same checkpoint without a tensor last_hidden_state depends on is refused in one line."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text((masked_lm / "base" / "config.json").read_text())
    tensors = load_file(str(masked_lm / "base" / "model.safetensors"))
    del tensors["roberta.encoder.layer.1.output.dense.weight"]
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    assert run("--base", base, "--adapter", masked_lm / "adapter", "--quiet", tmp_path / "m.onnx") == 2
    one_line_error(capsys, "encoder.layer.1.output.dense.weight")
    assert not (tmp_path / "m.onnx").exists()


def test_feeds_no_output_by_autograd():
    """The pooler feeds pooler_output only; an encoder weight feeds last_hidden_state; text-classification's head
    and a causal model's lm_head feed logits."""
    torch.manual_seed(0)
    model = transformers.RobertaModel(roberta_config()).eval()
    names = ["pooler.dense.weight", "pooler.dense.bias", "encoder.layer.1.output.dense.weight"]
    assert zoo.feeds_no_output(model, names, "feature-extraction") == names[:2]
    llama = tiny("tiny-llama")
    assert zoo.feeds_no_output(llama, ["lm_head.weight", "model.norm.weight"], "text-generation") == []


# ---- 5. validate before writing ----

def test_merge_checkpoint_refuses_a_resized_vocabulary_before_writing(tmp_path, capsys):
    tiny("tiny-llama").save_pretrained(tmp_path / "base")
    resized = tiny("tiny-llama")
    resized.resize_token_embeddings(resized.config.vocab_size + 16)
    torch.manual_seed(0)
    peft.get_peft_model(resized, peft.RoadConfig(variant="road_1", group_size=8, init_weights=False,
                                                 target_modules=["q_proj", "v_proj"])).save_pretrained(
        str(tmp_path / "adapter"), save_embedding_layers=True)
    capsys.readouterr()  # transformers' save progress bars (run alone, before the CLI quiets it)
    code = run("merge-checkpoint", "--base", tmp_path / "base", "--adapter", tmp_path / "adapter", tmp_path / "out")
    assert code == 2
    line = one_line_error(capsys, "has shape (272, 64)")
    assert "resize_token_embeddings(272)" in line
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]  # no staging directory left


def test_merge_checkpoint_writes_the_new_head_of_a_classification_adapter(masked_lm, tmp_path, capsys):
    """A SEQ_CLS adapter made on a masked-LM checkpoint (`RobertaForSequenceClassification.from_pretrained(base,
    num_labels=3)`: the classifier is new, its tensors are modules_to_save): merge-checkpoint writes them in a shard
    of their own with the config the head needs; `AutoModelForSequenceClassification.from_pretrained(merged)`
    loads with nothing missing and equals peft's forward with the adapter. Planted fault: a head tensor of a shape the
    model cannot take stays refused, naming the tensor."""
    base = masked_lm / "base"
    torch.manual_seed(3)
    classifier = transformers.RobertaForSequenceClassification.from_pretrained(base, num_labels=3)
    save_adapter(classifier, tmp_path / "ad_cls", "SEQ_CLS", ["query", "value"])
    assert run("merge-checkpoint", "--base", base, "--adapter", tmp_path / "ad_cls", tmp_path / "merged") == 0
    assert "added (a head the base lacks)" in capsys.readouterr().out
    merged, info = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged",
                                                                                   output_loading_info=True)
    assert not info["missing_keys"] and type(merged).__name__ == "RobertaForSequenceClassification", info
    assert merged.config.num_labels == 3
    torch.manual_seed(4)  # another random classifier: modules_to_save must replace it
    reference = peft.PeftModel.from_pretrained(
        transformers.RobertaForSequenceClassification.from_pretrained(base, num_labels=3),
        str(tmp_path / "ad_cls")).eval()  # peft's own forward: its merge_and_unload() (peft 0.21.2) stops at the
    # RobertaClassificationHead wrapper ("object has no attribute 'weight'")
    ids = torch.randint(3, 120, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        error = float((merged.eval()(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max())
    with capsys.disabled():
        print(f"merged SEQ_CLS head vs peft: max abs {error:.2e}")
    assert error <= 1e-5
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "ad_bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((tmp_path / "ad_cls" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "ad_cls" / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("classifier.dense.weight"))
    tensors[key] = tensors[key][:, :8].contiguous()
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    capsys.readouterr()  # transformers' loading progress bars
    assert run("merge-checkpoint", "--base", base, "--adapter", bad, tmp_path / "out") == 2
    one_line_error(capsys, "classifier.dense.weight")
    assert not (tmp_path / "out").exists()


def test_cannot_infer_the_task_names_the_flag_on_the_command_line(masked_lm, tmp_path, capsys):
    """A RobertaForMaskedLM checkpoint has no task road-export infers: the CLI's line names --task, Python's
    RoadError task=."""
    from road_export.export.tasks import infer_task

    capsys.readouterr()
    assert run("--base", masked_lm / "base", "--no-adapter", "--no-verify", tmp_path / "m.onnx") == 2
    line = one_line_error(capsys, "cannot infer the task of RobertaForMaskedLM; pass --task, one of")
    assert "task=" not in line
    with pytest.raises(RoadError, match="pass task= one of"):
        infer_task(transformers.RobertaForMaskedLM(roberta_config()))


def decoder_configs() -> dict[str, transformers.PretrainedConfig]:
    """Decoders whose config.json names heads and layers by aliases (attribute_map); ids within the vocabulary."""
    ids = {"bos_token_id": 0, "eos_token_id": 0}
    return {
        "gpt2": transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, **ids),
        "gpt_neo": transformers.GPTNeoConfig(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4,
                                             attention_types=[[["global", "local"], 1]], max_position_embeddings=64,
                                             window_size=8, **ids),
        "bloom": transformers.BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4, **ids),
        "falcon": transformers.FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, new_decoder_architecture=False, **ids),
    }


TARGETS = {"gpt_neo": ["q_proj", "v_proj"], "bloom": ["query_key_value"], "falcon": ["query_key_value"]}


def test_config_fields_resolve_aliases_and_defaults():
    """GPT-2's n_head/n_layer/n_embd/n_positions, GPT-Neo's num_heads/num_layers, Bloom's n_head/n_layer come out
    under their canonical names; planted fault: config.json's raw dict (the old reader) is refused in one line
    naming the key, not a KeyError."""
    for name, config in decoder_configs().items():
        fields = model_dir.config_fields(lambda key, c=config: getattr(c, key, None))
        assert (fields["num_attention_heads"], fields["num_hidden_layers"], fields["hidden_size"]) == (4, 2, 32), name
    raw = decoder_configs()["gpt2"].to_diff_dict()
    assert "num_attention_heads" not in raw
    assert model_dir.config_fields(raw.get).get("num_attention_heads") is None


@pytest.fixture(scope="module")
def decoder_dirs(tmp_path_factory):
    """Each decoder saved, a road_1 adapter saved by peft (GPT-2's Conv1D: none, peft's RoAd wraps nn.Linear only),
    exported into a model directory without verify (the tokens below are the check)."""
    root = tmp_path_factory.mktemp("decoders")
    out = {}
    for name, config in decoder_configs().items():
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / name)
        args = ["--no-adapter"]
        if name in TARGETS:
            save_adapter(transformers.AutoModelForCausalLM.from_pretrained(root / name), root / f"{name}-a",
                         "CAUSAL_LM", TARGETS[name])
            args = ["--adapter", root / f"{name}-a"]
        code = run("--base", root / name, *args, "--no-verify", "--quiet", root / f"{name}-dir")
        out[name] = (root, code)
    return out


@pytest.mark.parametrize("name", list(decoder_configs()))
def test_aliased_decoder_directories_generate_pefts_tokens_in_genai(decoder_dirs, name):
    og = pytest.importorskip("onnxruntime_genai")
    root, code = decoder_dirs[name]
    assert code == 0
    directory = root / f"{name}-dir"
    genai = json.loads((directory / "genai_config.json").read_text())["model"]
    assert genai["decoder"]["num_attention_heads"] == 4 and genai["decoder"]["num_hidden_layers"] == 2
    prompt = [5, 17, 33, 9, 60]
    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 8, do_sample=False, batch_size=1)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    got = [int(t) for t in generator.get_sequence(0)]
    base = transformers.AutoModelForCausalLM.from_pretrained(root / name).eval()
    reference = peft.PeftModel.from_pretrained(base, str(root / f"{name}-a")).eval() if name in TARGETS else base
    expected = reference.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, 5, dtype=torch.long),
                                  max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
    assert got == expected[0].tolist()


def test_genai_config_refuses_ids_outside_the_vocabulary(decoder_dirs):
    """Planted fault: an eos id past the vocabulary (GPT-2's class default 50256 on a 128-token model) is one line,
    not a directory onnxruntime-genai refuses to load."""
    root, _ = decoder_dirs["bloom"]
    fields = {"model_type": "bloom", "vocab_size": 128, "hidden_size": 32, "num_attention_heads": 4,
              "num_hidden_layers": 2, "eos_token_id": 50256}
    with pytest.raises(RoadError, match="eos_token_id within the vocabulary"):
        model_dir.genai_config(fields, root / "bloom-dir" / model_dir.MODEL_FILE)


# ---- 6. directories every client loads ----

def old_autotokenizer_class(directory: Path) -> str | None:
    """The class transformers 4.57's AutoTokenizer (use_fast) picks for tokenizer_config.json's tokenizer_class:
    NAME + "Fast" first, then NAME (tokenization_auto.AutoTokenizer.from_pretrained), among its class names; None
    when it finds none (it raises "Tokenizer class ... does not exist")."""
    name = json.loads((directory / "tokenizer_config.json").read_text()).get("tokenizer_class")
    for candidate in ([f"{name}Fast"] if not name.endswith("Fast") else []) + [name]:
        if candidate in TRANSFORMERS_4_TOKENIZERS:
            return candidate
    return None


def test_tokenizer_saved_by_transformers_5_loads_in_both(tmp_path):
    """A base whose tokenizer transformers 5 saves as "TokenizersBackend": the exported directory names a class
    transformers 4.x resolves, transformers 5 loads it, and both tokenize alike. Planted fault: the base's own
    files fail the 4.x check."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    base = tmp_path / "base"
    tiny("tiny-llama").save_pretrained(base)
    fast.save_pretrained(base)
    assert json.loads((base / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    assert old_autotokenizer_class(base) is None  # the planted fault: what optimum's transformers cannot load
    assert run("--base", base, "--no-adapter", "--no-verify", "--quiet", tmp_path / "out") == 0
    out = tmp_path / "out"
    assert old_autotokenizer_class(out) == "PreTrainedTokenizerFast"
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()  # the tokenizer is kept
    loaded = transformers.AutoTokenizer.from_pretrained(out)
    text = "the lazy fox"
    assert loaded(text).input_ids == fast(text).input_ids and loaded.eos_token == "<|endoftext|>"


def test_legacy_class_names_are_transformers_4s():
    """The list holds 4.x's names (a fast and a slow one of common families), not transformers 5's new ones."""
    assert {"LlamaTokenizerFast", "GPT2TokenizerFast", "Qwen2TokenizerFast", "T5TokenizerFast",
            "PreTrainedTokenizerFast", "BertTokenizer"} <= TRANSFORMERS_4_TOKENIZERS
    assert "TokenizersBackend" not in TRANSFORMERS_4_TOKENIZERS


# ---- 7. exit 3 only for our bugs ----

def test_a_torch_export_failure_on_our_inputs_is_our_bug(monkeypatch, tmp_path, capsys):
    """Planted fault: a data-dependent branch in a supported model's forward (as transformers' float16 clamp in BART
    has) stops torch.export: ExportBug naming the model class, exit 3 in one line; the same failure on inputs the
    caller gave stays RoadError."""
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaMLP.forward

    def branching(self, x):
        if torch.isfinite(x).all():
            return original(self, x)
        return original(self, x.clamp(-1e4, 1e4))

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", branching)
    torch.manual_seed(0)
    model = rx.get_road_model(tiny("tiny-llama"), rx.RoadConfig(variant="road_1", group_size=8, init_weights=False))
    with pytest.raises(ExportBug, match="tracing LlamaForCausalLM .*bug of road-export"):
        rx.export(model, tmp_path / "m.onnx", task="text-generation")
    assert not (tmp_path / "m.onnx").exists()
    ids = torch.randint(3, 100, (2, 3))
    with pytest.raises(RoadError, match="torch.onnx.export failed for LlamaForCausalLM"):
        rx.export(model, tmp_path / "m.onnx", task="text-generation",
                  example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    capsys.readouterr()
    assert run("--base", "tiny-llama", "--no-adapter", "--no-verify", "--task", "text-generation",
               tmp_path / "c.onnx") == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("road-export: internal error: ExportBug: torch.onnx.export "
                                                   "failed tracing LlamaForCausalLM"), lines


def test_file_against_file_long_check_skips_what_neither_file_runs(roberta, tmp_path):
    """`verify NEW --against TRUSTED` has no config to read the offset from: a long row neither file runs is a
    skipped row, not a failure of the file. Planted fault: a trusted file whose position table is longer runs it,
    so the new file that cannot is refused."""
    from road_export.app.parity.file_reference import verify_against_file

    root, _ = roberta
    new = tmp_path / "new.onnx"
    new.write_bytes((root / "model.onnx").read_bytes())
    report = verify_against_file(new, root / "model.onnx")
    assert report.passed and [r.case.split(":")[0] for r in report.rows if r.skipped] == ["long sequence"]
    longer = onnx.load(str(root / "model.onnx"))
    init = next(i for i in longer.graph.initializer if "position_embeddings" in i.name)
    table = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array(np.concatenate([table, table[-1:].repeat(170, 0)]), init.name))
    onnx.save(longer, str(tmp_path / "trusted.onnx"))
    with pytest.raises(RoadError, match="cannot run it on generated inputs"):
        verify_against_file(new, tmp_path / "trusted.onnx")


def test_float16_value_branch_is_refused_before_tracing(tmp_path, monkeypatch):
    """BART's layers branch on their values in float16 (transformers' overflow clamp): one line naming the layer and
    the way out, before any tracing; the same model in float32 and T5 (its clamp is a torch.where, traceable) are
    not refused. Planted fault: tracing is made to fail, so a refusal that came late would surface as ExportBug."""
    from road_export.export import capture, prepare

    def no_tracing(*args, **kwargs):
        raise AssertionError("traced")

    monkeypatch.setattr(capture, "torch_export", no_tracing)
    torch.manual_seed(0)
    bart = peft.get_peft_model(tiny("tiny-bart"), peft.RoadConfig(variant="road_1", group_size=8,
                                                                   target_modules=["q_proj", "v_proj"]))
    with pytest.raises(RoadError, match="BartForConditionalGeneration: Bart(Encoder|Decoder)Layer branches on its "
                                        "values in float16.*export it in float32"):
        rx.export(bart, tmp_path / "bart", dtype="float16")
    prepare.check_traceable(bart, torch.float32)
    prepare.check_traceable(tiny("tiny-t5"), torch.float16)
    prepare.check_traceable(tiny("tiny-llama"), torch.float16)
    assert not (tmp_path / "bart").exists()
