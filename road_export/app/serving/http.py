"""The HTTP face of `OpenAIService`: a FastAPI app (the Ray deployment serves it through `serve.ingress`; tests and
a plain ASGI server can serve it directly).

Routes: GET /v1/models, GET /v1/models/{model} (OpenAI's retrieve), POST /v1/completions, POST
/v1/chat/completions (OpenAI's API), GET or HEAD /health, and GET /stats (the engine's in-memory counters as JSON,
with the rows running and the requests queued now). A client that disconnects while its completion is generated
cancels it: streaming responses stop when Starlette sees the disconnect, and a non-streaming request watches the
connection (`http.disconnect`) while it waits.

Bounded work per request, before the engine sees it: headers over MAX_HEADER_BYTES get 431, a body over
`max_body_bytes` 413 (from Content-Length when given, else as it arrives), a body not received within
`body_timeout_s` 408; the body is decoded and checked, and the prompt rendered and tokenized, off the event loop
(`OpenAIService.complete`). With an `api_key`, every route but /health wants `Authorization: Bearer KEY` (compared
in constant time) and answers OpenAI's 401 otherwise. FastAPI's /docs, /redoc and /openapi.json are off.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) as objects
import asyncio
import hmac
import json
from typing import Any

from road_export.app.serving.protocol import ApiError, OpenAIService

__all__ = ["MAX_HEADER_BYTES", "ProxyErrors", "create_app", "proxy_middlewares"]

MAX_HEADER_BYTES = 64 * 1024  # names and values of all headers together (HAProxy's default buffer holds 16 KiB)
OPEN_PATHS = ("/health",)  # answered without the API key (liveness probes)


def create_app(service: OpenAIService, stats: Any = None, *, api_key: str | None = None,
               body_timeout_s: float = 30.0, max_body_bytes: int = 16 * 2**20):
    """A FastAPI application serving `service`; `stats` (an object with `snapshot()`) backs GET /stats.
    `api_key`: the key every route but /health wants as `Authorization: Bearer KEY` (None: no key);
    `body_timeout_s`, `max_body_bytes`: see the module docstring."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="road-export", description="OpenAI-compatible completions over RoAd adapters",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, api_key=api_key)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):  # unknown route, wrong method
        body = ApiError(f"{request.method} {request.url.path}: {error.detail}", status=error.status_code).body()
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):  # a bug of ours: OpenAI's shape, not plain text
        body = ApiError(f"internal error: {type(error).__name__}: {error}", status=500, type="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def statistics():
        return {**(stats.snapshot() if stats is not None else {}), **service.load()}

    @app.get("/v1/models")
    async def models():
        return service.models()

    @app.get("/v1/models/{name:path}")
    async def model(name: str):  # OpenAI's retrieve; `path`: adapter names may hold "/"
        return service.model(name)

    async def complete(request: Request, chat: bool):
        raw = await _read_body(request, max_body_bytes, body_timeout_s)
        body = await asyncio.to_thread(_decode, raw)  # a large body decodes off the event loop
        work = asyncio.ensure_future(service.complete(body, chat=chat))
        result = await _unless_disconnected(request, work)
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than the decoder goes
        raise ApiError(f"the request body is not JSON that can be read ({type(e).__name__}: {e})") from None


async def _read_body(request, limit: int, timeout: float) -> bytes:
    """The request's body: 413 past `limit` bytes (by Content-Length before reading, else while reading), 408
    when it has not all come within `timeout` seconds (a client that stalls mid-upload holds nothing longer)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_large(int(length), limit)

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(size, limit)
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise ApiError(f"the request body did not arrive within {timeout:g} s; send it at once", status=408,
                       code="request_timeout") from None


def _too_large(size: int, limit: int) -> ApiError:
    return ApiError(f"the request body has {size} bytes or more, over this server's limit of {limit} (its "
                    "--max-body-mb); send a smaller request", status=413, code="request_too_large")


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


class _Guard:
    """ASGI middleware in front of every route: 431 for headers over MAX_HEADER_BYTES, and with an API key,
    OpenAI's 401 for a request without `Authorization: Bearer KEY` (vLLM's --api-key; compared in constant time
    with hmac.compare_digest)."""

    def __init__(self, app, api_key: str | None = None):
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        size = sum(len(k) + len(v) for k, v in headers)
        if size > MAX_HEADER_BYTES:
            error = ApiError(f"the request headers have {size} bytes, over this server's limit of "
                             f"{MAX_HEADER_BYTES}; send smaller headers", status=431, code="headers_too_large")
            return await _send_json(send, 431, error.body())
        if self.key is not None and scope.get("path") not in OPEN_PATHS:
            given = b""
            for name, value in headers:
                if name.lower() == b"authorization":
                    scheme, _, token = value.partition(b" ")
                    given = token.strip() if scheme.lower() == b"bearer" else b""
            if not hmac.compare_digest(given, self.key):
                error = ApiError("Incorrect API key provided; send it as `Authorization: Bearer KEY`", status=401,
                                 code="invalid_api_key")
                return await _send_json(send, 401, error.body(), [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class ProxyErrors:
    """ASGI middleware for Ray Serve's HTTP proxy (`HTTPOptions.middlewares`): when the replica serving a request
    dies (killed, out of memory, a crash in onnxruntime), the proxy gets an actor error and answers nothing itself
    (ray/serve/_private/http_util.py, `send_http_response_on_exception`, only answers 408, 429 and 503), so the
    client saw uvicorn's plain-text 500, or a stream cut without an end. Here a response that was never started
    becomes OpenAI's 503 (`server_error`, code `replica_failed`), and a started event stream ends with an error
    event and `data: [DONE]`. A response the inner app completed passes untouched."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "ended": False, "events": False}

        async def tracking(message):
            if message["type"] == "http.response.start":
                state["started"] = True
                state["events"] = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                      for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["ended"] = True
            await send(message)

        failure = None
        try:
            await self.app(scope, receive, tracking)
        except Exception as e:  # the proxy raising on a dead replica: answered below in OpenAI's shape
            failure = e
        if state["ended"]:
            return
        error = ApiError("the server's replica for this request stopped before it finished (it crashed or was "
                         f"killed{f': {type(failure).__name__}' if failure else ''}); Ray restarts it, retry",
                         status=503, type="server_error", code="replica_failed")
        try:
            if not state["started"]:
                await _send_json(send, 503, error.body())
            elif state["events"]:
                event = f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n".encode()
                await send({"type": "http.response.body", "body": event, "more_body": False})
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception:  # the client is gone too: nobody to tell
            pass


def proxy_middlewares() -> list:
    """The Starlette middlewares for Ray Serve's HTTP proxy: [ProxyErrors]. Ray calls it in the proxy actor when
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH names it (`road_export.app.serving.cli.local_ray_environment` does)."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyErrors)]


async def _unless_disconnected(request, work: asyncio.Future):
    """`work`'s result, cancelling it (and so the request in the engine) if the client disconnects first."""

    async def disconnected():
        while True:
            message = await request.receive()
            if message.get("type") == "http.disconnect":
                return

    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server cancelled the handler (Ray Serve does on disconnect)
        work.cancel()
        watch.cancel()
        raise
    if work in done:
        watch.cancel()
        return work.result()
    work.cancel()
    raise asyncio.CancelledError("the client disconnected")
