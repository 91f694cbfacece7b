"""The HTTP face of `OpenAIService`: a FastAPI app (the Ray deployment serves it through `serve.ingress`; tests and
a plain ASGI server can serve it directly).

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (OpenAI's API), GET /health, and
GET /stats (the engine's in-memory counters as JSON). A client that disconnects while its completion is generated
cancels it: streaming responses stop when Starlette sees the disconnect, and a non-streaming request watches the
connection (`http.disconnect`) while it waits.
"""

# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) as objects
import asyncio
import json
from typing import Any

from road_export.serving.protocol import ApiError, OpenAIService

__all__ = ["create_app"]


def create_app(service: OpenAIService, stats: Any = None):
    """A FastAPI application serving `service`; `stats` (an object with `snapshot()`) backs GET /stats."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="road-export", description="OpenAI-compatible completions over RoAd adapters")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):  # unknown route, wrong method
        body = ApiError(f"{request.method} {request.url.path}: {error.detail}", status=error.status_code).body()
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):  # a bug of ours: OpenAI's shape, not plain text
        body = ApiError(f"internal error: {type(error).__name__}: {error}", status=500, type="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/stats")
    async def statistics():
        return stats.snapshot() if stats is not None else {}

    @app.get("/v1/models")
    async def models():
        return service.models()

    async def complete(request: Request, chat: bool):
        try:
            body = json.loads(await request.body())
        except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than the decoder goes
            raise ApiError(f"the request body is not JSON that can be read ({type(e).__name__}: {e})") from None
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
