"""OpenAI's completions and chat completions API over `AsyncEngine`, as plain Python (no web framework, no Ray).

Request fields follow OpenAI's API reference (and vLLM's OpenAI-compatible server, which serves LoRA adapters by
name the same way): `model` picks the adapter, or the base by the served model name; `prompt` (a string, or token
ids) or `messages`; `max_tokens` (`max_completion_tokens` for chat), `temperature` (0: greedy), `top_p`, `seed`,
`stop` (a string or up to 4), `stream`, `stream_options.include_usage`, `n` = 1, and vLLM's `ignore_eos` and
`top_k` (-1 or 0: off). Unknown fields are ignored, as OpenAI-compatible servers do; fields of OpenAI's or vLLM's
API that would change the output but are not implemented (`UNSUPPORTED`: `n` > 1, `logprobs`, `echo`, penalties,
`logit_bias`, `best_of`, tools and functions, `min_p`, `min_tokens`, guided decoding...) are refused with 400
naming the field rather than ignored.

Errors are `ApiError`s carrying OpenAI's error body `{"error": {"message", "type", "param", "code"}}` and an HTTP
status: 400 invalid_request_error (a bad parameter, `context_length_exceeded`), 404 (`model_not_found`), 429
(`rate_limit_exceeded`, with Retry-After: the replica's rows and queue are full).

Work per request is bounded before it is done: every string of the chat messages (role, name, content parts,
any other field a template may render) is counted before the template renders them, and parsing, rendering and
tokenizing run on a worker thread, not the event loop (`complete`).
Streaming responses are server-sent events: `data: {chunk}` lines in OpenAI's chunk format, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from road_export.core.errors import RoadError
from road_export.app.serving.engine import GenerationRequest, Output, SamplingParams
from road_export.app.serving.loop import AsyncEngine

__all__ = ["ApiError", "OpenAIService"]

UNSUPPORTED = {  # field -> the value that means "off"
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
    "suffix": (None, ""), "tools": (None, []), "response_format": (None, {"type": "text"}),
    # OpenAI's tool and function calling: no tools are served, so only "none" (or nothing) is a choice
    "functions": (None, []), "function_call": (None, "none", "auto"),
    "tool_choice": (None, "none", "auto"),
    "prediction": (None,), "audio": (None,), "modalities": (None, ["text"]), "web_search_options": (None,),
    # vLLM's sampling and decoding extensions (vllm/entrypoints/openai/protocol.py), none implemented here
    "repetition_penalty": (None, 1, 1.0), "length_penalty": (None, 1, 1.0), "min_p": (None, 0, 0.0),
    "min_tokens": (None, 0), "use_beam_search": (None, False), "stop_token_ids": (None, []),
    "bad_words": (None, []), "allowed_token_ids": (None,), "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True), "spaces_between_special_tokens": (None, True),
    "prompt_logprobs": (None,), "truncate_prompt_tokens": (None,), "logits_processors": (None,),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "guided_decoding_backend": (None,), "guided_whitespace_pattern": (None,), "structured_outputs": (None,),
    "add_generation_prompt": (None, True), "continue_final_message": (None, False), "chat_template": (None,),
    "chat_template_kwargs": (None, {}), "documents": (None,), "mm_processor_kwargs": (None,),
}
NAME_CHARS = 80  # the longest model name an error message quotes in full


def _short(value: Any, limit: int = NAME_CHARS) -> str:
    """repr(value), cut to `limit` characters with the full length said: a message never echoes a 10 MB field."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class ApiError(Exception):
    """An OpenAI-style error: `status` (HTTP) and `body()` = {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _number(body: dict, key: str, default, *, low: float, high: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    kind = int if integer else (int, float)
    # a whole number is compared as it is (math.isfinite would convert it to a float: OverflowError past 1e308)
    finite = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    if isinstance(value, bool) or not isinstance(value, kind) or not finite or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise ApiError(f"{key} must be {what} from {low} to {high}, got {_short(value)}", param=key,
                       code="invalid_value")
    return value


def _flag(body: dict, key: str) -> bool:
    """An optional boolean: false when absent or null."""
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(f"{key} must be true or false", param=key, code="invalid_value")
    return value


GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS: temperatures below it sample greedily


def _check_text(value: Any, where: str | None = None) -> None:
    """Refuse strings that are not Unicode text anywhere in the body: lone surrogates, which JSON's "\\ud800"
    escapes can carry and UTF-8 cannot encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")  # in C: a Python loop over a 10 MB string would hold the thread for a second
        except UnicodeEncodeError as e:
            bad = value[e.start]
            raise ApiError(f"{where or 'the request'} holds a lone surrogate (\\u{ord(bad):04x}), which is not "
                           "Unicode text; send text that encodes as UTF-8", param=where, code="invalid_value") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where)
            _check_text(item, key if where is None else f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, f"{where}[{i}]")


class OpenAIService:
    """The API's handlers. `submit` gathers the requests that arrive while the engine is idle, so that they start in
    one prefill, and returns their output queues: the Ray deployment passes its `@serve.batch` method (arrivals
    within --batch-wait-ms); without it each request is queued at once. While the engine runs, requests are queued
    on it at once either way: it admits everything that arrived at its next step boundary, so a wait would only
    delay them."""

    def __init__(self, engine: AsyncEngine, *, submit: Callable[[GenerationRequest], Awaitable[Any]] | None = None,
                 max_queue: int | None = None):
        self.engine = engine
        self.core = engine.engine
        self._submit = submit
        self.max_queue = max_queue
        self._gathering = 0  # requests in `submit`'s gatherer, not yet queued on the engine
        self.created = int(time.time())

    def load(self) -> dict[str, Any]:
        """This replica's rows running and requests queued (admitted, waiting for a row) now, and its bounds."""
        admitted = self.engine.in_flight + self._gathering
        running = min(self.core.running, admitted)
        return {"running": running, "queued": admitted - running, "max_batch_size": self.core.max_batch_size,
                "max_queue": self.max_queue}

    # ---- GET /v1/models ----

    def models(self) -> dict[str, Any]:
        """OpenAI's model list: the base (when served) and every adapter, adapters with `parent` = the base."""
        base = self.core.base_name
        data = [{"id": name, "object": "model", "created": self.created, "owned_by": "road-export",
                 "root": base, "parent": None if name == base else base} for name in self.core.model_names]
        return {"object": "list", "data": data}

    def model(self, name: str) -> dict[str, Any]:
        """OpenAI's model object for one served `name` (GET /v1/models/{model}); ApiError 404 otherwise."""
        for entry in self.models()["data"]:
            if entry["id"] == name:
                return entry
        shown = name if len(name) <= NAME_CHARS else f"{name[:NAME_CHARS]}... ({len(name)} characters)"
        raise ApiError(f"The model `{shown}` does not exist; this server has {self.core.model_names}", status=404,
                       param="model", code="model_not_found")

    # ---- POST /v1/completions and /v1/chat/completions ----

    def parse(self, body: Any, *, chat: bool) -> tuple[GenerationRequest, bool, bool]:
        """(the engine request, stream, include_usage) for a request body; raises ApiError."""
        if not isinstance(body, dict):
            raise ApiError("the request body must be a JSON object")
        _check_text(body)
        model = body.get("model")
        if model is None or model == "":
            raise ApiError("model is required: the base model's name or an adapter's (GET /v1/models)",
                           param="model", code="missing_required_parameter")
        if not isinstance(model, str):
            raise ApiError(f"model must be a string (the base model's name or an adapter's), got {_short(model)}",
                           param="model", code="invalid_value")
        if model not in self.core.model_names:
            name = model if len(model) <= NAME_CHARS else f"{model[:NAME_CHARS]}... ({len(model)} characters)"
            raise ApiError(f"The model `{name}` does not exist; this server has {self.core.model_names}",
                           status=404, param="model", code="model_not_found")
        for key, off in UNSUPPORTED.items():
            if key in body and body[key] not in off:
                raise ApiError(f"{key} is not supported by this server; leave it out", param=key,
                               code="unsupported_parameter")
        if body.get("n") not in (None, 1) or isinstance(body.get("n"), bool):
            raise ApiError(f"n must be 1 (one choice per request), got {_short(body.get('n'))}", param="n",
                           code="invalid_value")
        prompt_ids, param = self._chat_prompt(body) if chat else self._prompt(body)
        room = self.core.context_length - len(prompt_ids)
        if room < 1:
            raise ApiError(f"This model's maximum context length is {self.core.context_length} tokens. However, "
                           f"your prompt has {len(prompt_ids)} tokens. Please shorten it.", param=param,
                           code="context_length_exceeded")
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number(body, key, room if chat else min(16, room), low=1, high=2**31 - 1, integer=True)
        if len(prompt_ids) + max_tokens > self.core.context_length:
            raise ApiError(f"This model's maximum context length is {self.core.context_length} tokens. However, you "
                           f"requested {len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the "
                           f"{'messages' if chat else 'prompt'}, {max_tokens} in the completion). Please reduce the "
                           f"length of the {'messages' if chat else 'prompt'} or {key}.", param=key,
                           code="context_length_exceeded")
        temperature = _number(body, "temperature", 1.0, low=0.0, high=2.0)
        if temperature < GREEDY_BELOW:  # as vLLM: a temperature this close to 0 is greedy (dividing by it overflows)
            temperature = 0.0
        top_p = _number(body, "top_p", 1.0, low=0.0, high=1.0)
        if top_p == 0:
            raise ApiError("top_p must be a number above 0.0, up to 1.0, got 0", param="top_p", code="invalid_value")
        top_k = _number(body, "top_k", 0, low=-1, high=2**31 - 1, integer=True)  # vLLM's: -1 and 0 are off
        seed = _number(body, "seed", None, low=-(2**63), high=2**63 - 1, integer=True)
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
            raise ApiError("stop must be a string or a list of up to 4 strings", param="stop", code="invalid_value")
        stream, ignore_eos = _flag(body, "stream"), _flag(body, "ignore_eos")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError("stream_options must be an object", param="stream_options", code="invalid_value")
        params = SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_p=float(top_p),
                                top_k=max(top_k, 0), seed=None if seed is None else seed % 2**63, stop=tuple(stops),
                                ignore_eos=ignore_eos)
        request = GenerationRequest(model, prompt_ids, params, request_id=f"{'chatcmpl' if chat else 'cmpl'}-"
                                    f"{uuid.uuid4().hex}", stream=stream)
        return request, stream, bool(options.get("include_usage"))

    def _prompt(self, body: dict) -> tuple[list[int], str]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError("prompt is empty", param="prompt", code="invalid_value")
            self._check_length(prompt, "prompt")
            return self.core.tokenizer.encode(prompt), "prompt"
        vocab = self.core.tokenizer.vocab_size
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            if not all(0 <= t < vocab for t in prompt):
                raise ApiError(f"prompt token ids must lie in [0, {vocab})", param="prompt", code="invalid_value")
            return list(prompt), "prompt"
        if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
            raise ApiError("give one prompt per request (a string or a list of token ids)", param="prompt",
                           code="invalid_value")
        if isinstance(prompt, list) and prompt:
            raise ApiError("prompt must be a string or a list of integer token ids", param="prompt",
                           code="invalid_value")
        raise ApiError("prompt is required: a string or a list of token ids", param="prompt",
                       code="missing_required_parameter" if prompt is None else "invalid_value")

    def _chat_prompt(self, body: dict) -> tuple[list[int], str]:
        if self.core.tokenizer.chat_template is None:
            raise ApiError("this model's tokenizer has no chat template; use /v1/completions", param="messages",
                           code="invalid_value")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError("messages is required: a list of {role, content}", param="messages",
                           code="missing_required_parameter" if messages is None else "invalid_value")
        self._check_length("", "messages", chars=_rendered_chars(messages))  # every field, before any is used
        plain = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ApiError(f"messages[{i}] must be an object with a role", param=f"messages[{i}]",
                               code="invalid_value")
            content = message.get("content")
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise ApiError(f"messages[{i}].content: only text parts are supported",
                                   param=f"messages[{i}].content", code="invalid_value")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise ApiError(f"messages[{i}].content must be a string", param=f"messages[{i}].content",
                               code="invalid_value")
            plain.append({**message, "content": content})
        try:
            text = self.core.tokenizer.apply_chat_template(plain, add_generation_prompt=True)
        except Exception as e:  # jinja2's TemplateError from the template's raise_exception, or a bad template
            raise ApiError(f"the chat template refused the messages: {e}", param="messages",
                           code="invalid_value") from e
        return self.core.tokenizer.encode(text, add_special_tokens=False), "messages"

    def _check_length(self, text: str, param: str, *, chars: int | None = None) -> None:
        """Refuse, before rendering or tokenizing it, a text that cannot fit the context whatever its tokens: more
        characters (`chars`, default len(text)) than the context length times `TextTokenizer.max_token_chars` (a
        10 MB prompt or role would otherwise hold a thread, and memory, while it is rendered and tokenized)."""
        limit = self.core.context_length * self.core.tokenizer.max_token_chars
        length = len(text) if chars is None else chars
        if length > limit:
            verb = "have" if param == "messages" else "has"
            raise ApiError(f"This model's maximum context length is {self.core.context_length} tokens. However, "
                           f"your {param} {verb} {length} characters, more than that many tokens can hold "
                           f"({limit}). Please shorten it.", param=param, code="context_length_exceeded")

    def admit(self) -> None:
        """Raise ApiError 429 (Retry-After: 1) when this replica's rows and queue are full: max_batch_size
        running plus `max_queue` waiting (None: no bound). Refusing at once keeps a flood from queueing without
        end: the requests taken finish at the engine's pace, the others may retry."""
        if self.max_queue is None:
            return
        admitted = self.engine.in_flight + self._gathering
        if admitted >= self.core.max_batch_size + self.max_queue:
            raise ApiError(f"this server is at capacity ({self.core.max_batch_size} requests running and "
                           f"{admitted - self.core.max_batch_size} queued, its --max-queue); retry after a second",
                           status=429, type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})

    async def submit(self, request: GenerationRequest):
        """The output queue of `request` (through the gatherer when there is one and the engine is idle);
        ApiError 429 when full (`admit`)."""
        self.admit()
        try:
            if self._submit is not None and not self.core.has_work():
                self._gathering += 1
                try:
                    return await self._submit(request)
                finally:
                    self._gathering -= 1
            return self.engine.submit_many([request])[0]
        except RoadError as e:
            raise ApiError(str(e)) from e

    async def complete(self, body: Any, *, chat: bool) -> dict[str, Any] | AsyncIterator[str]:
        """The response object, or for `stream: true` an async iterator of server-sent event lines. The body is
        checked, rendered and tokenized on a worker thread (`parse`), so that no request holds the event loop."""
        self.admit()  # a full replica refuses before the work of parsing
        request, stream, include_usage = await asyncio.to_thread(self.parse, body, chat=chat)
        queue = await self.submit(request)
        outputs = self.engine.generate(request, queue)
        if stream:
            return self._events(request, outputs, chat=chat, include_usage=include_usage)
        text, last = [], None
        async for output in outputs:
            text.append(output.text)
            last = output
        return self._response(request, "".join(text), last, chat=chat)

    def _check_output(self, output: Output) -> None:
        if output.finish_reason == "error":
            raise ApiError(f"generation failed: {output.error}", status=500, type="server_error")

    def _response(self, request: GenerationRequest, text: str, last: Output, *, chat: bool) -> dict[str, Any]:
        self._check_output(last)
        choice: dict[str, Any] = {"index": 0, "finish_reason": last.finish_reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": request.request_id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": request.model, "choices": [choice],
                "usage": _usage(last)}

    async def _events(self, request: GenerationRequest, outputs: AsyncIterator[Output], *, chat: bool,
                      include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        base = {"id": request.request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": request.model}

        def event(choice: dict[str, Any] | None, usage: dict | None = None) -> str:
            chunk = {**base, "choices": [] if choice is None else [choice]}
            if include_usage:
                chunk["usage"] = usage
            return f"data: {json.dumps(chunk)}\n\n"

        try:
            if chat:
                yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
            last = None
            async for output in outputs:
                last = output
                if output.finish_reason == "error":
                    error = ApiError(f"generation failed: {output.error}", status=500, type="server_error")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    break
                if not output.text and not output.finished:
                    continue
                if chat:
                    delta = {"content": output.text} if output.text or not output.finished else {}
                    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": output.finish_reason}
                else:
                    choice = {"index": 0, "text": output.text, "logprobs": None,
                              "finish_reason": output.finish_reason}
                yield event(choice)
            if include_usage and last is not None:
                yield event(None, _usage(last))
            yield "data: [DONE]\n\n"
        finally:
            await outputs.aclose()  # a client that went away cancels its request


def _rendered_chars(value: Any) -> int:
    """Characters a chat template may render from `value` (messages): every string, keys included, and one per
    list item, dict entry and other scalar, so that no field (role, name, content parts, tool calls...) escapes
    the length check."""
    total, stack = 0, [value]
    while stack:  # a loop, not recursion: JSON may nest as deep as the decoder allows
        item = stack.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            total += len(item)
            for key, entry in item.items():
                stack += (key, entry)
        elif isinstance(item, list):
            total += len(item)
            stack += item
        else:
            total += 1
    return total


def _usage(output: Output) -> dict[str, int]:
    return {"prompt_tokens": output.prompt_tokens, "completion_tokens": output.completion_tokens,
            "total_tokens": output.prompt_tokens + output.completion_tokens}
