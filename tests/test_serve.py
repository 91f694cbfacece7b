"""road-export serve: the continuous-batching engine, the OpenAI API and the Ray Serve application.

One tiny model directory (tiny Llama, a BPE tokenizer trained offline, three peft RoAd adapters, a rotate export
with its KV cache) serves every test. The reference is peft: `PeftModel.generate` greedy, decoded with transformers'
own tokenizer. Most tests drive the engine and the FastAPI app in this process (no Ray); the last few start one
local Ray Serve application for the module and shut Ray down after.
"""

import asyncio
import contextlib
import json
import os
import socket
import threading
import time

import numpy as np
import pytest
import torch

from road_export.core.errors import RoadError
from road_export.runtime.kvcache import PaddedCache
from road_export.app.serving.engine import Engine, GenerationRequest, SamplingParams, Stats
from road_export.app.serving.example import build_example
from road_export.app.serving.loop import AsyncEngine
from road_export.app.serving.protocol import ApiError, OpenAIService
from road_export.app.serving.text import Detokenizer, TextTokenizer

PROMPTS = ["The quick brown fox", "Many tenants share one base model;", "Où est la gare?",
           "Continuous batching lets a request"]
NEW = 24


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return build_example(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def reference(example):
    """(peft model with the three adapters, transformers' tokenizer), both loaded by their own libraries."""
    import peft
    import transformers

    base = transformers.LlamaForCausalLM.from_pretrained(example.base)
    names = list(example.adapters)
    model = peft.PeftModel.from_pretrained(base, example.adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(example.adapters[name], adapter_name=name)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(example.base)


def peft_generate(reference, adapter, prompt_ids, new=NEW):
    """peft's greedy generate for one prompt through `adapter` (None: the base); returns (new ids, their text)."""
    model, tokenizer = reference
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                     do_sample=False)
        else:
            model.set_adapter(adapter)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 do_sample=False)
    new_ids = out[0, len(prompt_ids):].tolist()
    return new_ids, tokenizer.decode(new_ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def engine(example):
    return Engine(example.model, max_batch_size=8, threads=1, recorders=[Stats()])


def run_engine(engine, requests, *, arrive=None):
    """Step `engine` until every request finished; `arrive` {step: [requests]} submits some later. Returns
    {request_id: (token ids, text, finish_reason)}."""
    arrive = dict(arrive or {})
    for r in requests:
        engine.submit(r)
    results, step = {}, 0
    while engine.has_work() or arrive:
        for r in arrive.pop(step, []):
            engine.submit(r)
        for o in engine.step():
            ids, text, _ = results.get(o.request_id, ([], "", None))
            results[o.request_id] = (ids + o.token_ids, text + o.text, o.finish_reason)
        step += 1
    return results


def greedy(model, prompt_ids, max_tokens=NEW, rid=""):
    return GenerationRequest(model, list(prompt_ids), SamplingParams(max_tokens=max_tokens, temperature=0),
                             request_id=rid)


# ---- the engine, no HTTP ----

def test_greedy_for_each_adapter_equals_peft_generate(engine, reference):
    tokenizer = reference[1]
    for model in engine.model_names:
        adapter = None if model == engine.base_name else model
        for prompt in PROMPTS[:2]:
            ids = tokenizer(prompt)["input_ids"]
            assert engine.tokenizer.encode(prompt) == ids
            want_ids, want_text = peft_generate(reference, adapter, ids)
            got = run_engine(engine, [greedy(model, ids, rid="one")])["one"]
            assert got[0] == want_ids, (model, prompt)
            assert got[1] == want_text, (model, prompt)
            assert got[2] == ("stop" if len(want_ids) < NEW else "length")


def test_concurrent_requests_for_different_adapters_equal_each_alone(engine):
    names = engine.model_names
    requests = [greedy(names[i % len(names)], engine.tokenizer.encode(PROMPTS[i % len(PROMPTS)]),
                       max_tokens=8 + 3 * i, rid=f"r{i}") for i in range(10)]
    alone = {r.request_id: run_engine(engine, [greedy(r.model, r.prompt_ids, r.params.max_tokens, r.request_id)])
             [r.request_id] for r in requests}
    stats = Stats()
    engine.recorders.append(stats)
    try:  # 6 at once, the rest joining the running batch at steps 3, 5 and 9 (max_batch_size 8: some wait)
        together = run_engine(engine, requests[:6], arrive={3: requests[6:8], 5: requests[8:9], 9: requests[9:]})
    finally:
        engine.recorders.remove(stats)
    assert together == alone
    assert max(stats.batch_sizes) == 8 and max(stats.adapters_per_batch) == len(names)
    assert engine.running == 0 and engine.waiting == 0


def test_a_cache_kept_in_onnxruntime_values_gives_the_same_tokens(example, engine, monkeypatch):
    """`io_binding` (the default on CUDA; here on the CPU, the same code in host memory): rows joining and leaving
    a batch of several adapters give the tokens of the host engine, and between steps the cache is onnxruntime
    OrtValues, not numpy arrays copied in and out of every run; its rows move without a copy to numpy."""
    import onnxruntime as ort

    from road_export.runtime import kvcache

    bound = Engine(example.model, max_batch_size=4, threads=1, io_binding=True)
    assert bound.io_binding and not engine.io_binding
    names = engine.model_names

    def requests():
        return [greedy(names[i % len(names)], engine.tokenizer.encode(PROMPTS[i % len(PROMPTS)]), max_tokens=3 + 4 * i,
                       rid=f"r{i}") for i in range(6)]

    arrive = {2: requests()[3:5], 6: requests()[5:]}
    want = run_engine(engine, requests()[:3], arrive=arrive)
    kinds = set()

    class Look(Stats):  # told after each run: the cache values then held between runs
        def on_step(self, rows, adapters, seconds):
            kinds.update(type(v).__name__ for b in bound._batches.values() if b.decoding is not None
                         for v in b.decoding._cache.past.values())

    bound.recorders.append(Look())
    monkeypatch.setattr(kvcache, "host", lambda value: pytest.fail("a row move copied the cache to numpy"))
    assert run_engine(bound, requests()[:3], arrive=arrive) == want
    assert kinds == {ort.OrtValue.__name__}


@pytest.mark.parametrize("io_binding", [False, True], ids=["host", "bound"])
def test_an_onnxruntime_failure_ends_that_batch_in_one_line(example, io_binding):
    """onnxruntime failing a run (a planted Fail on the third run: CUDA running out of memory, say) ends the rows of
    that batch with an error naming the model and the inputs; `step` does not raise (which would end every request of
    the server), and the next request runs."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    engine = Engine(example.model, max_batch_size=4, threads=1, io_binding=io_binding)
    real, runs = engine.session.session, []

    class Failing:
        def __getattr__(self, name):
            return getattr(real, name)

        def _maybe_fail(self):
            runs.append(1)
            if len(runs) == 3:
                raise Fail("planted: out of memory")

        def run(self, *args, **kwargs):
            self._maybe_fail()
            return real.run(*args, **kwargs)

        def run_with_iobinding(self, *args, **kwargs):
            self._maybe_fail()
            return real.run_with_iobinding(*args, **kwargs)

    engine.session.session = Failing()
    ids = engine.tokenizer.encode(PROMPTS[0])
    for rid, model in (("a", "alpha"), ("b", "beta")):
        engine.submit(greedy(model, ids, 5, rid))
    ended = {}
    for _ in range(10):  # step raises nothing
        ended.update({o.request_id: (o.finish_reason, o.error) for o in engine.step() if o.finished})
    assert set(ended) == {"a", "b"} and not engine.has_work()
    for reason, error in ended.values():
        assert reason == "error" and error.startswith(f"{engine.session.path.name}: onnxruntime failed on inputs "
                                                      "input_ids [2, 1]") and "planted: out of memory" in error
    engine.session.session = real
    after = run_engine(engine, [greedy("alpha", ids, 5, "c")])
    assert after["c"][2] == "length"


def test_rows_of_a_wrong_adapter_are_caught(engine, monkeypatch):
    """A planted fault: every row through the base. The comparison with single runs must see it."""
    ids = engine.tokenizer.encode(PROMPTS[0])
    right = run_engine(engine, [greedy("beta", ids, rid="b")])["b"]
    monkeypatch.setattr(engine, "_adapter_name", lambda model: "__base__")
    wrong = run_engine(engine, [greedy("beta", ids, rid="b")])["b"]
    assert wrong != right


def test_masking_the_merged_padding_matters(engine, monkeypatch):
    """A planted fault: a joining row's cache padding left unmasked (attention_mask 1) must change its text."""
    def requests():
        return [greedy("alpha", engine.tokenizer.encode(PROMPTS[1]), 12, "long"),
                greedy("gamma", engine.tokenizer.encode("x"), 12, "short")]

    reqs = requests()
    right = run_engine(engine, reqs[:1], arrive={2: reqs[1:]})
    original = PaddedCache.extend  # the engine's batches merge joining rows through the runtime's cache

    def merge_unmasked(cache, other):
        if cache.rows and cache.mask.shape[1] > other.mask.shape[1]:
            extra = cache.mask.shape[1] - other.mask.shape[1]
            other.mask = np.concatenate([np.ones((other.rows, extra), np.int64), other.mask], 1)
            other.past = {k: np.concatenate([np.zeros(v.shape[:2] + (extra,) + v.shape[3:], v.dtype), v], 2)
                          for k, v in other.past.items()}
        return original(cache, other)

    monkeypatch.setattr(PaddedCache, "extend", merge_unmasked)
    reqs = requests()
    wrong = run_engine(engine, reqs[:1], arrive={2: reqs[1:]})
    assert wrong["long"] == right["long"] and wrong["short"] != right["short"]


def test_seeded_sampling_repeats_and_top_p_narrows(engine):
    ids = engine.tokenizer.encode(PROMPTS[2])

    def sample(seed, top_p=1.0, rid="s"):
        params = SamplingParams(max_tokens=16, temperature=1.5, top_p=top_p, seed=seed)
        return run_engine(engine, [GenerationRequest("gamma", ids, params, request_id=rid)])[rid][0]

    assert sample(7) == sample(7) != sample(8)
    tiny_p = sample(3, top_p=1e-6)
    assert tiny_p == run_engine(engine, [greedy("gamma", ids, 16, "g")])["g"][0][:len(tiny_p)]


def test_stop_strings_and_the_context_length(engine):
    ids = engine.tokenizer.encode(PROMPTS[3])
    full = run_engine(engine, [greedy("alpha", ids, 20, "f")])["f"][1]
    stop = full[5:8]
    cut = run_engine(engine, [GenerationRequest("alpha", ids, SamplingParams(20, 0, stop=("zzz", stop)),
                                                request_id="s")])["s"]
    assert cut[1] == full[:full.index(stop)] and cut[2] == "stop"
    with pytest.raises(Exception, match="maximum context length is 128"):
        engine.submit(greedy("alpha", ids, 128 - len(ids) + 1))
    with pytest.raises(Exception, match="does not exist"):
        engine.submit(greedy("delta", ids))


def test_a_request_that_does_not_stream_gets_one_output_equal_to_the_stream(engine):
    """stream=False: one Output, when the request finishes, holding the tokens and text the streamed outputs add up
    to (ended by EOS, by a stop string, by max_tokens, sampled; alone and beside streaming rows)."""
    ids = [engine.tokenizer.encode(p) for p in PROMPTS]
    stop = run_engine(engine, [greedy("alpha", ids[3], 20, "f")])["f"][1][5:8]

    def requests(stream):
        jobs = [("alpha", ids[1], SamplingParams(40, 0)), ("alpha", ids[3], SamplingParams(20, 0, stop=("zzz", stop))),
                (engine.base_name, ids[0], SamplingParams(20, 0)), ("gamma", ids[2], SamplingParams(12, 1.3, seed=5))]
        return [GenerationRequest(m, i, p, request_id=f"r{n}", stream=stream) for n, (m, i, p) in enumerate(jobs)]

    want = run_engine(engine, requests(True))
    assert [want[f"r{n}"][2] for n in range(4)] == ["stop", "stop", "length", "length"]
    assert want["r0"][0][-1] in engine.eos_token_ids and len(want["r0"][0]) < 40  # r0 ends with EOS
    for r in requests(False):
        engine.submit(r)
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    assert sorted(o.request_id for o in outputs) == sorted(want) and all(o.finished for o in outputs)
    assert {o.request_id: (o.token_ids, o.text, o.finish_reason) for o in outputs} == want
    mixed = requests(False)[:2] + requests(True)[2:]
    assert run_engine(engine, mixed) == want


def test_detokenizer_holds_back_partial_characters_and_stop_prefixes(engine):
    tokenizer: TextTokenizer = engine.tokenizer
    text = "Zwölf Boxkämpfer jagen Viktor"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = Detokenizer(tokenizer)
    pieces = [detok.add(t) for t in ids] + [detok.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    detok = Detokenizer(tokenizer, stop=["Vik"])
    pieces = [detok.add(t) for t in ids]
    assert "".join(pieces) + detok.finish() == "Zwölf Boxkämpfer jagen " and detok.stopped


def test_the_text_continues_the_prompt_with_a_sentencepiece_tokenizer(tmp_path):
    """A Metaspace (SentencePiece, Llama-2 style) tokenizer decodes a first new token "▁Café" alone as "Café": the
    text is what the new ids add after the prompt (vLLM's), " Café ...", so prompt + text is the whole text; streamed
    pieces and the one-shot text agree, with and without a stop string; without a prompt, decode(new ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(["The Café opens at noon", "Zwölf Boxkämpfer jagen Viktor über den Sylter Deich"] * 20,
                                trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path)
    tokenizer = TextTokenizer(tmp_path)
    prompt = tokenizer.encode("The", add_special_tokens=False)
    full = tokenizer.encode("The Café opens at noon", add_special_tokens=False)
    assert full[:len(prompt)] == prompt
    new = full[len(prompt):]
    whole = tokenizer.decode(prompt + new)
    assert whole == "The Café opens at noon" and tokenizer.decode(new) == "Café opens at noon"
    for stop, want in (((), " Café opens at noon"), (("at",), " Café opens ")):
        streamed = Detokenizer(tokenizer, stop, prompt=prompt)
        pieces = "".join(streamed.add(t) for t in new) + streamed.finish()
        once = Detokenizer(tokenizer, stop, incremental=False, prompt=prompt)
        for t in new:
            once.add(t)
        once.finish()
        assert pieces == once.text == want, stop
    alone = Detokenizer(tokenizer)
    assert "".join(alone.add(t) for t in new) + alone.finish() == "Café opens at noon"


def test_a_consumer_that_goes_away_frees_its_slot(example):
    engine = Engine(example.model, max_batch_size=2, threads=1)
    looper = AsyncEngine(engine)

    async def go():
        ids = engine.tokenizer.encode(PROMPTS[0])
        request = greedy("beta", ids, 100, "gone")
        outputs = looper.generate(request)
        first = [await outputs.__anext__() for _ in range(3)]
        await outputs.aclose()  # what a disconnected client's stream does
        for _ in range(200):
            if not engine.has_work():
                break
            await asyncio.sleep(0.01)
        return first

    try:
        first = asyncio.run(go())
        assert len(first) == 3 and not first[-1].finished
        assert not engine.has_work() and engine.running == 0
    finally:
        looper.close()


@pytest.mark.parametrize("io_binding", [False, True], ids=["host", "bound"])
def test_a_swappable_single_adapter_export_serves_each_adapter(example, reference, tmp_path, io_binding):
    """One adapter exported with its swap file, a second converted for it (`road-export adapter`): one run per
    adapter per step, each row's text peft's; with the cache in OrtValues (`io_binding`) the swapped adapter's
    coefficients are bound as inputs (IOBinding takes no run options)."""
    import peft
    import transformers
    from test_cli import road_export

    torch.manual_seed(11)
    other = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(example.base),
                                peft.RoadConfig(init_weights=False, task_type="CAUSAL_LM",
                                                **example_adapters()["alpha"]))
    other.save_pretrained(tmp_path / "other")
    out = tmp_path / "swap"
    assert road_export("--base", example.base, "--adapter", f"alpha={example.adapters['alpha']}", "--mode",
                       "rotate", "--no-verify", "--quiet", out).returncode == 0
    assert road_export("adapter", tmp_path / "other", "--like", out,
                       out / "onnx" / "model.other.onnx_adapter").returncode == 0
    engine = Engine(out, threads=1, io_binding=io_binding)
    assert engine.model_names == ["alpha", "other"] and not engine.session.mixed
    ids = engine.tokenizer.encode(PROMPTS[0])
    got = run_engine(engine, [greedy("alpha", ids, 12, "a"), greedy("other", ids, 12, "o")])
    assert got["a"][1] == peft_generate(reference, "alpha", ids, new=12)[1]
    model, tokenizer = reference
    with torch.no_grad():
        want = other.eval().generate(input_ids=torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert got["o"][1] == tokenizer.decode(want[0, len(ids):], skip_special_tokens=True) != got["a"][1]
    with pytest.raises(Exception, match="does not exist"):
        engine.submit(greedy(engine.directory.name, ids))  # a swappable export has no base to serve


def example_adapters():
    from road_export.app.serving.example import ADAPTERS

    return ADAPTERS


# ---- the OpenAI API (FastAPI in this process, no Ray) ----

@pytest.fixture(scope="module")
def client(engine):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from road_export.app.serving.http import create_app

    looper = AsyncEngine(engine)
    stats = Stats()
    engine.recorders.append(stats)
    with TestClient(create_app(OpenAIService(looper), stats)) as c:
        yield c
    engine.recorders.remove(stats)
    looper.close()


def events(response):
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_completions_for_each_model_equal_peft(client, engine, reference):
    names = client.get("/v1/models").json()
    assert [m["id"] for m in names["data"]] == [engine.base_name, "alpha", "beta", "gamma"]
    ids = reference[1](PROMPTS[1])["input_ids"]
    for model in engine.model_names:
        _, want = peft_generate(reference, None if model == engine.base_name else model, ids, new=10)
        body = client.post("/v1/completions", json={"model": model, "prompt": PROMPTS[1], "max_tokens": 10,
                                                    "temperature": 0}).json()
        assert body["object"] == "text_completion" and body["model"] == model
        assert body["choices"][0]["text"] == want
        assert body["usage"]["prompt_tokens"] == len(ids)


def test_chat_completions_use_the_chat_template(client, reference):
    _, tokenizer = reference
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the station?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    _, want = peft_generate(reference, "gamma", list(ids), new=12)
    body = client.post("/v1/chat/completions", json={"model": "gamma", "messages": messages, "max_tokens": 12,
                                                     "temperature": 0}).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want}
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_streaming_sends_the_same_text_in_chunks(client):
    request = {"model": "beta", "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}
    whole = client.post("/v1/completions", json=request).json()["choices"][0]
    chunks = events(client.post("/v1/completions", json={**request, "stream": True,
                                                          "stream_options": {"include_usage": True}}))
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 16
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    chunks = events(client.post("/v1/chat/completions", json={**chat, "stream": True}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_concurrent_http_requests_batch_across_adapters(client, engine):
    requests = [{"model": engine.model_names[i % 4], "prompt": PROMPTS[i % 4], "max_tokens": 12, "temperature": 0}
                for i in range(8)]
    alone = [client.post("/v1/completions", json=r).json()["choices"][0]["text"] for r in requests]
    stats = client.get("/stats").json()
    results = [None] * len(requests)

    def send(i):
        results[i] = client.post("/v1/completions", json=requests[i]).json()["choices"][0]["text"]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone
    after = client.get("/stats").json()
    assert after["steps"] > stats["steps"]
    assert max(map(int, after["adapters_per_batch"])) >= 2  # requests for different adapters shared a run


@pytest.mark.parametrize("body, status, param, code", [
    ({"model": "delta", "prompt": "x"}, 404, "model", "model_not_found"),
    ({"prompt": "x"}, 400, "model", "missing_required_parameter"),
    ({"model": "alpha"}, 400, "prompt", "missing_required_parameter"),
    ({"model": "alpha", "prompt": "x " * 200}, 400, "prompt", "context_length_exceeded"),
    ({"model": "alpha", "prompt": "x", "max_tokens": 1000}, 400, "max_tokens", "context_length_exceeded"),
    ({"model": "alpha", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"model": "alpha", "prompt": "x", "temperature": -1}, 400, "temperature", "invalid_value"),
    ({"model": "alpha", "prompt": "x", "temperature": "hot"}, 400, "temperature", "invalid_value"),
    ({"model": "alpha", "prompt": "x", "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"model": "alpha", "prompt": "x", "n": 2}, 400, "n", "invalid_value"),
    ({"model": "alpha", "prompt": "x", "logprobs": 2}, 400, "logprobs", "unsupported_parameter"),
    ({"model": "alpha", "prompt": "x", "stop": [1]}, 400, "stop", "invalid_value"),
    ({"model": "alpha", "prompt": [1, 99999]}, 400, "prompt", "invalid_value"),
    ({"model": "alpha", "prompt": ["a", "b"]}, 400, "prompt", "invalid_value"),
    ({"model": "alpha", "prompt": "x", "stream": "yes"}, 400, "stream", "invalid_value"),
    ({"model": 5, "prompt": "x"}, 400, "model", "invalid_value"),
    ({"model": "alpha", "prompt": [1.5, 2]}, 400, "prompt", "invalid_value"),
])
def test_bad_requests_get_openai_errors(client, body, status, param, code):
    response = client.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")


def test_messages_say_what_is_wrong_and_nulls_are_defaults(client):
    """Messages name the actual fault; null for an optional field means its default, as in OpenAI's API; unknown
    routes and methods get OpenAI's error shape too."""
    def message(body, path="/v1/completions"):
        # as JSON text (ensure_ascii: a lone surrogate travels as its \\u escape, as clients send it)
        response = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        return response.json()["error"]["message"]

    assert message({"model": 5, "prompt": "x"}).startswith("model must be a string")
    assert message({"model": "alpha", "prompt": [1.5, 2]}).startswith("prompt must be a string or a list of integer")
    assert "prompt holds a lone surrogate (\\ud800)" in message({"model": "alpha", "prompt": "h\ud800i"})
    assert "model holds a lone surrogate" in message({"model": "alpha\udfff", "prompt": "x"})
    assert "messages[0].content holds a lone surrogate" in message(
        {"model": "alpha", "messages": [{"role": "user", "content": "\udc00"}]}, "/v1/chat/completions")
    done = client.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 3, "temperature": 0,
                                                "n": None, "stream": None, "ignore_eos": None})
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] >= 1
    deep = "[" * 5000 + "]" * 5000  # deeper than json's decoder goes: RecursionError, not a 500
    response = client.post("/v1/completions", content=deep, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not JSON" in response.json()["error"]["message"]
    for response in (client.get("/v1/nothing"), client.get("/v1/completions")):
        error = response.json()["error"]
        assert response.status_code in (404, 405) and error["type"] == "invalid_request_error" and error["message"]


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(client, engine, monkeypatch):
    """A prompt longer than the context can hold whatever its tokens is refused without tokenizing it (10 MB of
    text would hold the event loop for seconds); planted fault: with the bound lifted, the tokenizer runs."""
    calls = []
    encode = engine.tokenizer.encode
    monkeypatch.setattr(engine.tokenizer, "encode", lambda text, **k: calls.append(len(text)) or encode(text, **k))
    big = "x" * (engine.context_length * engine.tokenizer.max_token_chars + 1)
    response = client.post("/v1/completions", json={"model": "alpha", "prompt": big})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert calls == []
    monkeypatch.setitem(engine.tokenizer.__dict__, "max_token_chars", len(big))  # the cached bound lifted
    assert client.post("/v1/completions", json={"model": "alpha", "prompt": big}).status_code == 400
    assert calls == [len(big)]


def test_a_temperature_near_zero_is_greedy_and_a_failing_row_fails_alone(example, client):
    """temperature 5e-324 (dividing by it overflows) samples greedily, as vLLM does below 1e-5; and when one row's
    sampling fails anyway, that request alone ends with an error while the others in its batch go on. The rows are
    stepped here on an engine of their own: the module's engine belongs to the client's loop thread, which steps
    whatever that engine holds (stepped from here as well, it took some of these rows' outputs)."""
    body = {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 6}
    greedy_text = client.post("/v1/completions", json={**body, "temperature": 0}).json()["choices"][0]["text"]
    assert client.post("/v1/completions", json={**body, "temperature": 5e-324}).json()["choices"][0]["text"] == \
        greedy_text

    class Broken:
        def choose(self, logits, rng):
            raise ValueError("Probabilities contain NaN")

    class BrokenParams(SamplingParams):
        def sampling(self):
            return Broken()

    engine = Engine(example.model, max_batch_size=8, threads=1)
    ids = engine.tokenizer.encode(PROMPTS[1])
    good, bad = greedy("beta", ids, rid="good"), GenerationRequest("alpha", ids, BrokenParams(4, 1.0), "bad")
    results = run_engine(engine, [good, bad])
    assert results["bad"][2] == "error" and results["good"][2] in ("length", "stop")
    # the same batch where the second row ends normally after its first token, as the failing row did: the same
    # shapes run, so the tokens are equal bit for bit (against a batch of one, float ties may break otherwise)
    ended = GenerationRequest("alpha", ids, SamplingParams(max_tokens=1, temperature=0), "ended")
    assert results["good"][0] == run_engine(engine, [greedy("beta", ids, rid="alone"), ended])["alone"][0]


def test_the_context_length_falls_back_to_genai_config(example, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(example.model, copy)
    (copy / "config.json").unlink()
    genai = json.loads((copy / "genai_config.json").read_text())
    assert Engine(copy, threads=1).context_length == genai["model"]["context_length"]


@pytest.mark.parametrize("name, text, says", [
    ("config.json", "[1, 2]", "config.json: holds a JSON array, not an object; export the model directory again"),
    ("generation_config.json", "{", "generation_config.json: not JSON (Expecting property name"),
])
def test_a_damaged_config_of_the_directory_is_one_line(example, tmp_path, name, text, says):
    """A config.json that holds a list (it was an AttributeError from .get) or a generation_config.json that is not
    JSON: one RoadError line naming the file."""
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(example.model, copy)
    (copy / name).write_text(text)
    with pytest.raises(RoadError) as caught:
        Engine(copy, threads=1)
    assert says in str(caught.value) and "\n" not in str(caught.value)


BIG = int("1" + "0" * 400)  # a whole number past float's range: json reads it, float(BIG) overflows


@pytest.mark.parametrize("path, key, value", [
    ("/v1/completions", "max_tokens", BIG), ("/v1/completions", "temperature", BIG),
    ("/v1/completions", "top_p", BIG), ("/v1/completions", "seed", 10**4000), ("/v1/completions", "top_k", BIG),
    ("/v1/chat/completions", "max_completion_tokens", BIG), ("/v1/chat/completions", "temperature", -BIG),
])
def test_huge_whole_numbers_are_refused_naming_the_field(client, path, key, value):
    """A whole number too large for a float is OpenAI's 400 naming the field (it was a 500: OverflowError in
    math.isfinite), and the message does not echo its hundreds of digits."""
    body = {"model": "alpha", key: value, **({"messages": [{"role": "user", "content": "hi"}]}
                                             if "chat" in path else {"prompt": "x"})}
    response = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (key, "invalid_value") and len(error["message"]) < 200


@pytest.mark.parametrize("key, value", [
    ("repetition_penalty", 1.3), ("min_p", 0.1), ("min_tokens", 4), ("guided_json", {"type": "object"}),
    ("guided_regex", "a+"), ("functions", [{"name": "f"}]), ("tool_choice", "required"),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}), ("stop_token_ids", [3]),
    ("use_beam_search", True), ("length_penalty", 2.0), ("skip_special_tokens", False),
])
def test_sampling_fields_not_implemented_are_refused_not_ignored(client, key, value):
    """vLLM's and OpenAI's fields that would change the output are OpenAI's 400 naming the field (they were
    ignored: 200 with an output that disregarded them); their "off" values pass."""
    response = client.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2, key: value})
    assert response.status_code == 400, response.text
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == (key, "unsupported_parameter")
    off = {"repetition_penalty": 1.0, "min_p": 0.0, "min_tokens": 0, "tool_choice": "none",
           "stop_token_ids": [], "use_beam_search": False, "length_penalty": 1.0, "skip_special_tokens": True}
    if key in off:
        body = {"model": "alpha", "prompt": "x", "max_tokens": 2, key: off[key]}
        assert client.post("/v1/completions", json=body).status_code == 200


def test_top_k_reaches_the_sampler(client, engine):
    """top_k (vLLM's) cuts the draw to the k likeliest tokens (road_export.runtime.generation.Sampling's top_k): with 1
    a hot, seeded draw is the greedy text, whereas without it (or with -1 / 0, off) the same seed is not; planted
    fault: SamplingParams dropping top_k gives the untruncated draw."""
    def text(**options):
        body = {"model": "gamma", "prompt": PROMPTS[2], "max_tokens": 12, **options}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    greedy_text = text(temperature=0)
    hot = {"temperature": 2.0, "seed": 5}
    assert text(top_k=1, **hot) == greedy_text
    assert text(**hot) == text(top_k=-1, **hot) == text(top_k=0, **hot) != greedy_text
    params = SamplingParams(temperature=2.0, top_k=3)
    assert params.sampling().top_k == 3 and SamplingParams(temperature=0, top_k=3).sampling() is None


def test_model_retrieve_head_health_and_long_names(client, engine):
    """GET /v1/models/{model} is OpenAI's retrieve for a served name, OpenAI's 404 otherwise; HEAD /health
    answers 200; an unknown name of 1 MB is not echoed in full."""
    for name in engine.model_names:
        response = client.get(f"/v1/models/{name}")
        assert response.status_code == 200 and response.json()["id"] == name
        assert response.json() in client.get("/v1/models").json()["data"]
    response = client.get("/v1/models/delta")
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert client.head("/health").status_code == 200
    long = "m" * 2**20
    response = client.post("/v1/completions", json={"model": long, "prompt": "x"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert len(response.text) < 2000 and f"({2**20} characters)" in response.json()["error"]["message"]


def test_bad_chat_requests_and_bodies(client):
    response = client.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"content": "hi"}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[0]"
    response = client.post("/v1/chat/completions", json={"model": "alpha", "messages": []})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    response = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not JSON" in response.json()["error"]["message"]


def test_every_chat_field_is_counted_before_rendering(client, engine, monkeypatch):
    """A role (or name, or content part) longer than the context can hold is refused before the template renders
    it or the tokenizer sees it, not only a long content; planted fault: the template is recorded, and a request
    within the bound does reach it."""
    rendered = []
    apply = engine.tokenizer.apply_chat_template
    monkeypatch.setattr(engine.tokenizer, "apply_chat_template",
                        lambda messages, **k: rendered.append(len(messages)) or apply(messages, **k))
    big = "r" * (engine.context_length * engine.tokenizer.max_token_chars + 1)
    for message in ({"role": big, "content": "hi"}, {"role": "user", "name": big, "content": "hi"},
                    {"role": "user", "content": [{"type": "text", "text": "hi", "extra": big}]}):
        response = client.post("/v1/chat/completions", json={"model": "alpha", "messages": [message]})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "context_length_exceeded"
    assert rendered == []
    many = [{"role": "user", "content": ""}] * (engine.context_length * engine.tokenizer.max_token_chars // 4)
    response = client.post("/v1/chat/completions", json={"model": "alpha", "messages": many})  # each one counts
    assert response.status_code == 400 and rendered == []
    response = client.post("/v1/chat/completions", json={"model": "alpha", "max_tokens": 2,
                                                         "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200 and rendered == [1]


KEY = "road-export-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def guarded(example):
    """The FastAPI app in this process with an API key, a 2000-byte body limit and a queue of 1, on an engine of
    its own (one loop thread per engine)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from road_export.app.serving.http import create_app

    looper = AsyncEngine(Engine(example.model, max_batch_size=8, threads=1))
    service = OpenAIService(looper, max_queue=1)
    with TestClient(create_app(service, Stats(), api_key=KEY, max_body_bytes=2000)) as c:
        yield c, service
    looper.close()


def test_the_api_key_and_no_docs(guarded):
    """Every route but /health wants the key (OpenAI's 401 otherwise: none, another, another scheme); FastAPI's
    /docs, /redoc and /openapi.json are off."""
    client, _ = guarded
    body = {"model": "alpha", "prompt": "x", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}, {"Authorization": KEY}):
        for response in (client.get("/v1/models", headers=headers), client.get("/stats", headers=headers),
                         client.post("/v1/completions", json=body, headers=headers)):
            assert response.status_code == 401, (headers, response.text)
            error = response.json()["error"]
            assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models", headers=AUTH).status_code == 200
    assert client.post("/v1/completions", json=body, headers=AUTH).status_code == 200
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path, headers=AUTH).status_code == 404


def test_header_and_body_limits(guarded):
    """Headers over 64 KiB get 431, a body over the limit 413 whether it declares its length or not."""
    client, _ = guarded
    response = client.get("/v1/models", headers={**AUTH, "X-Big": "h" * 70_000})
    assert response.status_code == 431 and response.json()["error"]["code"] == "headers_too_large"
    big = json.dumps({"model": "alpha", "prompt": "x" * 3000}).encode()
    response = client.post("/v1/completions", content=big, headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    response = client.post("/v1/completions", content=iter([big[:1500], big[1500:]]),  # chunked: no length
                           headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 413
    small = {"model": "alpha", "prompt": "x", "max_tokens": 2}
    assert client.post("/v1/completions", json=small, headers=AUTH).status_code == 200


def test_a_full_replica_answers_429_with_retry_after(guarded, monkeypatch):
    """With max_batch_size rows running and max_queue waiting, one more request gets OpenAI's 429 with
    Retry-After, before it is parsed; /stats says what runs and waits."""
    client, service = guarded
    engine = service.core
    body = {"model": "alpha", "prompt": "x", "max_tokens": 2}
    monkeypatch.setattr(AsyncEngine, "in_flight", property(lambda self: engine.max_batch_size + 1))
    response = client.post("/v1/completions", json=body, headers=AUTH)
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    stats = client.get("/stats", headers=AUTH).json()
    assert stats["running"] + stats["queued"] == engine.max_batch_size + 1 and stats["max_queue"] == 1
    monkeypatch.setattr(AsyncEngine, "in_flight", property(lambda self: engine.max_batch_size))
    assert client.post("/v1/completions", json=body, headers=AUTH).status_code == 200


def test_proxy_errors_answer_for_a_replica_that_died():
    """ProxyErrors (in Ray's proxy): a response never started becomes OpenAI's 503, a started event stream ends
    with an error event and [DONE], a complete response passes untouched (planted: inner apps that stop short)."""
    from road_export.app.serving.http import ProxyErrors

    async def run(inner):
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        await ProxyErrors(inner)({"type": "http", "path": "/v1/completions", "headers": []}, receive, send)
        return sent

    async def dies_before(scope, receive, send):
        raise RuntimeError("ActorDiedError")

    async def dies_streaming(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type",
                                                                              b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})

    async def answers(scope, receive, send):
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    sent = asyncio.run(run(dies_before))
    assert sent[0]["status"] == 503
    assert json.loads(sent[1]["body"])["error"]["code"] == "replica_failed"
    sent = asyncio.run(run(dies_streaming))
    events = sent[-1]["body"].decode().split("\n\n")
    assert sent[-1]["more_body"] is False and events[1] == "data: [DONE]"
    assert json.loads(events[0][len("data: "):])["error"]["type"] == "server_error"
    assert [m.get("status") for m in asyncio.run(run(answers))] == [404, None]
    assert len(asyncio.run(run(answers))) == 2


def test_a_non_streaming_request_is_cancelled_when_its_client_disconnects(engine):
    from road_export.app.serving.http import _unless_disconnected

    class Gone:
        async def receive(self):  # the client leaves once its request is decoding
            while engine.running == 0:
                await asyncio.sleep(0.001)
            return {"type": "http.disconnect"}

    async def go():
        looper = AsyncEngine(engine)
        service = OpenAIService(looper)
        work = asyncio.ensure_future(service.complete({"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 100,
                                                       "temperature": 0}, chat=False))
        with pytest.raises(asyncio.CancelledError):
            await _unless_disconnected(Gone(), work)
        for _ in range(200):
            if not engine.has_work():
                break
            await asyncio.sleep(0.01)
        looper.close()

    stats = Stats()
    engine.recorders.append(stats)
    try:
        asyncio.run(go())
    finally:
        engine.recorders.remove(stats)
    assert not engine.has_work() and stats.finish_reasons == {"cancelled": 1}


def test_arrivals_wait_in_the_gatherer_only_while_the_engine_is_idle(engine):
    """The Ray deployment's batch wait gathers arrivals into one prefill while the engine is idle; a request that
    arrives while it runs is queued at once (it joins at the next step boundary) and not held in the gatherer."""
    gathered = []

    async def go():
        looper = AsyncEngine(engine)

        async def gather(request):
            gathered.append(request.params.max_tokens)
            return looper.submit_many([request])[0]

        service = OpenAIService(looper, submit=gather)
        body = {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 30, "temperature": 0, "ignore_eos": True}
        try:
            first = asyncio.ensure_future(service.complete(body, chat=False))
            while engine.running == 0:
                await asyncio.sleep(0.001)
            second = await service.complete({**body, "max_tokens": 3}, chat=False)
            return await first, second
        finally:
            looper.close()

    first, second = asyncio.run(go())
    assert gathered == [30]  # only the request that found the engine idle went through the gatherer
    assert first["usage"]["completion_tokens"] == 30 and second["usage"]["completion_tokens"] == 3
    assert second["choices"][0]["text"] == run_engine(engine, [greedy("alpha", engine.tokenizer.encode(PROMPTS[0]), 3,
                                                                      "s")])["s"][1]


def test_service_refuses_before_queueing(engine):
    service = OpenAIService.__new__(OpenAIService)
    service.core = engine
    with pytest.raises(ApiError) as caught:
        service.parse({"model": "alpha", "prompt": "x", "seed": 1.5}, chat=False)
    assert caught.value.param == "seed" and engine.waiting == 0


def test_ray_metrics_record_steps_and_requests(engine):
    """The Ray Serve metrics recorder under the engine (ray.serve.metrics work outside a replica too): every tag
    the metrics declare is given, so a request runs through it without error."""
    pytest.importorskip("ray.serve")
    from road_export.app.serving.app import RayMetrics

    metrics = RayMetrics(engine)
    engine.recorders.append(metrics)
    try:
        got = run_engine(engine, [greedy("alpha", engine.tokenizer.encode(PROMPTS[0]), 4, "m")])
    finally:
        engine.recorders.remove(metrics)
    assert got["m"][2] == "length"
    with pytest.raises(ValueError, match="finish_reason"):  # the metric checks its tags: a wrong call is seen
        metrics.requests.inc(tags={"model": "alpha"})


# ---- packaging and the command line ----

def test_the_server_runs_without_torch(example, tmp_path):
    """A serving host installs road-export[serve] without torch: the engine, the API and the app import and a
    request completes with torch, transformers and peft blocked."""
    from test_floor import BLOCK_TORCH, run_python

    code = BLOCK_TORCH + f"""
import asyncio, sys
from road_export.app.serving.engine import Engine
from road_export.app.serving.loop import AsyncEngine
from road_export.app.serving.protocol import OpenAIService
import road_export.app.serving.http, road_export.app.serving.cli
service = OpenAIService(AsyncEngine(Engine({str(example.model)!r}, threads=1)))
body = asyncio.run(service.complete({{"model": "beta", "prompt": "hi", "max_tokens": 3, "ignore_eos": True}},
                                   chat=False))
assert body["usage"]["completion_tokens"] == 3, body
heavy = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
assert not heavy, heavy
print("ok")
"""
    done = run_python(code, tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_only_the_serving_package_imports_ray():
    from test_layering import package_sources

    def offenders(sources):
        from test_layering import imports

        bad = []
        for module, source in sources.items():
            if module.startswith("road_export.app.serving"):
                continue
            for target in imports(module, source):
                if target.split(".")[0] in ("ray", "fastapi", "starlette"):
                    bad.append(f"{module} imports {target}")
        return bad

    assert offenders(package_sources()) == []
    assert offenders({"road_export.app.cli": "def f():\n    from ray import serve\n"}) == [
        "road_export.app.cli imports ray"]


def test_serve_refuses_bad_input_in_one_line(example, tmp_path, monkeypatch):
    from test_cli import assert_bad_input, road_export

    # a cluster that does not answer: refused at once, not retried for minutes
    assert_bad_input(road_export("serve", example.model, "--address", "127.0.0.1:1"), says="cannot connect")
    assert_bad_input(road_export("serve", example.model, "--address", "nonsense"), says="give HOST:PORT")
    # what a started local instance cannot give (Ray itself stubbed): the port, the CPUs for every replica
    ray = pytest.importorskip("ray")
    from road_export.app.serving import cli as serve_cli

    monkeypatch.setattr(serve_cli, "start_ray", lambda *a, **k: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert_bad_input(road_export("serve", example.model, "--port", taken.getsockname()[1]),
                         says="cannot listen there")
    assert_bad_input(road_export("serve", example.model, "--threads", "2", "--replicas", "2", "--port",
                                 _free_port()), says="2 replica(s) reserve 2 CPU(s) each (--threads) and the Ray "
                     "cluster has 2")

    assert_bad_input(road_export("serve", tmp_path / "nothing"), says="nothing: no such directory")
    assert_bad_input(road_export("serve", example.model, "--port", "70000"), says="not a TCP port")
    assert_bad_input(road_export("serve", example.model, "--max-batch-size", "0"), says="must be >= 1")
    assert_bad_input(road_export("serve", example.base), says="not a model directory")
    assert_bad_input(road_export("serve", example.model, "--max-queue", "-1"), says="must be >= 0")
    assert_bad_input(road_export("serve", example.model, "--body-timeout", "0"), says="must be above 0")
    assert_bad_input(road_export("serve", example.model, "--max-body-mb", "nan"), says="must be from 0.001")
    assert_bad_input(road_export("serve", example.model, "--cuda-graph"), says="CUDA graphs need --device cuda")
    monkeypatch.setenv("ROAD_EXPORT_API_KEY", " ")
    assert_bad_input(road_export("serve", example.model), says="--api-key / ROAD_EXPORT_API_KEY: empty")


def test_serve_refuses_options_ray_would_fail_on_later(example, monkeypatch):
    """Options that passed the parser and failed after Ray started (exit 3), or did something else than asked,
    are one line and exit 2 before Ray starts: an empty host (uvicorn listens on every interface), sizes past
    Ray's int32 (Value out of range), a URL for --address, keys no client can send in a header, a body limit no
    request fits, an application name with a "/"."""
    from test_cli import assert_bad_input, road_export

    pytest.importorskip("ray")
    from road_export.app.serving import cli as serve_cli

    def start_ray(*args, **kwargs):  # what the old code reached: Ray starting on these options
        raise RuntimeError("Ray started")

    monkeypatch.setattr(serve_cli, "start_ray", start_ray)
    model = example.model
    for host in ("", "  ", "127.0.0.1 "):
        assert_bad_input(road_export("serve", model, "--host", host), says="argument --host")
    assert_bad_input(road_export("serve", model, "--max-batch-size", "1000000000"), says="must be at most 4096")
    assert_bad_input(road_export("serve", model, "--max-queue", "1" + "0" * 20), says="must be at most 1000000")
    assert_bad_input(road_export("serve", model, "--replicas", "1" + "0" * 12), says="must be at most 4096")
    assert_bad_input(road_export("serve", model, "--threads", "1" + "0" * 12), says="must be at most 1024")
    for address in ("http://127.0.0.1:8022", "127.0.0.1:0", "127.0.0.1:99999", ":6379", "ray://"):
        assert_bad_input(road_export("serve", model, "--address", address), says="give HOST:PORT of the Ray head")
    assert_bad_input(road_export("serve", model, "--max-body-mb", "1e-9"), says="must be from 0.001")
    assert_bad_input(road_export("serve", model, "--app-name", "a/b"), says="letters, digits")
    for key, shown in (("ab\ncd", "'\\n'"), ("clé-secrète", "'é'"), ("two words", "' '")):
        monkeypatch.setenv("ROAD_EXPORT_API_KEY", key)
        assert_bad_input(road_export("serve", model), says=f"ROAD_EXPORT_API_KEY: holds {shown}")
    monkeypatch.delenv("ROAD_EXPORT_API_KEY")
    assert_bad_input(road_export("serve", model, "--api-key", "k\x7f"), says="printable ASCII")


def test_loopback_is_decided_by_resolving_the_host(example, monkeypatch):
    """HAProxy's refusal on a loopback host resolves the host (it matched "localhost" and literal addresses
    only): 127.1, LOCALHOST, 2130706433 (127.0.0.1 as one number) and ::1 are loopback; 0.0.0.0 and a name that
    does not resolve are not."""
    from test_cli import assert_bad_input, road_export

    from road_export.app.serving.cli import _is_loopback

    for host in ("127.0.0.1", "127.1", "LOCALHOST", "localhost", "2130706433", "::1", "127.0.0.2"):
        assert _is_loopback(host), host
    for host in ("0.0.0.0", "192.0.2.7", "::", "no-such-host.invalid"):
        assert not _is_loopback(host), host
    pytest.importorskip("ray")
    from road_export.app.serving import cli as serve_cli

    def start_ray(*args, **kwargs):  # not reached: refused before Ray starts
        raise RuntimeError("Ray started")

    monkeypatch.setattr(serve_cli, "start_ray", start_ray)
    for host in ("127.1", "LOCALHOST", "2130706433"):
        assert_bad_input(road_export("serve", "--ingress", "haproxy", "--host", host, example.model),
                         says="Ray's HAProxy opens its stats")


def test_on_a_cluster_an_application_of_another_is_neither_replaced_nor_deleted(example, monkeypatch):
    """Joining a cluster (--address) where an application of the same name runs: refused in one line, and the
    exit deletes nothing (planted: the name is free, so the command deploys, and then deletes only its own)."""
    from test_cli import assert_bad_input, road_export

    ray = pytest.importorskip("ray")
    from ray import serve

    from road_export.app.serving import cli as serve_cli

    deleted, ran = [], []
    monkeypatch.setattr(serve_cli, "start_ray", lambda *a, **k: False)  # joined, not started
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(serve, "delete", deleted.append)
    monkeypatch.setattr(serve, "start", lambda **k: None)
    monkeypatch.setattr(serve, "status", lambda: type("S", (), {"applications": {"road-export": object()}})())
    assert_bad_input(road_export("serve", example.model, "--address", "10.0.0.5:6379"),
                     says="--app-name road-export: the Ray cluster at 10.0.0.5:6379 already runs an application")
    assert deleted == []

    def run(app, name, route_prefix):
        ran.append(name)
        raise RuntimeError("stop here")

    monkeypatch.setattr(serve, "run", run)
    done = road_export("serve", example.model, "--address", "10.0.0.5:6379", "--app-name", "mine")
    assert done.returncode == 3 and "stop here" in done.stderr  # serve.run failing half way: a bug, exit 3
    assert ran == ["mine"] and deleted == ["mine"]


# ---- on Ray Serve: one local application for the module ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVING_LINES: list[str] = []  # the "serving ..." line of each server started
SERVERS: dict[str, int] = {}  # URL -> the serving process's id


@contextlib.contextmanager
def _serving(model, *options, env=None, stop=None):
    """`road-export serve MODEL` as users start it (a subprocess, a local Ray instance), yielding its URL; `stop`
    (default SIGINT, the ordinary stop: exit code 0; SIGTERM: 143, as every road-export command) ends it. `env`:
    further environment variables."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pytest.importorskip("ray.serve")
    pytest.importorskip("httpx")
    port = _free_port()
    env = {**{k: v for k, v in os.environ.items() if k != "ROAD_EXPORT_API_KEY"}, **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "road_export.app.cli", "serve", str(model), "--port", str(port),
                             "--max-batch-size", "8", "--threads", "1", *options], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        deadline = time.monotonic() + 180
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("serving "):
                SERVING_LINES.append(line)
                break
            assert time.monotonic() < deadline, "".join(lines)
        assert proc.poll() is None, "".join(lines)
        threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout], daemon=True).start()
        SERVERS[f"http://127.0.0.1:{port}"] = proc.pid
        yield f"http://127.0.0.1:{port}"
        stop = signal.SIGINT if stop is None else stop
        proc.send_signal(stop)
        # promptly: a local instance is shut down whole, not drained (HAProxy ingress drains replicas for 30 s)
        assert proc.wait(timeout=25) == (0 if stop == signal.SIGINT else 128 + stop), "".join(lines[-20:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def ray_url(example):
    """One server for the module: the API key from ROAD_EXPORT_API_KEY, 8 rows and 4 queued, a 3 s body
    timeout."""
    with _serving(example.model, "--max-queue", "4", "--body-timeout", "3", env={"ROAD_EXPORT_API_KEY": KEY}) as url:
        yield url


def test_the_server_says_its_ingress(ray_url):
    """The line `road-export serve` prints names the ingress (Ray Serve's proxy by default), and that a key is on."""
    assert "ingress proxy, API key on)" in SERVING_LINES[0]


def test_start_ray_starts_its_own_or_joins_only_when_asked(monkeypatch, tmp_path):
    """Without an address start_ray starts a local instance of its own (never "auto", whatever RAY_ADDRESS says),
    with loopback listeners and token authentication in its environment; an address joins that cluster; a
    cluster that cannot be reached, HAProxy with a cluster address, and a local node that is not on loopback
    (planted: Ray reports another address) are one line."""
    ray = pytest.importorskip("ray")
    from road_export.core.errors import RoadError
    from road_export.app.serving import cli as serve_cli

    calls = []

    def init(address=None, **_):
        calls.append((address, os.environ.get("RAY_AUTH_MODE"), os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")))
        if address in ("auto", "ray://nowhere:10001"):
            raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    monkeypatch.setattr(serve_cli, "_check_reachable", lambda address: None)  # no head at these addresses
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
                 "RAY_SERVE_ENABLE_HA_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # another server's instance: not joined
    assert serve_cli.start_ray() is True
    assert calls == [("local", "token", "0")] and len(os.environ["RAY_AUTH_TOKEN"]) == 64
    assert serve_cli.start_ray("ray://head:10001") is False and calls[-1][0] == "ray://head:10001"
    with pytest.raises(RoadError, match="Ray at ray://nowhere:10001: Could not find any running Ray instance"):
        serve_cli.start_ray("ray://nowhere:10001")
    with pytest.raises(RoadError, match="--ingress haproxy starts a local Ray instance, not one at ray://head"):
        serve_cli.start_ray("ray://head:10001", "haproxy")
    # auto: the instance `ray start --head` recorded here, never any other Ray process Ray's own "auto" finds
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    with pytest.raises(RoadError, match="Ray at auto: no `ray start` instance on this machine"):
        serve_cli.start_ray("auto")
    assert "auto" not in [c[0] for c in calls if isinstance(c, tuple)]
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.0.0.5:6379")
    assert serve_cli.start_ray("auto") is False and calls[-1][0] == "10.0.0.5:6379"
    with pytest.raises(RoadError, match="--ingress nginx: unknown"):
        serve_cli.start_ray(None, "nginx")
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "192.0.2.7")
    calls.clear()
    with pytest.raises(RoadError, match="took the address 192.0.2.7, not loopback"):
        serve_cli.start_ray()
    assert calls[-1] == "shutdown"


def test_haproxy_files_are_private_and_a_loopback_server_refuses_it(example, tmp_path, monkeypatch):
    """Ray's HAProxy template opens its admin socket `mode 666 level admin` and binds its stats and metrics on
    every interface: road-export puts the socket, configuration and state in a directory only its user can enter,
    and refuses the HAProxy ingress for a loopback --host (in one line)."""
    import stat

    from test_cli import assert_bad_input, road_export

    from road_export.core.errors import RoadError
    from road_export.app.serving.cli import local_ray_environment

    with pytest.raises(RoadError, match="--ingress haproxy --host 127.0.0.1: Ray's HAProxy opens its stats"):
        local_ray_environment("haproxy", "127.0.0.1")
    env = local_ray_environment("haproxy", "0.0.0.0")
    private = env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
    try:
        info = os.stat(private)
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
        for name in ("RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC",
                     "RAY_SERVE_HAPROXY_SERVER_STATE_FILE", "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"):
            assert os.path.dirname(env[name]) == private, name
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_AUTH_MODE"] == "token"
        assert not {env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"]} & {"8404", "9101"}
    finally:
        os.rmdir(private)
    assert local_ray_environment("proxy", "127.0.0.1").keys() == {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
        "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"}
    assert_bad_input(road_export("serve", "--ingress", "haproxy", example.model), says="Ray's HAProxy opens its stats")
    # HAProxy refuses socket paths over 97 characters, and Ray adds a 56-character directory: a long TMPDIR is one line
    import tempfile

    long = tmp_path / ("t" * 40)
    long.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long))
    with pytest.raises(RoadError, match="set TMPDIR to a shorter directory"):
        local_ray_environment("haproxy", "0.0.0.0")
    assert list(long.iterdir()) == []


def together_and_alone(url, engine, count, max_tokens):
    """`count` greedy completions over the models sent to the server at `url` at once: (the responses, each text as
    the in-process CPU engine gives it alone)."""
    import httpx

    names = engine.model_names
    requests = [{"model": names[i % 4], "prompt": PROMPTS[i % 4], "max_tokens": max_tokens, "temperature": 0}
                for i in range(count)]
    alone = {i: run_engine(engine, [greedy(r["model"], engine.tokenizer.encode(r["prompt"]), max_tokens, "x")])
             ["x"][1] for i, r in enumerate(requests)}

    async def send_all():
        async with httpx.AsyncClient(base_url=url, timeout=60, headers=AUTH) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=r) for r in requests))

    return asyncio.run(send_all()), alone


def test_ray_serves_concurrent_adapters_as_alone(ray_url, engine):
    import httpx

    responses, alone = together_and_alone(ray_url, engine, 8, 10)
    assert [r.status_code for r in responses] == [200] * 8
    assert {i: r.json()["choices"][0]["text"] for i, r in enumerate(responses)} == alone
    stats = httpx.get(f"{ray_url}/stats", headers=AUTH).json()
    assert max(map(int, stats["adapters_per_batch"])) >= 2 and stats["requests"]


def test_ray_streams_and_refuses(ray_url):
    import httpx

    with httpx.Client(base_url=ray_url, timeout=60, headers=AUTH) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]][1:] == ["alpha", "beta", "gamma"]
        response = c.post("/v1/chat/completions", json={"model": "beta", "messages": [{"role": "user",
                          "content": "hi"}], "max_tokens": 6, "temperature": 0, "stream": True})
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = events(response)
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        response = c.post("/v1/completions", json={"model": "delta", "prompt": "x"})
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_the_openai_client_talks_to_it(ray_url, engine):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{ray_url}/v1", api_key=KEY)
    assert [m.id for m in client.models.list()] == engine.model_names
    ids = engine.tokenizer.encode(PROMPTS[2])
    want = run_engine(engine, [greedy("gamma", ids, 8, "g")])["g"][1]
    assert client.completions.create(model="gamma", prompt=PROMPTS[2], max_tokens=8, temperature=0
                                     ).choices[0].text == want
    stream = client.completions.create(model="gamma", prompt=PROMPTS[2], max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == want
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="delta", prompt="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{ray_url}/v1", api_key="wrong").models.list()


def _listeners(pid: int) -> dict[str, str]:
    """{address:port: process name} of every TCP socket listening in process `pid` and its descendants."""
    import psutil

    root = psutil.Process(pid)
    found = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found[f"{conn.laddr.ip}:{conn.laddr.port}"] = proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address.rsplit(":", 1)[0].strip("[]"))
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_every_listener_binds_loopback_and_ray_wants_a_token(ray_url):
    """With the default --host 127.0.0.1, every socket the command's processes listen on (the proxy, Ray's GCS,
    raylet, workers, agents, metrics) is on loopback, and Ray's control plane runs with token authentication."""
    import psutil

    found = _listeners(SERVERS[ray_url])
    assert len(found) >= 5 and f"127.0.0.1:{ray_url.rsplit(':', 1)[1]}" in found, found
    assert [a for a in found if not _loopback(a)] == [], found
    gcs = [p for p in psutil.Process(SERVERS[ray_url]).children(recursive=True) if p.name() == "gcs_server"]
    assert gcs and gcs[0].environ().get("RAY_AUTH_MODE") == "token"


def test_the_key_on_ray(ray_url):
    import httpx

    assert httpx.get(f"{ray_url}/v1/models").status_code == 401
    response = httpx.post(f"{ray_url}/v1/completions", json={"model": "alpha", "prompt": "x"},
                          headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{ray_url}/docs", headers=AUTH).status_code == 404
    assert httpx.get(f"{ray_url}/health").status_code == 200


def test_the_routes_open_without_the_key_are_those_the_readme_names(ray_url):
    """Without the key: /health (GET and HEAD) and Ray's proxy's own /-/healthz and /-/routes, which name the
    application and nothing of its models (docs/serving.md's "Exposing it" says so); every route of ours else is 401,
    the model retrieve included."""
    import httpx

    with httpx.Client(base_url=ray_url, timeout=30) as c:
        assert c.get("/health").status_code == 200 and c.head("/health").status_code == 200
        assert c.get("/-/healthz").status_code == 200
        routes = c.get("/-/routes")
        assert routes.status_code == 200 and routes.json() == {"/": "road-export"}
        for path in ("/v1/models", "/v1/models/alpha", "/stats", "/v1/nothing"):
            assert c.get(path).status_code == 401, path
        retrieved = c.get("/v1/models/alpha", headers=AUTH)
        assert retrieved.status_code == 200 and retrieved.json()["id"] == "alpha"


def test_stalled_uploads_hold_no_slot(ray_url):
    """64 clients (8 x --max-batch-size) that send headers and part of a body: a small request still completes
    at once, and each stalled upload gets 408 after the body timeout (3 s here) instead of holding a slot."""
    import httpx

    port = int(ray_url.rsplit(":", 1)[1])
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": ").encode()
    stalled = []
    try:
        for _ in range(64):
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(head)
            stalled.append(sock)
        time.sleep(1)
        start = time.monotonic()
        response = httpx.post(f"{ray_url}/v1/completions", headers=AUTH, timeout=20,
                              json={"model": "alpha", "prompt": "x", "max_tokens": 2})
        assert response.status_code == 200 and time.monotonic() - start < 10
        answers = [sock.recv(200) for sock in stalled[:4]]  # within the socket timeout: the body timeout fired
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers
    finally:
        for sock in stalled:
            sock.close()


def test_a_huge_role_does_not_stall_a_small_request(ray_url):
    """A 10 MB role (not content) is refused as too long for the context, and a small request sent beside it
    is answered in well under the seconds that rendering and tokenizing 10 MB on the event loop took."""
    import httpx

    huge = {"model": "alpha", "messages": [{"role": "r" * 10_000_000, "content": "hi"}]}
    small = {"model": "alpha", "prompt": "x", "max_tokens": 2}

    async def go():
        async with httpx.AsyncClient(base_url=ray_url, timeout=60, headers=AUTH) as c:
            big = asyncio.ensure_future(c.post("/v1/chat/completions", json=huge))
            await asyncio.sleep(0.5)  # the upload under way
            start = time.monotonic()
            response = await c.post("/v1/completions", json=small)
            return await big, response, time.monotonic() - start

    big, response, seconds = asyncio.run(go())
    assert big.status_code == 400 and big.json()["error"]["code"] == "context_length_exceeded", big.text[:300]
    assert response.status_code == 200 and seconds < 3, seconds


def test_a_flood_beyond_the_queue_gets_429_with_retry_after(ray_url, engine):
    """40 requests at once against 8 rows + 4 queued: the overflow gets OpenAI's 429 with Retry-After at once,
    the others complete with the text each gives alone, and /stats counts running and queued rows."""
    import httpx

    requests = [{"model": engine.model_names[i % 4], "prompt": PROMPTS[i % 4], "max_tokens": 8, "temperature": 0}
                for i in range(40)]

    async def go():
        async with httpx.AsyncClient(base_url=ray_url, timeout=60, headers=AUTH) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=r) for r in requests))

    start = time.monotonic()
    responses = asyncio.run(go())
    seconds = time.monotonic() - start
    refused = [r for r in responses if r.status_code == 429]
    assert refused and all(r.headers.get("retry-after") == "1" and r.json()["error"]["code"] == "rate_limit_exceeded"
                           for r in refused)
    served = [(i, r) for i, r in enumerate(responses) if r.status_code != 429]
    assert len(served) >= 12 and all(r.status_code == 200 for _, r in served), [r.text for _, r in served]
    for i, r in served[:4]:
        ids = engine.tokenizer.encode(requests[i]["prompt"])
        assert r.json()["choices"][0]["text"] == run_engine(engine, [greedy(requests[i]["model"], ids, 8, "f")])["f"][1]
    assert seconds < 60
    stats = httpx.get(f"{ray_url}/stats", headers=AUTH).json()
    assert {"running", "queued"} <= stats.keys() and stats["max_queue"] == 4


def test_a_second_server_on_this_machine_takes_nothing_from_the_first(ray_url, example):
    """A second `road-export serve` here starts its own Ray instance: the first keeps answering with its own
    model while the second runs and after it stopped (the old code joined the first's instance, replaced its
    application, and deleted it on exit)."""
    import httpx

    def models(url, **k):
        response = httpx.get(f"{url}/v1/models", timeout=30, **k)
        assert response.status_code == 200, response.text
        return [m["id"] for m in response.json()["data"]]

    first = models(ray_url, headers=AUTH)
    import signal

    with _serving(example.model, "--served-model-name", "second", stop=signal.SIGTERM) as url:
        assert models(url)[0] == "second"
        assert models(ray_url, headers=AUTH) == first
    assert models(ray_url, headers=AUTH) == first
    response = httpx.post(f"{ray_url}/v1/completions", headers=AUTH, timeout=30,
                          json={"model": first[0], "prompt": "x", "max_tokens": 2})
    assert response.status_code == 200


def test_a_replica_crash_gives_openai_errors_and_ray_restarts_it(ray_url):
    """The replica killed (SIGKILL) with a streaming and a non-streaming request in flight: the non-streaming one
    gets OpenAI's 503 JSON, the stream ends with an error event and [DONE]; Ray restarts the replica and a
    completion succeeds again (within 90 s here). Last of the Ray tests: the module's server restarts its replica."""
    import httpx
    import psutil

    replicas = [p for p in psutil.Process(SERVERS[ray_url]).children(recursive=True) if "ServeReplica" in p.name()]
    assert replicas
    long = {"model": "beta", "prompt": "x", "max_tokens": 120, "ignore_eos": True, "temperature": 0}

    def plain(got):
        got["plain"] = httpx.post(f"{ray_url}/v1/completions", json=long, headers=AUTH, timeout=60)

    def stream(got):
        lines = []
        with httpx.stream("POST", f"{ray_url}/v1/completions", json={**long, "stream": True}, headers=AUTH,
                          timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
        got["stream"] = lines

    # the kill once /stats shows both requests running in one batch (started together on a loaded machine, one
    # could finish before the other joined: then the pair runs again)
    for _ in range(5):
        got: dict = {}
        threads = [threading.Thread(target=f, args=(got,)) for f in (plain, stream)]
        for t in threads:
            t.start()
        both = False
        while not both and any(t.is_alive() for t in threads):
            both = httpx.get(f"{ray_url}/stats", headers=AUTH, timeout=10).json()["running"] >= 2
        if both:
            break
        for t in threads:
            t.join(60)
    else:
        pytest.fail("the two requests never ran at once")
    for p in replicas:
        p.kill()
    for t in threads:
        t.join(60)
    assert got["plain"].status_code == 503, got["plain"].text
    assert got["plain"].json()["error"]["code"] == "replica_failed"
    assert got["stream"][-1] == "data: [DONE]"
    assert json.loads(got["stream"][-2][len("data: "):])["error"]["code"] == "replica_failed"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.post(f"{ray_url}/v1/completions", headers=AUTH, timeout=10,
                          json={"model": "alpha", "prompt": "x", "max_tokens": 2}).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        pytest.fail("the replica did not come back within 90 s")


# ---- on the GPU (marked gpu; skipped where onnxruntime has no CUDA provider) ----

def _cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def test_serve_on_cuda_without_onnxruntime_gpu_is_one_line(example):
    if _cuda():
        pytest.skip("onnxruntime here has the CUDA provider")
    from test_cli import assert_bad_input, road_export

    assert_bad_input(road_export("serve", example.model, "--device", "cuda"), says="no CUDAExecutionProvider")
    assert_bad_input(road_export("serve", example.model, "--device", "tpu"), says="invalid choice")


@pytest.mark.gpu
def test_the_engine_on_cuda_equals_peft_and_batches_across_adapters(example, reference, engine):
    """The same engine on onnxruntime's CUDA provider (TF32 off: float32 products as on the CPU): greedy text of
    each model equals peft's generate, and requests for different adapters in one batch equal each alone."""
    if not _cuda():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    from road_export.runtime.gpu import cuda_providers

    gpu = Engine(example.model, max_batch_size=8, providers=cuda_providers(tf32=False))
    assert gpu.session.device == "cuda"
    tokenizer = reference[1]
    for model in gpu.model_names:
        ids = tokenizer(PROMPTS[0])["input_ids"]
        want_ids, want_text = peft_generate(reference, None if model == gpu.base_name else model, ids)
        assert run_engine(gpu, [greedy(model, ids, rid="one")])["one"][:2] == (want_ids, want_text), model
    names = gpu.model_names
    requests = [greedy(names[i % len(names)], gpu.tokenizer.encode(PROMPTS[i % len(PROMPTS)]), 6 + 2 * i, f"r{i}")
                for i in range(6)]
    alone = {r.request_id: run_engine(engine, [greedy(r.model, r.prompt_ids, r.params.max_tokens, r.request_id)])
             [r.request_id] for r in requests}
    stats = Stats()
    gpu.recorders.append(stats)
    assert run_engine(gpu, requests[:4], arrive={2: requests[4:]}) == alone
    assert max(stats.adapters_per_batch) >= 4


@pytest.mark.gpu
def test_ray_serves_on_cuda(example, engine):
    """`road-export serve --device cuda` as users start it: the replica takes the GPU and its completions for
    different adapters sent together equal the CPU engine's."""
    if not _cuda():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    pytest.importorskip("ray.serve")

    with _serving(example.model, "--device", "cuda") as url:
        responses, alone = together_and_alone(url, engine, 4, 8)
        assert {i: r.json()["choices"][0]["text"] for i, r in enumerate(responses)} == alone
