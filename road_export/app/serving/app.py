"""The Ray Serve application: one `RoadServer` deployment (N replicas) serving a model directory over OpenAI's API.

Each replica owns an `Engine` (one onnxruntime session, continuous batching across adapters; on the CPU, or with
`device="cuda"` on one GPU that Ray assigns it, through onnxruntime's CUDA execution provider) driven by an
`AsyncEngine` thread, and serves `http.create_app`'s FastAPI routes through `serve.ingress` (late bound:
`__serve_build_asgi_app__` builds the app after the constructor, so the routes reach this replica's engine).
A request that finds the engine idle starts at once, or after --batch-wait-ms (default 0) in which `@serve.batch`
(`max_batch_size`, `batch_wait_timeout_s`) gathers further arrivals into the same prefill; while the engine runs,
requests go to it at once and join at its next step boundary. The engine decodes every running row in one run per
step.
Ray Serve routes requests across replicas and across the machines of a Ray cluster.

Metrics go through `ray.serve.metrics` (Counter, Histogram, Gauge; Ray exports them to Prometheus with the
deployment, replica and application tags): road_serve_requests (by model and finish_reason), road_serve_prompt_tokens
and road_serve_completion_tokens (by model), road_serve_batch_size and road_serve_adapters_per_batch (per onnxruntime
run), road_serve_step_seconds, road_serve_running (rows in the batch) and road_serve_queued (requests admitted and
waiting for a row), per replica: Prometheus sums them across replicas.

Admission: each replica takes up to max_batch_size running rows plus `max_queue` waiting requests; one more gets
429 with Retry-After (`OpenAIService`). Ray's own limit on a replica's concurrent requests
(`max_ongoing_requests`) is set well above that, by UPLOAD_ROOM: at that limit Ray's router holds requests back
and retries with a growing back-off (600 simultaneous requests took 27-83 s, none refused), whereas the replica
refuses at once; and clients still sending their bodies (each bounded by the body timeout) hold no row and no
queue place until their body is read and checked.

Ray is imported here and in `road_export.app.serving.cli` only (the `serve` extra: `pip install 'road-export[serve]'`).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import metrics

from road_export.app.serving.engine import Engine, GenerationRequest, Stats
from road_export.app.serving.http import create_app
from road_export.app.serving.loop import AsyncEngine
from road_export.app.serving.protocol import OpenAIService

__all__ = ["RayMetrics", "RoadServer", "build_app", "providers_for"]

DEVICES = ("cpu", "cuda")
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128]
UPLOAD_ROOM = 4096  # requests per replica beyond its rows and queue that Ray lets in (read, checked, refused)


class RayMetrics:
    """The engine's `Recorder` on Ray Serve's metrics (see the module docstring for the names)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.requests = metrics.Counter("road_serve_requests", description="Finished completion requests.",
                                        tag_keys=("model", "finish_reason"))
        self.prompt_tokens = metrics.Counter("road_serve_prompt_tokens", description="Prompt tokens prefilled.",
                                             tag_keys=("model",))
        self.completion_tokens = metrics.Counter("road_serve_completion_tokens",
                                                 description="Tokens generated.", tag_keys=("model",))
        self.batch_size = metrics.Histogram("road_serve_batch_size", description="Rows per onnxruntime run.",
                                            boundaries=BATCH_SIZES)
        self.adapters = metrics.Histogram("road_serve_adapters_per_batch",
                                          description="Distinct adapters (the base counts as one) per run.",
                                          boundaries=BATCH_SIZES)
        self.step_seconds = metrics.Histogram("road_serve_step_seconds", description="Seconds per onnxruntime run.",
                                              boundaries=[0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1])
        self.running = metrics.Gauge("road_serve_running", description="Rows in the running batch.")
        self.queued = metrics.Gauge("road_serve_queued", description="Requests admitted, waiting for a row.")

    def on_step(self, batch_size: int, adapters: int, seconds: float) -> None:
        self.batch_size.observe(batch_size)
        self.adapters.observe(adapters)
        self.step_seconds.observe(seconds)
        self.running.set(self.engine.running)
        self.queued.set(self.engine.waiting)

    def on_finish(self, model: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests.inc(tags={"model": model, "finish_reason": finish_reason})
        self.prompt_tokens.inc(prompt_tokens, tags={"model": model})
        if completion_tokens:
            self.completion_tokens.inc(completion_tokens, tags={"model": model})


@serve.ingress()
class RoadServer:
    """One replica: an Engine over `model_dir` behind OpenAI's routes (see the module docstring)."""

    def __init__(self, model_dir: str, max_batch_size: int = 16, batch_wait_ms: float = 0.0,
                 threads: int | None = None, served_model_name: str | None = None, native: bool | None = None,
                 session_config: dict[str, str] | None = None, device: str = "cpu", max_queue: int | None = None,
                 api_key: str | None = None, body_timeout_s: float = 30.0, max_body_bytes: int = 16 * 2**20,
                 cuda_graph: bool | None = None):
        replica_grpc_on_loopback()
        self.stats = Stats()
        self.engine = Engine(model_dir, max_batch_size=max_batch_size, threads=threads, native=native,
                             served_model_name=served_model_name, recorders=[self.stats],
                             session_config=session_config, providers=providers_for(device),
                             cuda_graph=cuda_graph if device == "cuda" else None)
        self.engine.recorders.append(RayMetrics(self.engine))
        self.loop = AsyncEngine(self.engine)
        self.admit.set_max_batch_size(max_batch_size)
        self.admit.set_batch_wait_timeout_s(batch_wait_ms / 1000)
        self.service = OpenAIService(self.loop, submit=self.admit, max_queue=max_queue)
        self.http = {"api_key": api_key, "body_timeout_s": body_timeout_s, "max_body_bytes": max_body_bytes}

    def __serve_build_asgi_app__(self):
        return create_app(self.service, self.stats, **self.http)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def admit(self, requests: list[GenerationRequest]) -> list[Any]:
        """Requests that arrived within the batch wait while the engine was idle, queued on it together (one
        prefill)."""
        return self.loop.submit_many(requests)


def replica_grpc_on_loopback() -> bool:
    """On a node whose address is loopback (the local instance `road-export serve` starts), make this replica's
    inter-deployment gRPC server listen on 127.0.0.1 rather than on every interface; returns whether it did.

    Ray Serve 2.60 binds that server to "[::]:0" whatever the node's address (ray/serve/_private/replica.py,
    `_on_initialized`, which runs after the deployment's constructor), with no option to choose; its callers reach
    it at the node's address, here loopback. There is no public API for it, so the module's
    `add_port_to_grpc_server` is wrapped to swap that one address; where a Ray lacks it nothing changes, and the
    listener test (tests/test_serve.py) sees a wildcard listener again."""
    import ipaddress

    import ray

    try:
        from ray.serve._private import replica
    except ImportError:
        return False
    add = getattr(replica, "add_port_to_grpc_server", None)
    if add is None or not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
        return False
    if getattr(add, "road_loopback", False):
        return True

    def on_loopback(server, address):
        return add(server, "127.0.0.1:0" if address == "[::]:0" else address)

    on_loopback.road_loopback = True
    replica.add_port_to_grpc_server = on_loopback
    return True


def _check_device(device: str) -> None:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")


def providers_for(device: str) -> list | None:
    """onnxruntime's providers for a replica on `device`: "cpu" (None: the CPU provider) or "cuda" (the CUDA
    provider on device 0 of those Ray made visible to the replica, then the CPU;
    `road_export.runtime.gpu.cuda_providers` with TF32 off, as torch's default: float32 products at full precision, so a
    float32 model's text is the CPU's). Raises ValueError for another device."""
    _check_device(device)
    if device == "cpu":
        return None
    from road_export.runtime.gpu import cuda_providers

    return cuda_providers(tf32=False)


def build_app(model_dir: str, *, replicas: int = 1, max_batch_size: int = 16, batch_wait_ms: float = 0.0,
              threads: int | None = None, num_cpus: float | None = None, served_model_name: str | None = None,
              native: bool | None = None, session_config: dict[str, str] | None = None, device: str = "cpu",
              max_queue: int | None = None, api_key: str | None = None, body_timeout_s: float = 30.0,
              max_body_bytes: int = 16 * 2**20, cuda_graph: bool | None = None):
    """The bound application for `serve.run`: `replicas` copies of RoadServer, each taking `num_cpus` CPUs from
    Ray's scheduler (default: `threads`, else 1), with `device="cuda"` one GPU too (Ray sets the replica's
    CUDA_VISIBLE_DEVICES to it). Each admits max_batch_size running rows and `max_queue` (default 2 x
    max_batch_size) waiting requests, and answers 429 beyond; Ray lets UPLOAD_ROOM more requests in, whose bodies
    are read (within `body_timeout_s`, up to `max_body_bytes`) before admission. `api_key`: see `create_app`.
    `session_config`: onnxruntime session config entries for each replica's session. `cuda_graph` (device "cuda"):
    the engine's `cuda_graph` (None: on for a model builder directory). Raises ValueError for a device other than
    "cpu" and "cuda"."""
    _check_device(device)  # before anything is deployed, not in a replica's crash loop
    options: dict[str, Any] = {"num_cpus": num_cpus if num_cpus is not None else (threads or 1)}
    if device == "cuda":
        options["num_gpus"] = 1
    max_queue = 2 * max_batch_size if max_queue is None else max_queue
    deployment = serve.deployment(RoadServer, name="RoadServer").options(
        num_replicas=replicas, max_ongoing_requests=max_batch_size + max_queue + UPLOAD_ROOM,
        ray_actor_options=options)
    return deployment.bind(str(model_dir), max_batch_size, batch_wait_ms, threads, served_model_name, native,
                           session_config, device, max_queue, api_key, body_timeout_s, max_body_bytes, cuda_graph)
