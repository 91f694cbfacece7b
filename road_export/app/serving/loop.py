"""`AsyncEngine`: the engine's step loop on its own thread, each request's outputs delivered to asyncio.

onnxruntime releases the GIL while it runs, so the event loop (HTTP parsing, streaming) keeps serving while a
step runs. The loop thread sleeps while there is no work and wakes on `submit`. A consumer that stops reading
(a client that disconnected, a cancelled task) cancels its request, which frees its row at the next step.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence

from road_export.app.serving.engine import Engine, GenerationRequest, Output

__all__ = ["AsyncEngine"]


class AsyncEngine:
    """Drive `engine` from a daemon thread; `generate(request)` yields the request's `Output`s as they come."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="road-export-engine", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet finished (running or waiting for a row); read it on the event loop."""
        return len(self._queues)

    def submit_many(self, requests: Sequence[GenerationRequest]) -> list[asyncio.Queue]:
        """Queue requests (already `engine.check`ed) on the engine; returns one asyncio queue of Outputs each.

        Must be called from a running event loop; requests submitted together are admitted at the same step when
        rows are free (one prefill)."""
        loop = asyncio.get_running_loop()
        queues = []
        for request in requests:
            queue: asyncio.Queue = asyncio.Queue()
            self.engine.check(request)
            if not request.request_id:
                request.request_id = f"req-{id(queue):x}"
            self._queues[request.request_id] = (loop, queue)
            queues.append(queue)
        for request in requests:
            self.engine.submit(request)
        self._wake.set()
        return queues

    async def generate(self, request: GenerationRequest, queue: asyncio.Queue | None = None
                       ) -> AsyncIterator[Output]:
        """The outputs of `request` until its last one (finish_reason set). Closing the iterator early (or
        cancelling the task reading it) cancels the request in the engine."""
        if queue is None:
            queue = self.submit_many([request])[0]
        finished = False
        try:
            while True:
                output: Output = await queue.get()
                finished = output.finished
                yield output
                if finished:
                    return
        finally:
            if not finished:
                self.engine.cancel(request.request_id)
                self._wake.set()
            self._queues.pop(request.request_id, None)

    def close(self) -> None:
        """Stop the loop thread (after its current step)."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._closed:
            if not self.engine.has_work():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug of ours: fail the running requests rather than hang them
                outputs = [Output(rid, [], "", "error", error=f"{type(e).__name__}: {e}") for rid in self._queues]
                self._abandon_all()
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Output]]] = {}
            for output in outputs:
                target = self._queues.get(output.request_id)
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], output))
            for loop, items in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_deliver, items)
                except RuntimeError:  # that event loop is closed: nobody is listening
                    pass

    def _abandon_all(self) -> None:
        for rid in list(self._queues):
            self.engine.cancel(rid)


def _deliver(items: list[tuple[asyncio.Queue, Output]]) -> None:
    for queue, output in items:
        queue.put_nowait(output)
