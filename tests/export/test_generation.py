"""Decoder export with a KV cache (text-generation-with-past) and RoadSession.generate against peft's generate."""

import numpy as np
import onnx
import peft
import pytest
import torch
from conftest import tiny

import road_export as rx
from road_export import RoadConfig, RoadError
from road_export.runtime.session import RoadSession
from road_export.app.testing import assert_onnx_parity

TASK = "text-generation-with-past"
ARCHS = {"tiny-llama": "road_1", "tiny-qwen2": "road_2", "tiny-mistral": "road_4", "tiny-phi3": "road_1",
         "tiny-opt": "road_2"}
MODES = ["merge", "rotate"]
NEW_TOKENS = 20


def peft_model(name, variant, seed=0):
    torch.manual_seed(seed)
    config = peft.RoadConfig(variant=variant, group_size=8, init_weights=False, target_modules="all-linear")
    return peft.get_peft_model(tiny(name), config).eval()


def prompt(vocab, batch=2, length=7, pad=3, seed=3):
    """Token ids with `pad` left-padded positions in row 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    return ids, mask


def torch_generate(model, ids, mask, new=NEW_TOKENS):
    """Greedy with no EOS token (not a suppressed one, which would change the argmax): (tokens, raw logits per step)."""
    defaults = model.generation_config
    saved, defaults.eos_token_id = defaults.eos_token_id, None  # generate() fills an unset EOS from the defaults
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                 pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    finally:
        defaults.eos_token_id = saved
    assert out.sequences.shape[1] == ids.shape[1] + new
    return out.sequences[:, ids.shape[1]:].numpy(), [t.numpy() for t in out.logits]


def ort_generate(session, ids, mask, new=NEW_TOKENS, **kwargs):
    steps = list(session.stream(ids.numpy(), mask.numpy(), max_new_tokens=new, **kwargs))
    return np.stack([s.tokens for s in steps], 1), [s.logits for s in steps]


@pytest.fixture(scope="session")
def generation_exports(tmp_path_factory):
    """(name, mode) -> (peft model, ExportResult), each exported once per session from the live peft model."""
    root = tmp_path_factory.mktemp("generation")
    cache = {}

    def get(name, mode):
        if (name, mode) not in cache:
            model = peft_model(name, ARCHS[name])
            cache[name, mode] = model, rx.export(model, root / f"{name}-{mode}.onnx", mode=mode, task=TASK)
        return cache[name, mode]

    return get


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(ARCHS))
def test_greedy_tokens_and_logits_equal_peft_generate(generation_exports, name, mode):
    model, result = generation_exports(name, mode)
    ids, mask = prompt(model.config.vocab_size)
    want_tokens, want_logits = torch_generate(model, ids, mask)
    got_tokens, got_logits = ort_generate(RoadSession(result.path), ids, mask)
    np.testing.assert_array_equal(got_tokens, want_tokens)
    assert len(got_logits) == NEW_TOKENS
    assert max(np.abs(g - w).max() for g, w in zip(got_logits, want_logits, strict=True)) <= 1e-4
    with model.disable_adapter():  # the adapter changes what is generated: the comparison above is not vacuous
        _, base_logits = torch_generate(model, ids, mask, new=1)
    assert np.abs(got_logits[0] - base_logits[0]).max() > 1e-3


@pytest.mark.parametrize("name", list(ARCHS))
def test_io_follows_the_optimum_convention(generation_exports, name):
    model, result = generation_exports(name, "rotate")
    graph = onnx.load(result.path).graph
    layers, config = model.config.num_hidden_layers, model.config
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    positions = ["position_ids"]  # every decoder whose forward takes them, OPT included
    assert [i.name for i in graph.input if not i.name.startswith("model.")] == \
        ["input_ids", "attention_mask", *positions, *past]
    assert [o.name for o in graph.output] == \
        ["logits", *[f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]]
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dims = [d.dim_value or d.dim_param for d in graph.input[len(positions) + 2].type.tensor_type.shape.dim]
    assert dims == ["batch_size", kv_heads, "past_sequence_length", config.hidden_size // config.num_attention_heads]
    assert result.task == TASK and result.road_nodes == len(rx.road_layers(rx.from_peft(model)))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_parity_harness_covers_prefill_and_decode_with_cache(generation_exports, name):
    model, result = generation_exports(name, "rotate")
    report = assert_onnx_parity(result.path, model)
    cases = {r.case for r in report.rows}
    assert any("past 0" in c for c in cases) and any("past 9" in c for c in cases)
    assert {r.output for r in report.rows} == {"logits", "present.*"}


def test_batch_with_left_padding_equals_rows_run_alone(generation_exports):
    model, result = generation_exports("tiny-qwen2", "merge")
    session = RoadSession(result.path)
    ids, mask = prompt(model.config.vocab_size, pad=4)
    both = session.generate(ids.numpy(), mask.numpy(), max_new_tokens=8)
    alone = session.generate(ids[:1, 4:].numpy(), max_new_tokens=8)
    np.testing.assert_array_equal(both[0, 7:], alone[0, 3:])
    assert both.shape == (2, 7 + 8)


def test_mixed_adapters_generate_each_row_with_its_own_adapter(tmp_path):
    torch.manual_seed(1)
    model = tiny("tiny-llama")
    rx.get_road_model(model, RoadConfig(variant="road_1", group_size=8, init_weights=False), adapter_name="a")
    rx.get_road_model(model, RoadConfig(variant="road_4", group_size=16, init_weights=False,
                                        target_modules="all-linear"), adapter_name="b")
    result = rx.export(model, tmp_path / "mixed.onnx", mode="rotate", task=TASK)
    session = RoadSession(result.path)
    assert session.mixed and session.adapters == ["a", "b"]
    rows = ["b", "__base__", "a"]
    ids, mask = prompt(model.config.vocab_size, batch=3)
    got_tokens, got_logits = ort_generate(session, ids, mask, adapter_names=rows)
    for row, adapter in enumerate(rows):
        if adapter == "__base__":
            with rx.disable_adapters(model):
                want_tokens, want_logits = torch_generate(model, ids, mask)
        else:
            rx.set_adapter(model, adapter)
            want_tokens, want_logits = torch_generate(model, ids, mask)
        np.testing.assert_array_equal(got_tokens[row], want_tokens[row])
        assert max(np.abs(g[row] - w[row]).max() for g, w in zip(got_logits, want_logits, strict=True)) <= 1e-4
    assert len({tuple(t) for t in got_tokens[1:]}) == 2  # base and adapter rows differ


def test_swapped_adapter_generates_like_torch_with_that_adapter(generation_exports, tmp_path):
    model, result = generation_exports("tiny-llama", "rotate")
    other = peft_model("tiny-llama", "road_1", seed=7)
    other.save_pretrained(tmp_path / "other")
    from road_export.graph.swap import convert_adapter

    convert_adapter(tmp_path / "other", result.path, tmp_path / "other.onnx_adapter")
    session = RoadSession(result.path)
    session.load_adapter(tmp_path / "other.onnx_adapter", "other")
    ids, mask = prompt(model.config.vocab_size)
    for adapter, reference in (("other", other), (session.adapters[0], model)):
        want_tokens, want_logits = torch_generate(reference, ids, mask)
        got_tokens, got_logits = ort_generate(session, ids, mask, adapter=adapter)
        np.testing.assert_array_equal(got_tokens, want_tokens)
        assert max(np.abs(g - w).max() for g, w in zip(got_logits, want_logits, strict=True)) <= 1e-4


def test_export_without_cache_generates_the_same_tokens(generation_exports, tmp_path):
    model, result = generation_exports("tiny-mistral", "merge")
    plain = rx.export(model, tmp_path / "plain.onnx", mode="merge", task="causal-lm")
    ids, mask = prompt(model.config.vocab_size)
    cached = RoadSession(result.path).generate(ids.numpy(), mask.numpy(), max_new_tokens=6)
    recomputed = RoadSession(plain.path).generate(ids.numpy(), mask.numpy(), max_new_tokens=6)
    np.testing.assert_array_equal(cached, recomputed)


def test_eos_finishes_rows_and_sampling_is_seeded(generation_exports):
    model, result = generation_exports("tiny-phi3", "merge")
    session = RoadSession(result.path)
    ids, mask = prompt(model.config.vocab_size)
    greedy = session.generate(ids.numpy(), mask.numpy(), max_new_tokens=6)
    eos = int(greedy[0, 8])  # row 0's second new token
    stopped = session.generate(ids.numpy(), mask.numpy(), max_new_tokens=6, eos_token_id=eos, pad_token_id=1)
    assert stopped[0, 8] == eos and (stopped[0, 9:] == 1).all()
    if eos not in greedy[1, 7:]:
        np.testing.assert_array_equal(stopped[1], greedy[1])
    both = session.generate(ids.numpy(), mask.numpy(), max_new_tokens=6, eos_token_id=list(greedy[:, 7]))
    np.testing.assert_array_equal(both, greedy[:, :8])  # every row finished at its first token: no more steps
    sample = dict(max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    a = session.generate(ids.numpy(), mask.numpy(), seed=5, **sample)
    b = session.generate(ids.numpy(), mask.numpy(), seed=5, **sample)
    np.testing.assert_array_equal(a, b)
    top1 = session.generate(ids.numpy(), mask.numpy(), max_new_tokens=6, do_sample=True, top_k=1, seed=2)
    np.testing.assert_array_equal(top1, greedy)


def test_bad_generation_input_is_one_clear_error(generation_exports, tmp_path):
    model, result = generation_exports("tiny-opt", "merge")
    session = RoadSession(result.path)
    ids, mask = prompt(model.config.vocab_size)
    with pytest.raises(RoadError, match="attention_mask shape"):
        session.generate(ids.numpy(), mask.numpy()[:, 1:])
    with pytest.raises(RoadError, match="max_new_tokens"):
        session.generate(ids.numpy(), max_new_tokens=0)
    with pytest.raises(RoadError, match="input_ids must lie"):
        session.generate(ids.numpy() + 1000)
    with pytest.raises(RoadError, match="temperature"):
        session.generate(ids.numpy(), do_sample=True, temperature=0)
    with pytest.raises(RoadError, match="at least one token"):
        session.generate(ids.numpy(), np.zeros_like(mask.numpy()))
    features = rx.export(tiny("tiny-bert"), tmp_path / "bert.onnx", require_adapter=False)
    with pytest.raises(RoadError, match="not a causal language model"):
        RoadSession(features.path).generate(ids.numpy())
    with pytest.raises(RoadError, match="needs a causal language model"):
        rx.export(tiny("tiny-bert"), tmp_path / "bert-past.onnx", require_adapter=False, task=TASK)
    assert not (tmp_path / "bert-past.onnx").exists()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpt2_and_fp16_exports_keep_parity_and_generate(tmp_path, dtype):
    torch.manual_seed(2)
    name = "tiny-gpt2" if dtype == "float32" else "tiny-llama"
    model = rx.get_road_model(tiny(name), RoadConfig(variant="road_4", group_size=8, init_weights=False,
                                                     target_modules="all-linear")).eval()
    result = rx.export(model, tmp_path / "decoder.onnx", mode="rotate", task=TASK, dtype=dtype)
    assert_onnx_parity(result.path, model)  # float16: the cache is fed rounded to float16, tolerance 2e-2
    ids, mask = prompt(model.config.vocab_size)
    got_tokens, _ = ort_generate(RoadSession(result.path), ids, mask, new=8)
    assert got_tokens.shape == (2, 8)
    if dtype == "float32":  # GPT-2's Conv1D layers, which peft cannot wrap, adapted by road-export
        want_tokens, _ = torch_generate(model, ids, mask, new=8)
        np.testing.assert_array_equal(got_tokens, want_tokens)


@pytest.mark.parametrize("mode", MODES)
def test_adapter_attached_to_a_base_decoder_export_generates_like_peft(tmp_path, mode):
    from road_export.passes.attach import attach

    base = tmp_path / "base.onnx"  # the plain base model's decoder, no adapter
    rx.export(tiny("tiny-qwen2"), base, task=TASK, require_adapter=False)
    model = peft_model("tiny-qwen2", "road_2", seed=5)
    model.save_pretrained(tmp_path / "adapter")
    attach(base, [tmp_path / "adapter"], tmp_path / "attached.onnx", mode=mode)
    ids, mask = prompt(model.config.vocab_size)
    want_tokens, want_logits = torch_generate(model, ids, mask, new=10)
    got_tokens, got_logits = ort_generate(RoadSession(tmp_path / "attached.onnx"), ids, mask, new=10)
    np.testing.assert_array_equal(got_tokens, want_tokens)
    assert max(np.abs(g - w).max() for g, w in zip(got_logits, want_logits, strict=True)) <= 1e-4


def test_sliding_window_lives_in_the_mask(tmp_path):
    """Mistral with a 4-token window: the graph keeps every position and masks, torch crops its cache."""
    from transformers import MistralForCausalLM

    config = tiny("tiny-mistral").config
    config.sliding_window = 4
    torch.manual_seed(0)
    model = rx.get_road_model(MistralForCausalLM(config).eval(), RoadConfig(
        variant="road_2", group_size=8, init_weights=False, target_modules="all-linear"))
    result = rx.export(model, tmp_path / "window.onnx", mode="rotate", task=TASK)
    ids, mask = prompt(config.vocab_size, length=9)
    want_tokens, want_logits = torch_generate(model, ids, mask, new=12)
    got_tokens, got_logits = ort_generate(RoadSession(result.path), ids, mask, new=12)
    np.testing.assert_array_equal(got_tokens, want_tokens)
    assert max(np.abs(g - w).max() for g, w in zip(got_logits, want_logits, strict=True)) <= 1e-4
    config.sliding_window = None
    with torch.no_grad():  # the window matters for this prompt: without it the logits differ
        unwindowed = model(input_ids=ids, attention_mask=mask).logits[:, -1].numpy()
    assert np.abs(unwindowed - got_logits[0]).max() > 1e-3
