"""Our runtime on model builder directories on the GPU: RoadSession's generation and serve's engine on a float16
directory `road-export --graph builder` wrote for CUDA, with onnxruntime's CUDA graphs (runtime.graphs) and without,
against onnxruntime-genai's own generator on the same directory (exact: the same kernels). peft's tokens are the
reference of tests/test_builder*.py (float32 on the CPU) and of tools/bench_builder_gpu.py (22 layers, float16 on the
GPU); this model's random logits are too flat for float16 torch to agree with. Marked `gpu`; skipped without
onnxruntime's CUDA provider, the road CUDA kernels or onnxruntime-genai (whose model builder writes the graph).
float16, as the builder's fp32 CUDA graph keeps q/k/v inside onnxruntime's Attention op, where RoAd cannot be
placed."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import peft
import pytest
import torch
from conftest import word_tokenizer

from road_export.graph import native
from road_export.runtime.gpu import cuda_providers
from road_export.runtime.session import RoadSession

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                       reason="onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"),
    pytest.mark.skipif(native.cuda_kernels() is not None, reason=f"no road CUDA kernels: {native.cuda_kernels()}"),
]
pytest.importorskip("onnxruntime_genai")

NEW = 12
VOCAB = 512


def llama() -> torch.nn.Module:
    """A small Llama (hidden 256, head size 64, 4 heads on 2 key/value heads, 2 layers), seed 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def prompts(batch: int = 2, length: int = 9, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """`batch` rows; row 0 left padded by 3."""
    ids = np.random.default_rng(seed).integers(3, VOCAB, (batch, length))
    mask = np.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


def genai_generate(directory, ids: np.ndarray, new: int = NEW, *, adapter_ids: list[int] | None = None) -> np.ndarray:
    """onnxruntime-genai's greedy tokens on `directory` (rows of one length), [rows, prompt + new]."""
    import onnxruntime_genai as og

    config = og.Config(str(directory))
    config.clear_providers()
    config.append_provider("cuda")
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + new, min_length=ids.shape[1] + new, do_sample=False,
                              batch_size=ids.shape[0])
    generator = og.Generator(model, params)
    if adapter_ids is not None:
        generator.set_model_input("adapter_ids", np.asarray(adapter_ids, np.int64))
    generator.append_tokens(ids.astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return np.stack([np.asarray(generator.get_sequence(i)) for i in range(ids.shape[0])])


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    """{"one": a builder directory (float16, CUDA) with adapter "one" (swappable), "mixed": with "one" and "two"
    (adapter_ids)}, and peft's models {"one", "two"}."""
    return make_directories(tmp_path_factory.mktemp("gpu-builder"))


def make_directories(root):
    from road_export.app import genai_builder

    base = llama()
    base.save_pretrained(root / "hf")
    word_tokenizer(root / "hf", VOCAB)
    models = {}
    for name, seed in (("one", 1), ("two", 2)):
        torch.manual_seed(seed)
        config = peft.RoadConfig(variant="road_2", group_size=64, init_weights=False, target_modules="all-linear")
        models[name] = peft.get_peft_model(copy.deepcopy(base), config).eval()
        models[name].save_pretrained(root / name)
    built = {}
    for out, names in (("one", ["one"]), ("mixed", ["one", "two"])):
        genai_builder.build(root / "hf", [(n, root / n) for n in names], root / f"dir-{out}", dtype="float16",
                            provider="cuda", verify=False)
        built[out] = root / f"dir-{out}"
    return built, models


def session(directory, graphs: bool) -> RoadSession:
    return RoadSession(directory, providers=cuda_providers(cuda_graph=graphs, tf32=False))


def test_cuda_graphs_give_genais_tokens_and_replay_again(directories):
    """RoadSession.generate with onnxruntime's CUDA graphs: genai's tokens on the same directory, one row and two
    (one left padded, each row against genai's for it alone), as our loop without graphs; a second call of the same
    shapes replays the same graph (one static set), another batch size records a second; sampling draws the same
    tokens as without graphs; a plain run on the session is not recorded."""
    from road_export.runtime.graphs import graph_pool

    built, _ = directories
    ids, mask = prompts()
    plain = session(built["one"], False)
    graphs = session(built["one"], True)
    assert not plain.cuda_graph and graphs.cuda_graph and graphs.device == "cuda"
    one = ids[1:]
    want = genai_generate(built["one"], one)
    for _ in range(3):
        np.testing.assert_array_equal(graphs.generate(one, max_new_tokens=NEW), want)
    pool = graph_pool(graphs, "cuda", 0)
    assert pool.capture and len(pool.sets) == 1
    np.testing.assert_array_equal(plain.generate(one, max_new_tokens=NEW), want)
    got = graphs.generate(ids, mask, max_new_tokens=NEW)
    assert len(pool.sets) == 2
    np.testing.assert_array_equal(got, plain.generate(ids, mask, max_new_tokens=NEW))
    np.testing.assert_array_equal(got[1], want[0])
    padded = ids[:1, 3:]
    np.testing.assert_array_equal(got[0, 3:], genai_generate(built["one"], padded)[0])
    sampled = dict(do_sample=True, temperature=0.7, seed=5, max_new_tokens=NEW)
    np.testing.assert_array_equal(graphs.generate(ids, mask, **sampled), plain.generate(ids, mask, **sampled))
    # runs outside the decode steps are not recorded (gpu_graph_id -1): each sees its own inputs
    first = graphs.run({"input_ids": ids[1:, :4], "attention_mask": mask[1:, :4], **_empty(graphs, 1)})
    second = graphs.run({"input_ids": ids[1:, 4:8], "attention_mask": mask[1:, 4:8], **_empty(graphs, 1)})
    assert not np.allclose(first["logits"], second["logits"])
    np.testing.assert_allclose(second["logits"], plain.run({"input_ids": ids[1:, 4:8], "attention_mask": mask[1:, 4:8],
                                                            **_empty(plain, 1)})["logits"], atol=1e-2)


def _empty(s: RoadSession, rows: int) -> dict:
    from road_export.runtime.kvcache import new_cache

    return new_cache(s.cache_layout, rows).empty(rows, 0)


def test_cuda_graphs_on_a_mixed_batch(directories):
    """Rows on different adapters (adapter_ids in a static buffer, written again for the next call's rows): genai's
    tokens for the same adapter_ids, as without graphs."""
    built, _ = directories
    ids = prompts()[0][1:].repeat(2, 0)
    graphs, plain = session(built["mixed"], True), session(built["mixed"], False)
    for names, numbers in ((["two", "one"], [2, 1]), (["one", "two"], [1, 2])):  # same shapes, other adapter_ids
        got = graphs.generate(ids, max_new_tokens=NEW, adapter_names=names)
        np.testing.assert_array_equal(got, genai_generate(built["mixed"], ids, adapter_ids=numbers))
        np.testing.assert_array_equal(got, plain.generate(ids, max_new_tokens=NEW, adapter_names=names))
    assert not np.array_equal(got[0], got[1])


@pytest.mark.parametrize("graphs", [False, True], ids=["bound", "graphs"])
def test_the_engine_on_cuda_grows_its_buffer_and_gives_genais_tokens(directories, graphs, monkeypatch):
    """serve's engine on the mixed directory on CUDA: rows on two adapters join a running batch and leave it, the
    shared buffer starts at 8 positions and grows on the device (DeviceMemory.grow), with CUDA graphs (a static set
    leased per rows and size) and without; each row's tokens equal genai's for its prompt alone."""
    from road_export.app.serving.engine import Engine, GenerationRequest, SamplingParams
    from road_export.runtime import kvcache

    built, _ = directories
    monkeypatch.setattr(kvcache, "SMALLEST_BUFFER", 8)
    engine = Engine(built["mixed"], max_batch_size=4, providers=cuda_providers(tf32=False), cuda_graph=graphs)
    assert engine.session.device == "cuda" and engine.session.cuda_graph == graphs
    assert (engine._pool is not None) == graphs
    if not graphs:  # a builder directory gets CUDA graphs by default (genai_config.json's past_present_share_buffer)
        assert Engine(built["mixed"], providers=cuda_providers()).session.cuda_graph
    # prompts of 5 tokens and more: genai 0.18's own tokens on a mixed directory for a 2-token prompt differ from its
    # tokens on the single-adapter directory (and from ours, which agree there); not ours to reference
    asks = {"a": ("one", [5, 6, 7, 8, 9], 14), "b": ("two", [11, 12, 13, 14, 15], 20),
            "c": ("one", list(range(40, 52)), 4)}
    tokens: dict[str, list[int]] = {}
    capacities = set()

    def request(rid):
        model, prompt, new = asks[rid]
        return GenerationRequest(model=model, prompt_ids=prompt, request_id=rid,
                                 params=SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))

    engine.submit(request("a"))
    for step in range(40):
        if step == 5:
            engine.submit(request("b"))
            engine.submit(request("c"))
        for out in engine.step():
            assert out.error is None, out.error
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
        capacities |= {b.decoding.cache.capacity for b in engine._batches.values() if b.decoding is not None}
    assert not engine.has_work()
    assert {8, 16, 32} <= capacities
    if graphs:
        assert engine._pool.capture and len(engine._pool.sets) >= 3
    for rid, (model, prompt, new) in asks.items():
        ids = np.array([prompt])
        want = genai_generate(built["mixed"], ids, new, adapter_ids=[1 if model == "one" else 2])[0, len(prompt):]
        assert tokens[rid] == want.tolist(), rid
