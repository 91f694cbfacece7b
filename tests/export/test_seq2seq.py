"""Encoder-decoder models (export/seq2seq.py, road_export/runtime/seq2seq.py): the seed's T5 example and BART / Marian,
merged and rotated, checked against peft's own model: the parity harness on each file, and greedy tokens equal to
peft's `generate` for a left-padded batch. Exports are shared per module; each costs a few seconds."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import peft
import pytest
import torch
from conftest import tiny

import road_export as rx
from road_export import RoadError
from road_export.runtime.sessions import open_session
from road_export.runtime.seq2seq import Seq2SeqSession
from road_export.app.verify import verify_seq2seq

SEED_REGEX = ".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$"  # peft's RoadConfig documentation, for T5
FILES = ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx")
MERGED = "decoder_model_merged.onnx"


def peft_model(name: str, adapters: dict[str, dict], seed: int = 0):
    """peft's model of a tiny base with RoAd adapters drawn at random (init_weights=False), eval mode."""
    base = tiny(name)
    torch.manual_seed(seed)
    first, *rest = adapters
    model = peft.get_peft_model(base, peft.RoadConfig(init_weights=False, **adapters[first]), first)
    for adapter in rest:
        model.add_adapter(adapter, peft.RoadConfig(init_weights=False, **adapters[adapter]))
    model.set_adapter(first)
    return model.eval()


def prompt(model, batch: int = 2, length: int = 7, pad: int = 3, seed: int = 5):
    """Token ids with row 0 left-padded by `pad` (pad_token_id under mask 0), as a tokenizer pads them."""
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size - 1, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    ids[0, :pad] = config.pad_token_id
    return ids, mask


def peft_generate(model, ids, mask, new: int = 8, **kwargs) -> np.ndarray:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, num_beams=1,
                              **kwargs).numpy()


def export_dir(tmp_path_factory, model, name: str, **kwargs):
    directory = tmp_path_factory.mktemp(name) / "model"
    result = rx.export(model, directory, **kwargs)
    return directory, result


@pytest.fixture(scope="module")
def t5_mixed(tmp_path_factory):
    """The seed's T5 example with each variant as its own adapter, rotate mode: one export covers road_1, road_2 and
    road_4 and mixed batches (adapter_ids)."""
    adapters = {v: {"variant": v, "group_size": 16, "target_modules": SEED_REGEX}
                for v in ("road_1", "road_2", "road_4")}
    model = peft_model("tiny-t5", adapters)
    directory, result = export_dir(tmp_path_factory, model, "t5mixed", mode="rotate")
    return model, directory, result


@pytest.fixture(scope="module")
def t5_swap(tmp_path_factory):
    """The seed's example, one road_4 adapter saved by peft, exported by the CLI into a model directory (rotate
    mode, swappable coefficients, verified against the model peft loads from the adapter directory)."""
    from road_export.app.cli import main

    model = peft_model("tiny-t5", {"default": {"variant": "road_4", "group_size": 16, "target_modules": SEED_REGEX,
                                               "task_type": "SEQ_2_SEQ_LM"}})
    root = tmp_path_factory.mktemp("t5swap")
    model.save_pretrained(root / "adapter")
    assert main(["--base", "tiny-t5", "--adapter", str(root / "adapter"), "--mode", "rotate", "--quiet",
                 "--report", str(root / "report.json"), str(root / "model")]) == 0
    report = json.loads((root / "report.json").read_text())
    assert report["passed"] and report["reference"] == "peft" and len(report["rows"]) == 27
    directory = root / "model" / "onnx"
    assert sorted(p.name for p in (root / "model").iterdir()) == ["config.json", "generation_config.json", "onnx"]
    from road_export.runtime.seq2seq import find_files

    assert find_files(root / "model") == {name: directory / name for name in (*FILES, MERGED)}
    return model, root / "model", sorted(directory.glob("*.onnx_adapter"))


@pytest.fixture(scope="module")
def t5_untied_merged(tmp_path_factory):
    """T5 v1.1's flavour (tie_word_embeddings false: no decoder output scaling; gated-gelu), road_2 merged.
    transformers 5 ties T5's lm_head to the embeddings either way; Marian below has a truly separate head."""
    model = peft_model("tiny-t5-untied", {"default": {"variant": "road_2", "group_size": 16,
                                                      "target_modules": SEED_REGEX}})
    directory, result = export_dir(tmp_path_factory, model, "t5untied", mode="merge")
    return model, directory, result


@pytest.fixture(scope="module")
def bart_rotated(tmp_path_factory):
    """BART, two adapters (road_1, road_2) on every q_proj/v_proj, encoder and decoder: rotations and adapter_ids in
    all three files."""
    model = peft_model("tiny-bart", {name: {"variant": name, "group_size": 16, "target_modules": ["q_proj", "v_proj"]}
                                     for name in ("road_1", "road_2")})
    directory, result = export_dir(tmp_path_factory, model, "bart", mode="rotate")
    return model, directory, result


@pytest.fixture(scope="module")
def marian_attached(tmp_path_factory):
    """Marian (sinusoidal positions, scaled embeddings, final_logits_bias, an lm_head apart from the embeddings:
    tie_word_embeddings false): the base exported without adapter and without past, then a road_4 adapter saved by
    peft attached to the files by the CLI, without torch, in rotate and in merge mode."""
    from road_export.app.cli import main

    model = peft_model("tiny-marian", {"default": {"variant": "road_4", "group_size": 16,
                                                   "target_modules": ["q_proj", "v_proj", "out_proj"]}})
    root = tmp_path_factory.mktemp("marian")
    model.save_pretrained(root / "adapter")
    rx.export(tiny("tiny-marian"), root / "base", mode="merge", task="text2text-generation",
              require_adapter=False)  # the same base weights (seed 0), no adapter
    for mode in ("rotate", "merge"):
        assert main(["attach", str(root / "base"), "--adapter", str(root / "adapter"), "--mode", mode, "--quiet",
                     str(root / mode)]) == 0
    return model, root


def road_nodes(path) -> int:
    return sum(1 for n in onnx.load(str(path), load_external_data=False).graph.node if n.domain == "road")


def test_seed_example_files_and_io(t5_mixed):
    _, directory, result = t5_mixed
    assert sorted(p.name for p in directory.glob("*.onnx")) == sorted([*FILES, MERGED])
    # two decoder layers: self q, v and cross q, v run in the first step; the cross k/v come from the cache after
    assert [road_nodes(directory / f) for f in FILES] == [0, 8, 6]
    assert result.road_nodes == 14 and result.task == "text2text-generation-with-past"
    enc = onnx.load(str(directory / FILES[0]), load_external_data=False).graph
    assert [i.name for i in enc.input] == ["input_ids", "attention_mask"]  # no rotation runs there: no adapter_ids
    dec = onnx.load(str(directory / FILES[2]), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in dec.input}
    assert inputs["past_key_values.1.encoder.value"] == ["batch_size", 4, "encoder_sequence_length_out", 16]
    assert inputs["past_key_values.0.decoder.key"] == ["batch_size", 4, "past_decoder_sequence_length", 16]
    assert inputs["adapter_ids"] == ["batch_size"]
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in dec.output}
    assert list(outputs) == ["logits"] + [f"present.{i}.decoder.{kv}" for i in range(2) for kv in ("key", "value")]
    assert outputs["present.0.decoder.key"] == ["batch_size", 4, "past_decoder_sequence_length + 1", 16]
    merged = onnx.load(str(directory / MERGED), load_external_data=False).graph  # optimum's merged decoder
    assert [n.op_type for n in merged.node] == ["If"] and merged.input[-1].name == "use_cache_branch"
    first = onnx.load(str(directory / FILES[1]), load_external_data=False).graph
    assert [o.name for o in merged.output] == [o.name for o in first.output]


def test_single_file_commands_name_the_encoder_decoder_directory(t5_mixed):
    """inspect / adapter --like read one ONNX file: on an encoder-decoder directory they say which file to give."""
    from road_export.graph.model_dir import model_file

    with pytest.raises(RoadError, match="encoder-decoder directory.*onnx/decoder_model.onnx"):
        model_file(t5_mixed[1])


def test_parity_rotate_every_variant(t5_mixed):
    model, directory, _ = t5_mixed
    report = verify_seq2seq(directory, model)
    assert report.passed, report.table()
    # 3 shapes: encoder, decoder x2, with past x2, and the merged decoder's two branches x2
    assert report.reference == "peft" and len(report.rows) == 27
    assert any("decoder_with_past_model.onnx" in r.case and "ids 1,2,3" in r.case for r in report.rows)


@pytest.mark.parametrize("native", [True, False], ids=["native", "bodies"])
def test_mixed_batch_generate_equals_peft(t5_mixed, native):
    model, directory, _ = t5_mixed
    session = open_session(directory, native=native)
    assert isinstance(session, Seq2SeqSession) and session.adapters == ["road_1", "road_2", "road_4"]
    names = ["road_4", "__base__", "road_1", "road_2"]
    ids, mask = prompt(model, batch=4)
    got = session.generate(ids.numpy(), mask.numpy(), max_new_tokens=8, adapter_names=names)
    expected = peft_generate(model, ids, mask, adapter_names=names)
    np.testing.assert_array_equal(got, expected)
    assert (got[:, 0] == model.config.decoder_start_token_id).all()
    for row, name in enumerate(names):  # each row is its adapter's own run
        alone = session.generate(ids[row:row + 1].numpy(), mask[row:row + 1].numpy(), max_new_tokens=8,
                                 adapter=name)
        np.testing.assert_array_equal(alone[0, :got.shape[1]], got[row, :alone.shape[1]])


def test_greedy_and_swap_equal_peft(t5_swap, tmp_path):
    model, directory, swap_files = t5_swap
    assert [f.name for f in swap_files] == ["decoder_model.default.onnx_adapter",
                                            "decoder_model_merged.default.onnx_adapter",
                                            "decoder_with_past_model.default.onnx_adapter"]
    assert verify_seq2seq(directory, model).passed
    session = open_session(directory)
    ids, mask = prompt(model)
    np.testing.assert_array_equal(session.generate(ids.numpy(), mask.numpy(), max_new_tokens=8),
                                  peft_generate(model, ids, mask))
    # another adapter, trained apart, converted for each file that holds rotations and swapped in per run
    other = peft_model("tiny-t5", {"default": {"variant": "road_4", "group_size": 16, "target_modules": SEED_REGEX}},
                       seed=7)
    other.save_pretrained(tmp_path / "other")
    from road_export.runtime.seq2seq import convert_adapter

    files = convert_adapter(tmp_path / "other", directory, "other")
    assert sorted(files) == sorted([*FILES[1:], MERGED])
    assert open_session(directory).adapters == ["default", "other"]  # found beside the files by name and fingerprint
    session.load_adapter("other", files)
    swapped = session.generate(ids.numpy(), mask.numpy(), max_new_tokens=8, adapter="other")
    np.testing.assert_array_equal(swapped, peft_generate(other, ids, mask))
    assert not np.array_equal(swapped, session.generate(ids.numpy(), mask.numpy(), max_new_tokens=8))
    with pytest.raises(RoadError, match="give one .onnx_adapter for each"):
        session.load_adapter("half", {FILES[1]: files[FILES[1]]})


def test_sampling_reproducible_and_cache_consistent(t5_swap):
    model, directory, _ = t5_swap
    session = open_session(directory)
    ids, mask = prompt(model)
    opts = {"max_new_tokens": 10, "do_sample": True, "temperature": 0.8, "top_k": 40, "seed": 3}
    cached = session.generate(ids.numpy(), mask.numpy(), **opts)
    np.testing.assert_array_equal(cached, session.generate(ids.numpy(), mask.numpy(), **opts))
    # decoder_model.onnx over all tokens each step draws the same tokens: the cache changes nothing
    np.testing.assert_array_equal(cached, session.generate(ids.numpy(), mask.numpy(), use_cache=False, **opts))
    assert not np.array_equal(cached, session.generate(ids.numpy(), mask.numpy(), max_new_tokens=10))


def test_untied_t5_merged_equals_peft(t5_untied_merged):
    model, directory, result = t5_untied_merged
    assert result.road_nodes == 0 and not model.config.scale_decoder_outputs
    report = verify_seq2seq(directory, model)
    assert report.passed, report.table()
    ids, mask = prompt(model)
    np.testing.assert_array_equal(open_session(directory).generate(ids.numpy(), mask.numpy(), max_new_tokens=8),
                                  peft_generate(model, ids, mask))


def test_bart_rotations_in_every_file(bart_rotated):
    model, directory, result = bart_rotated
    # encoder: 2 layers x (q, v); decoder: 2 x (self q, v, cross q, v); with past: cross v is cached
    assert [road_nodes(directory / f) for f in FILES] == [4, 8, 6]
    for name in FILES:
        graph = onnx.load(str(directory / name), load_external_data=False).graph
        assert graph.input[-1].name == "adapter_ids"
    report = verify_seq2seq(directory, model)
    assert report.passed, report.table()
    ids, mask = prompt(model, batch=3)
    names = ["road_2", "road_1", "__base__"]
    np.testing.assert_array_equal(
        open_session(directory).generate(ids.numpy(), mask.numpy(), max_new_tokens=8, adapter_names=names),
        peft_generate(model, ids, mask, adapter_names=names))


@pytest.mark.parametrize("mode", ["rotate", "merge"])
def test_marian_attached_equals_peft(marian_attached, mode):
    model, root = marian_attached
    directory = root / mode
    assert sorted(p.name for p in directory.glob("*.onnx")) == sorted(FILES[:2])  # the task without past
    inner = model.get_base_model()
    assert inner.lm_head.weight.data_ptr() != inner.model.shared.weight.data_ptr()
    # 2 encoder layers x (q, v, out_proj); 2 decoder layers x (self q, v, out_proj; cross q, v, out_proj)
    assert [road_nodes(directory / f) for f in FILES[:2]] == ([6, 12] if mode == "rotate" else [0, 0])
    report = verify_seq2seq(directory, model)
    assert report.passed, report.table()
    ids, mask = prompt(model)
    np.testing.assert_array_equal(open_session(directory).generate(ids.numpy(), mask.numpy(), max_new_tokens=8),
                                  peft_generate(model, ids, mask))
    base = verify_seq2seq(root / "base", model)  # the base alone is not the adapted model: parity must fail
    assert not base.passed


def test_verify_catches_a_planted_fault(t5_swap, tmp_path):
    """One coefficient of one layer changed in decoder_with_past_model.onnx only: that file's rows fail."""
    model, directory, _ = t5_swap
    broken = tmp_path / "broken"
    broken.mkdir()
    from road_export.runtime.seq2seq import find_files

    for name, path in find_files(directory).items():
        proto = onnx.load(str(path))
        if name == FILES[2]:
            records = json.loads({p.key: p.value for p in proto.metadata_props}["road_export.swap"])
            c1 = next(iter(records.values()))["c1"]
            tensor = next(t for t in proto.graph.initializer if t.name == c1)
            values = onnx.numpy_helper.to_array(tensor).copy()
            values[3] += 0.5
            tensor.CopyFrom(onnx.numpy_helper.from_array(values, c1))
        onnx.save(proto, str(broken / name))
    report = verify_seq2seq(broken, model)
    assert not report.passed
    failed = {r.case.split(":")[0] for r in report.rows if not r.ok}
    assert failed == {FILES[2]}


def test_onnx_path_refused(t5_swap, tmp_path):
    from road_export.app.cli import main

    model, _, _ = t5_swap
    assert main(["--base", "tiny-t5", "--task", "text2text-generation", str(tmp_path / "m.onnx")]) == 2
    with pytest.raises(RoadError, match="encoder-decoder model.*give a directory"):
        rx.export(model, tmp_path / "t5.onnx")
    assert not list(tmp_path.iterdir())
    with pytest.raises(RoadError, match="exists and is not an empty directory"):
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "x").write_text("x")
        rx.export(model, tmp_path / "full")
    with pytest.raises(RoadError, match="give a directory"):
        rx.export(copy.deepcopy(model), tmp_path / "t5.onnx", task="text2text-generation")


def test_merge_checkpoint_of_t5_equals_peft(t5_swap, tmp_path):
    """merge-checkpoint on a T5 checkpoint (transformers' save_pretrained) with the seed's adapter: transformers
    loads the result, and its greedy tokens are peft's."""
    import transformers

    from road_export.app.cli import main

    model, directory, _ = t5_swap
    tiny("tiny-t5").save_pretrained(tmp_path / "base")
    assert main(["merge-checkpoint", "--base", str(tmp_path / "base"), "--adapter", str(directory.parent / "adapter"),
                 "--quiet", str(tmp_path / "merged")]) == 0
    merged = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    ids, mask = prompt(model)
    np.testing.assert_array_equal(peft_generate(merged, ids, mask), peft_generate(model, ids, mask))
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :3]).logits
        ours = merged(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :3]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_generation_runs_without_torch(t5_swap, tmp_path):
    """The serving floor: open_session(directory) opens and generates with torch, transformers and peft blocked."""
    from test_floor import BLOCK_TORCH, run_python

    model, directory, _ = t5_swap
    ids, mask = prompt(model)
    np.save(tmp_path / "ids.npy", ids.numpy())
    np.save(tmp_path / "mask.npy", mask.numpy())
    code = BLOCK_TORCH + (
        "import sys, numpy as np\n"
        "from road_export.runtime.sessions import open_session\n"
        f"s = open_session({str(directory)!r})\n"
        f"out = s.generate(np.load({str(tmp_path / 'ids.npy')!r}), np.load({str(tmp_path / 'mask.npy')!r}), "
        "max_new_tokens=8, adapter='other' if 'other' in s.adapters else None)\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, out)\n"
        "assert not [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "print(type(s).__name__)\n")
    done = run_python(code, tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "Seq2SeqSession", done.stderr
    session = open_session(directory)
    expected = session.generate(ids.numpy(), mask.numpy(), max_new_tokens=8,
                                adapter="other" if "other" in session.adapters else None)
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)


def test_verify_without_base_says_to_pass_it(t5_swap, capsys):
    """`road-export verify DIR` on an encoder-decoder export without --base: the embedded default (a decoder-only
    model) cannot be its source, so the command says to pass --base and exits 2 instead of blaming the task."""
    from road_export.app.cli import main

    _, directory, _ = t5_swap
    assert main(["verify", str(directory)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --base" in err[0] and "text2text" not in err[0], err


def test_all_linear_adapter_including_the_feed_forward_output(tmp_path_factory):
    """T5's feed-forward reads `self.wo.weight.dtype`: with `wo` adapted (target_modules "all-linear") the wrapped
    layer must still answer `.weight`, as peft's layers do; the export then verifies against peft."""
    model = peft_model("tiny-t5", {"default": {"variant": "road_2", "group_size": 16, "target_modules": "all-linear"}})
    assert any(name.endswith("DenseReluDense.wo") for name, _ in model.named_modules())
    directory, _ = export_dir(tmp_path_factory, model, "t5all", mode="rotate")
    report = verify_seq2seq(directory, model)
    assert report.passed, report.table()


def test_session_options_reach_every_file(t5_swap):
    """`open_session(directory, session_config=..., fuse=...)` opens a Seq2SeqSession with the same options (fused
    nodes only on CUDA: none here)."""
    _, directory, _ = t5_swap
    session = open_session(directory, session_config={"session.intra_op.allow_spinning": "0"}, fuse=False)
    assert isinstance(session, Seq2SeqSession) and session.fused == 0


@pytest.mark.parametrize(("name", "text", "says"), [
    ("config.json", "[]", "config.json: holds a JSON array, not an object; fix it, or export the model again"),
    ("generation_config.json", '{"eos_token_id": ', "generation_config.json: not JSON (Expecting value: line 1 "
                                                     "column 18 (char 17)); fix it, or export the model again"),
], ids=["config-list", "generation-not-json"])
def test_damaged_generation_files_are_one_line(t5_swap, tmp_path, name, text, says):
    """The directory's config.json / generation_config.json (the generation defaults) damaged: one RoadError line."""
    import shutil

    _, directory, _ = t5_swap
    copy = tmp_path / "model"
    shutil.copytree(directory, copy)
    (copy / name).write_text(text)
    with pytest.raises(RoadError) as caught:
        Seq2SeqSession(copy)
    assert says in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
