"""The runtime, verify and serve's engine on onnxruntime-genai model builder graphs (GroupQueryAttention, a shared
past/present buffer, `kv_cache_dim`), against transformers' own generate and onnxruntime-genai's generator.

The graphs are built here by `python -m onnxruntime_genai.models.builder` from the tiny models/ configs (fixed
seeds, word-level tokenizers trained offline); without onnxruntime-genai the module skips.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import genai_build, tiny, word_tokenizer

from road_export import RoadError
from road_export.runtime.kvcache import GqaCache, with_share_buffer
from road_export.app.parity import COSINE_MIN, min_cosine
from road_export.runtime.session import RoadSession

pytest.importorskip("onnxruntime_genai")

NEW = 8


@pytest.fixture(scope="module")
def built(tmp_path_factory, builder_llama):
    """{name: directory}: transformers checkpoints (hf-llama, hf-qwen2) and their builder graphs (llama fp32 and
    int4: the session's `builder_llama`, tiny-llama's bos/eos already 1/2; qwen2 fp32)."""
    root = tmp_path_factory.mktemp("builder")
    model = tiny("tiny-qwen2")
    model.config.bos_token_id, model.config.eos_token_id = 1, 2
    model.save_pretrained(root / "hf-qwen2")
    word_tokenizer(root / "hf-qwen2", model.config.vocab_size)
    return {"hf-llama": builder_llama["hf"], "llama": builder_llama["fp32"], "llama-int4": builder_llama["int4"],
            "hf-qwen2": root / "hf-qwen2", "qwen2": genai_build(root / "hf-qwen2", root / "qwen2", "fp32")}


@pytest.fixture(scope="module")
def hf_llama(built):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(built["hf-llama"]).eval()


def transformers_generate(model, ids: np.ndarray, mask: np.ndarray, new: int = NEW) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=new,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out.numpy()


def genai_generate(directory: Path, rows: list[list[int]], new: int = NEW) -> list[list[int]]:
    import onnxruntime_genai as og

    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(rows[0]) + new, do_sample=False, batch_size=len(rows))
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(rows, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [[int(t) for t in generator.get_sequence(i)] for i in range(len(rows))]


def prompts(vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two rows, the second left padded by 3."""
    ids = np.random.default_rng(seed).integers(3, vocab, (2, 7))
    mask = np.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def test_generate_equals_transformers_and_genai(built, hf_llama):
    session = RoadSession(built["llama"])  # the builder's directory: model.onnx beside genai_config.json
    layout = session.cache_layout
    assert layout.gqa and layout.share_buffer and layout.context_length == 128 and not layout.positions
    assert {shape for shape in layout.shapes.values()} == {(2, 16)}  # head size read though the axis is symbolic
    ids, mask = prompts(256)
    got = session.generate(ids, mask, max_new_tokens=NEW)
    np.testing.assert_array_equal(got, transformers_generate(hf_llama, ids, mask))
    # genai's own generator on the same graph, each row unpadded
    assert genai_generate(built["llama"], [ids[0].tolist()]) == [got[0].tolist()]
    assert genai_generate(built["llama"], [ids[1, 3:].tolist()]) == [got[1, 3:].tolist()]


def test_the_growing_past_gives_the_shared_buffers_tokens(built):
    """GroupQueryAttention takes a past that grows (past_present_share_buffer false) as well as the shared buffer;
    and a planted fault: a cache that leaves the padding on the left (as road-export's own files take it) changes
    the padded row, so the right padding matters."""
    session = RoadSession(built["llama"])
    ids, mask = prompts(256)
    shared = session.generate(ids, mask, max_new_tokens=NEW)
    session.cache_layout = with_share_buffer(session.cache_layout, False)
    np.testing.assert_array_equal(session.generate(ids, mask, max_new_tokens=NEW), shared)

    def left_padded_prefill(self, ids, mask):
        feeds = original(self, ids, mask)
        feeds["input_ids"] = np.where(mask == 1, ids, 0)
        feeds["attention_mask"] = mask
        return feeds

    original = GqaCache.prefill
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GqaCache, "prefill", left_padded_prefill)
        wrong = session.generate(ids, mask, max_new_tokens=NEW)
    assert (wrong[0] == shared[0]).all() and (wrong[1] != shared[1]).any()


def test_what_gqa_cannot_take_is_refused_in_one_line(built):
    session = RoadSession(built["llama"])
    with pytest.raises(RoadError, match="context length"):
        session.generate(np.full((1, 100), 5), max_new_tokens=40)
    ids, mask = np.full((1, 6), 5), np.array([[1, 1, 0, 0, 1, 1]])
    with pytest.raises(RoadError, match="padding between tokens"):
        session.generate(ids, mask, max_new_tokens=2)


def test_qwen2_with_its_bias_equals_transformers(built):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(built["hf-qwen2"]).eval()
    ids, mask = prompts(256, seed=3)
    got = RoadSession(built["qwen2"]).generate(ids, mask, max_new_tokens=NEW)
    np.testing.assert_array_equal(got, transformers_generate(model, ids, mask))


def test_int4_by_cosine_and_top1(built, hf_llama):
    session = RoadSession(built["llama-int4"])
    ids = np.random.default_rng(5).integers(3, 256, (2, 12))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             **{past: np.zeros((2, heads, 0, size), np.float32)
                for past, (heads, size) in session.cache_layout.shapes.items()}}
    got = session.run(feeds, output_names=["logits"])["logits"]
    with torch.no_grad():
        expected = hf_llama(torch.from_numpy(ids)).logits.numpy()
    assert min_cosine(got, expected, rows=False) >= COSINE_MIN
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9
    out = session.generate(ids[:1], max_new_tokens=NEW)  # the int4 graph decodes through the same cache
    assert out.shape == (1, 12 + NEW)


def _verify(*args) -> tuple[int, str]:
    from road_export.app.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


def test_verify_passes_on_the_base_graph_and_says_what_it_skipped(built, tmp_path):
    report = tmp_path / "report.json"
    code, text = _verify("verify", built["llama"], "--base", built["hf-llama"], "--report", report)
    assert code == 0, text
    assert "PASSED" in text and "2 skipped" in text and "batch_size must be 1" in text
    rows = json.loads(report.read_text())["rows"]
    skipped = [r for r in rows if r["skipped"]]
    assert [r["case"] for r in skipped] == ["batch 4, seq 1, past 9, pad 3", "batch 2, seq 4, past 6, pad 1"]
    ran = {r["case"] for r in rows if not r["skipped"]}
    assert {"batch 3, seq 7, past 0, pad 2", "batch 1, seq 4, past 6", "batch 4, seq 1, past 9"} <= ran


def test_verify_fails_on_a_damaged_weight(built, tmp_path):
    """A planted fault: one weight of the builder graph changed must fail verify."""
    import onnx
    from onnx import numpy_helper

    damaged = tmp_path / "damaged"
    shutil.copytree(built["llama"], damaged)
    model = onnx.load(str(damaged / "model.onnx"))
    weight = next(t for t in model.graph.initializer if t.name == "model.layers.1.attn.o_proj.MatMul.weight")
    array = numpy_helper.to_array(weight).copy()
    array[3, :] += 0.05
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    (damaged / "model.onnx.data").unlink()
    onnx.save(model, str(damaged / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    code, text = _verify("verify", damaged, "--base", built["hf-llama"])
    assert code == 1 and "FAILED" in text, text


@pytest.mark.parametrize("smallest", [128, 8], ids=["context", "growing"])
@pytest.mark.parametrize("mode", ["host", "bound", "static"])
def test_serve_engine_on_a_builder_directory(built, hf_llama, mode, smallest, monkeypatch):
    """Requests join a running batch and leave it; each row's tokens equal transformers' alone. Bound (the shared
    buffer an OrtValue that GroupQueryAttention writes in place, as on CUDA) as on the host; "static": each batch's
    decode steps on a static buffer set (runtime.graphs, what CUDA graphs replay), leased again as rows join and
    leave and the buffer grows. With buffers that start at 8 positions ("growing"; 128, this model's context,
    otherwise) the shared buffer doubles when a row would pass its end, alone and with rows that joined it, its
    tokens kept."""
    from road_export.app.serving.engine import Engine, GenerationRequest, SamplingParams
    from road_export.runtime import kvcache

    monkeypatch.setattr(kvcache, "SMALLEST_BUFFER", smallest)
    engine = Engine(built["llama"], threads=1, io_binding=mode != "host", static_buffers=mode == "static" or None)
    assert engine.context_length == 128 and engine.eos_token_ids == {2}
    assert Engine(built["llama"], threads=1).io_binding  # the default for a shared buffer, on the CPU too
    asks = {"a": ([5, 6, 7, 8, 9], 10), "b": ([11, 12], 20), "c": ([40, 41, 42, 43, 44, 45, 46, 47], 3)}

    def request(rid):
        prompt, new = asks[rid]
        return GenerationRequest(model=engine.base_name, prompt_ids=prompt, request_id=rid,
                                 params=SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))

    tokens: dict[str, list[int]] = {}
    capacities = set()
    engine.submit(request("a"))
    for step in range(30):
        if step == 5:  # after row a's buffer has doubled (8 -> 16 positions at its 9th)
            engine.submit(request("b"))
            engine.submit(request("c"))
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
        capacities |= {b.decoding.cache.capacity for b in engine._batches.values() if b.decoding is not None}
    assert not engine.has_work()
    assert capacities == ({128} if smallest == 128 else {8, 16, 32})  # b doubles the joined buffer again
    if mode == "static":  # a set per (rows, capacity) the batch had, each given back when the batch moved on
        sets = engine._pool.sets
        assert len({s.key[:2] for s in sets}) == len(sets) >= (2 if smallest == 128 else 3)
        assert all(s.holder is None or s.holder() is None for s in sets)
    else:
        assert engine._pool is None
    for rid, (prompt, new) in asks.items():
        ids = np.array([prompt])
        assert tokens[rid] == transformers_generate(hf_llama, ids, np.ones_like(ids), new)[0, len(prompt):].tolist()



# ---- RoAd on a builder graph ----

@pytest.fixture(scope="module")
def adapters(built, tmp_path_factory):
    """Two peft RoAd adapters (road_1, group 8, random coefficients) on the tiny Llama, and peft's greedy tokens
    for `prompts(256)` through each: {name: (directory, tokens)}."""
    import copy

    import peft
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    base = AutoModelForCausalLM.from_pretrained(built["hf-llama"]).eval()
    ids, mask = prompts(256)
    out = {}
    for seed, name in ((1, "one"), (2, "two")):
        torch.manual_seed(seed)
        model = peft.get_peft_model(copy.deepcopy(base), peft.RoadConfig(variant="road_1", group_size=8,
                                                                          init_weights=False,
                                                                          target_modules="all-linear"))
        model.save_pretrained(root / name)
        out[name] = (root / name, transformers_generate(model.eval(), ids, mask))
    return out


def test_road_attached_by_hand_to_a_builder_graph_gives_pefts_tokens(built, adapters, tmp_path):
    """The workaround of issue 29 (unpacked q/k/v, `attn` named `self_attn`), attach_to_model's rotations, then
    RoadSession's GroupQueryAttention cache: peft's tokens; verify with the adapter passes."""
    import onnx_ir as ir

    from road_export.graph.adapter_files import read_adapter
    from road_export.passes.attach import attach_to_model

    unpacked = genai_build(built["hf-llama"], tmp_path / "unpacked", "fp32", "--extra_options", "fuse_qkv=false")
    model = ir.load(unpacked / "model.onnx")
    for node in model.graph:
        node.name = (node.name or "").replace("/attn/", "/self_attn/")
    report = attach_to_model(model, read_adapter(adapters["one"][0]), "rotate")
    assert len(report.placed) == 14
    attached = tmp_path / "attached"
    attached.mkdir()
    ir.save(model, attached / "model.onnx", external_data="model.onnx.data")
    shutil.copy(unpacked / "genai_config.json", attached)
    ids, mask = prompts(256)
    session = RoadSession(attached)
    assert session.cache_layout.share_buffer
    np.testing.assert_array_equal(session.generate(ids, mask, max_new_tokens=NEW), adapters["one"][1])
    code, text = _verify("verify", attached / "model.onnx", "--base", built["hf-llama"], "--adapter",
                         adapters["one"][0], "--no-native")
    assert code == 0 and "skipped" in text, text


def test_mixed_and_swapped_adapters_on_an_attached_builder_graph(built, adapters, tmp_path):
    """`road-export attach` on the builder graph itself (packed qkv_proj): a swappable file whose second adapter
    is swapped in by name, and a mixed file whose rows each take their own; peft's tokens for each row."""
    one, two = adapters["one"], adapters["two"]
    for name in ("swap", "mixed"):
        (tmp_path / name).mkdir()
        for file in ("genai_config.json", "tokenizer.json", "tokenizer_config.json"):
            shutil.copy(built["llama"] / file, tmp_path / name)
    code, text = _verify("attach", built["llama"] / "model.onnx", "--adapter", one[0],
                         tmp_path / "swap" / "model.onnx")
    if code == 2 and ("cannot place" in text or "one --adapter" in text):
        pytest.skip(f"attach does not place RoAd on a packed builder graph here: {text.strip()}")
    assert code == 0, text
    assert _verify("adapter", two[0], "--like", tmp_path / "swap" / "model.onnx",
                   tmp_path / "swap" / "model.two.onnx_adapter")[0] == 0
    ids, mask = prompts(256)
    swap = RoadSession(tmp_path / "swap")
    np.testing.assert_array_equal(swap.generate(ids, mask, max_new_tokens=NEW), one[1])
    np.testing.assert_array_equal(swap.generate(ids, mask, max_new_tokens=NEW, adapter="two"), two[1])
    code, text = _verify("attach", built["llama"] / "model.onnx", "--adapter", f"one={one[0]}", "--adapter",
                         f"two={two[0]}", tmp_path / "mixed" / "model.onnx")
    assert code == 0, text
    mixed = RoadSession(tmp_path / "mixed")
    got = mixed.generate(ids, mask, max_new_tokens=NEW, adapter_names=["two", "one"])
    np.testing.assert_array_equal(got[0], two[1][0])
    np.testing.assert_array_equal(got[1], one[1][1])
    # the same on static buffers (runtime.graphs: CUDA graphs' form): a swapped adapter's bound coefficients are part
    # of a set's key (a set per adapter), a mixed batch's adapter_ids are written into its set at each lease
    from road_export.runtime import gpu
    from road_export.runtime.graphs import graph_pool

    assert _verify("adapter", one[0], "--like", tmp_path / "swap" / "model.onnx",
                   tmp_path / "swap" / "model.uno.onnx_adapter")[0] == 0  # adapter one again, swapped in by file
    swap = RoadSession(tmp_path / "swap")
    for name, want in ((None, one[1]), ("two", two[1]), ("uno", one[1]), (None, one[1]), ("two", two[1])):
        np.testing.assert_array_equal(gpu.generate(swap, ids, mask, max_new_tokens=NEW, adapter=name,
                                                   static_buffers=True), want)
    assert len(graph_pool(swap, "cpu", 0).sets) == 3
    for file, want in ((tmp_path / "swap" / "model.two.onnx_adapter", two[1]),
                       (tmp_path / "swap" / "model.uno.onnx_adapter", one[1])):  # loaded again under one name
        swap.load_adapter(file, "x")
        np.testing.assert_array_equal(gpu.generate(swap, ids, mask, max_new_tokens=NEW, adapter="x",
                                                   static_buffers=True), want)
        np.testing.assert_array_equal(gpu.generate(swap, ids, mask, max_new_tokens=NEW, adapter="x"), want)
    for names in (["two", "one"], ["one", "two"]):
        got = gpu.generate(mixed, ids, mask, max_new_tokens=NEW, adapter_names=names, static_buffers=True)
        for row, name in enumerate(names):
            np.testing.assert_array_equal(got[row], adapters[name][1][row])
    assert len(graph_pool(mixed, "cpu", 0).sets) == 1


def test_the_iobinding_loop_binds_the_shared_buffer_in_place(built, hf_llama, monkeypatch):
    """road_export.runtime.gpu's loop (CUDA's, here on a CPU session: the same code in host memory) binds the shared
    buffer as past and present: transformers' tokens, and the buffer it allocated is the one the graph wrote."""
    from road_export.runtime import gpu, kvcache

    session = RoadSession(built["llama"])
    ids, mask = prompts(256)
    seen = []
    original = kvcache.GqaCache.update

    def update(self, outputs):
        original(self, outputs)
        seen.append({name: (id(value), np.array(value.numpy())) for name, value in self.past.items()})

    monkeypatch.setattr(kvcache.GqaCache, "update", update)
    got = gpu.generate(session, ids, mask, max_new_tokens=NEW)
    np.testing.assert_array_equal(got, transformers_generate(hf_llama, ids, mask))
    # the buffers bound before the first run stay the past, and hold the prompt's and each step's keys: written in
    # place by the graph, never copied out
    assert len(seen) == NEW - 1
    assert all({name: handle for name, (handle, _) in step.items()} == {name: handle for name, (handle, _) in
                                                                         seen[0].items()} for step in seen)
    # after the prefill row 0 fills positions 0..6; each step writes the next, and nothing beyond it yet
    assert all(np.any(value[0, :, 6 + step]) and not np.any(value[0, :, 7 + step:])
               for step, values in enumerate(seen) for _, value in values.values())
    monkeypatch.undo()
    sampled = dict(do_sample=True, temperature=0.8, top_p=0.9, seed=3, max_new_tokens=NEW)
    np.testing.assert_array_equal(gpu.generate(session, ids, mask, **sampled), session.generate(ids, mask, **sampled))


def test_static_buffers_give_the_same_tokens_and_are_leased_again(built, hf_llama, monkeypatch):
    """runtime.graphs' static decode buffers (what CUDA graphs replay; here on a CPU session, unrecorded): the decode
    steps copy the prefill's cache into a set's buffers once and run on them, with attention_mask [rows, capacity];
    transformers' tokens, greedy and sampled as without them; a second call of the same shapes leases the same set
    again (its graph would replay), another batch size makes a second set."""
    from road_export.runtime import gpu
    from road_export.runtime.graphs import GraphPool, graph_pool

    session = RoadSession(built["llama"])
    ids, mask = prompts(256)
    copies = []
    original = GraphPool.copy
    monkeypatch.setattr(GraphPool, "copy", lambda self, source, target: (copies.append(1),
                                                                         original(self, source, target)))
    want = transformers_generate(hf_llama, ids, mask)
    np.testing.assert_array_equal(gpu.generate(session, ids, mask, max_new_tokens=NEW, static_buffers=True), want)
    pool = graph_pool(session, "cpu", 0)
    assert not pool.capture and len(pool.sets) == 1 and len(copies) == 1  # copied in once, after the prefill
    (step,) = pool.sets
    assert step.key[:2] == (ids.shape[0], 128) and step.mask.shape == (ids.shape[0], 128)  # bucket(7 + 8 - 1)
    np.testing.assert_array_equal(gpu.generate(session, ids, mask, max_new_tokens=NEW, static_buffers=True), want)
    assert pool.sets == [step] and len(copies) == 2
    sampled = dict(do_sample=True, temperature=0.8, top_p=0.9, seed=3, max_new_tokens=NEW)
    np.testing.assert_array_equal(gpu.generate(session, ids, mask, static_buffers=True, **sampled),
                                  session.generate(ids, mask, **sampled))
    np.testing.assert_array_equal(gpu.generate(session, ids[:1], mask[:1], max_new_tokens=NEW, static_buffers=True),
                                  transformers_generate(hf_llama, ids[:1], mask[:1]))
    assert len(pool.sets) == 2


def test_the_pool_drops_its_least_recently_used_set_and_stops_at_its_graph_budget(built, hf_llama):
    """Past `most` sets the least recently used free one goes for a new shape; past `recorded` sets made (recorded
    graphs, which onnxruntime never drops) a new shape decodes as before: the same tokens either way."""
    from road_export.runtime import gpu
    from road_export.runtime.graphs import graph_pool

    session = RoadSession(built["llama"])
    ids, mask = prompts(256)
    pool = graph_pool(session, "cpu", 0)
    pool.most, pool.recorded = 1, 2
    for rows, made, kept in ((2, 1, 2), (1, 2, 1), (2, 2, 1)):  # the third: no set left to make
        np.testing.assert_array_equal(gpu.generate(session, ids[:rows], mask[:rows], max_new_tokens=NEW,
                                                   static_buffers=True),
                                      transformers_generate(hf_llama, ids[:rows], mask[:rows]))
        assert pool.made == made and [s.key[0] for s in pool.sets] == [kept]


def test_a_pool_goes_with_its_session(built):
    """The pool (its onnxruntime session, buffer sets) is the session's: it does not keep the session alive."""
    import gc
    import weakref

    from road_export.runtime import gpu, graphs

    session = RoadSession(built["llama"])
    ids, mask = prompts(256)
    gpu.generate(session, ids, mask, max_new_tokens=2, static_buffers=True)
    gone = weakref.ref(session)
    del session
    gc.collect()
    assert gone() is None and not len(graphs._POOLS)


def test_one_pool_per_session_however_many_threads_ask(built, monkeypatch):
    import threading
    import time

    from road_export.runtime import graphs

    session = RoadSession(built["llama"])
    made = []
    original = graphs.GraphPool.__init__

    def slow(self, *args, **kwargs):
        time.sleep(0.2)
        made.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(graphs.GraphPool, "__init__", slow)
    threads = [threading.Thread(target=graphs.graph_pool, args=(session, "cpu", 0)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1


def test_static_buffers_options_on_the_cpu(built, hf_llama, tmp_path):
    """RoadSession.generate takes static_buffers on the CPU too (True runs the static loop there, False/None the
    host loop); anything but a bool or None is refused; CUDA graphs asked of an onnxruntime without CUDA are refused
    rather than run on the CPU without them."""
    import onnxruntime as ort

    from road_export.app.serving.engine import Engine
    from road_export.runtime import gpu

    session = RoadSession(built["llama"])
    ids, mask = prompts(256)
    want = transformers_generate(hf_llama, ids, mask)
    for static in (True, False, None):
        np.testing.assert_array_equal(session.generate(ids, mask, max_new_tokens=NEW, static_buffers=static), want)
    with pytest.raises(RoadError, match="static_buffers must be True, False or None"):
        gpu.generate(session, ids, mask, max_new_tokens=2, static_buffers="no")
    with pytest.raises(RoadError, match="static_buffers must be True, False or None"):
        Engine(built["llama"], threads=1, static_buffers="no")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RoadError, match="providers ask for CUDAExecutionProvider's CUDA graphs and this"):
            RoadSession(built["llama"], providers=gpu.cuda_providers(cuda_graph=True))


def test_static_buffers_from_several_threads(built, hf_llama):
    """Generations on one session from four threads at once: each holds its own set while it runs (two of the same
    shapes do not share one), and each gets transformers' tokens."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from road_export.runtime import gpu
    from road_export.runtime.graphs import graph_pool

    session = RoadSession(built["llama"], threads=1)
    ids, mask = prompts(256)
    new = 48
    want = transformers_generate(hf_llama, ids, mask, new)
    start = threading.Barrier(4)

    def generate(_):
        start.wait()
        return gpu.generate(session, ids, mask, max_new_tokens=new, static_buffers=True)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(generate, range(4)))
    for got in results:
        np.testing.assert_array_equal(got, want)
    sets = graph_pool(session, "cpu", 0).sets
    assert 1 <= len(sets) <= 4 and all(s.key == sets[0].key for s in sets)


def test_with_cuda_graph_asks_the_cuda_provider_for_graphs():
    from road_export.runtime.gpu import cuda_providers, with_cuda_graph

    options = {"device_id": "1", "use_tf32": "0", "enable_cuda_graph": "1"}
    want = [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    assert with_cuda_graph(cuda_providers(1, tf32=False)) == want
    assert with_cuda_graph(["CUDAExecutionProvider"]) == [("CUDAExecutionProvider", {"enable_cuda_graph": "1"})]
    for wrong in (["CPUExecutionProvider"], []):
        with pytest.raises(RoadError, match="CUDA graphs need the CUDA execution provider first"):
            with_cuda_graph(wrong)


def test_static_buffers_without_the_copy_give_other_tokens(built, hf_llama, monkeypatch):
    """The check above can fail: static steps that skip copying the prefill's cache into their buffers attend to
    zeros, and their tokens are not transformers'."""
    from road_export.runtime import gpu
    from road_export.runtime.graphs import GraphPool

    monkeypatch.setattr(GraphPool, "copy", lambda self, source, target: None)
    ids, mask = prompts(256)
    got = gpu.generate(RoadSession(built["llama"]), ids, mask, max_new_tokens=NEW, static_buffers=True)
    assert not np.array_equal(got, transformers_generate(hf_llama, ids, mask))


def test_the_engine_asks_cuda_graphs_for_builder_directories_only(built, tmp_path):
    """serve's engine opens a builder directory (genai_config.json sharing the past/present buffer) with CUDA graphs
    on CUDA by default; a file without that flag, or the CPU, gets none, and asking for them on the CPU is one line."""
    import shutil

    from road_export.app.serving.engine import Engine, _shares_buffer

    assert _shares_buffer(built["llama"])
    shutil.copytree(built["llama"], tmp_path / "copy")
    config = json.loads((tmp_path / "copy" / "genai_config.json").read_text())
    config["search"]["past_present_share_buffer"] = False
    (tmp_path / "copy" / "genai_config.json").write_text(json.dumps(config))
    assert not _shares_buffer(tmp_path / "copy") and not _shares_buffer(tmp_path)
    assert not Engine(built["llama"], threads=1).session.cuda_graph
    with pytest.raises(RoadError, match="cuda_graph needs the CUDA execution provider"):
        Engine(built["llama"], threads=1, cuda_graph=True)


def test_static_buffers_need_a_shared_buffer(built):
    from road_export.runtime import gpu

    session = RoadSession(built["llama"])
    session.cache_layout = with_share_buffer(session.cache_layout, False)
    ids, mask = prompts(256)
    with pytest.raises(RoadError, match="static_buffers needs a model builder graph's shared key/value buffer"):
        gpu.generate(session, ids, mask, max_new_tokens=2, static_buffers=True)


def test_the_greedy_selector_follows_the_batch(built):
    """runtime.gpu.GreedySelector (the engine's and RoadSession.generate's greedy choice where the logits are) gives
    numpy's argmax of the last position, also when the batch changes between calls (a serving batch does)."""
    import onnxruntime as ort

    from road_export.runtime.gpu import GreedySelector

    select = GreedySelector(RoadSession(built["llama"]))
    rng = np.random.default_rng(0)
    for batch, positions in ((1, 3), (8, 1), (3, 1), (8, 2)):
        logits = rng.standard_normal((batch, positions, 256)).astype(np.float32)
        got = select(ort.OrtValue.ortvalue_from_numpy(logits))
        np.testing.assert_array_equal(got, logits[:, -1].argmax(-1))
