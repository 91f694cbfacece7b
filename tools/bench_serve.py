"""road-export serve under load, over HTTP on loopback: requests for different adapters batched together.

1. Five concurrent requests, one per model (the base and four adapters), against one request alone: the wall time of
   the five together over the median time of a single request (interleaved: alone, together, alone, ...).
   Goal: <= 1.6 x (RoAd's batching: five adapters cost about one). Then the same on an in-process Engine (no HTTP,
   no Ray) with where its time goes: the prefill run (one prompt, or five left-padded together), the decode runs
   (how many, at how many rows, ms each), the engine's Python around them; and one onnxruntime decode step alone.
2. 64 requests over four adapters: all sent at once (the server batches them, up to --max-batch-size rows per step)
   against the same 64 sent one at a time; throughput ratio, and p50/p95 latency of the concurrent ones.
   Goal: >= 3 x on 2 cores.

Every request generates exactly --tokens tokens (temperature 0, vLLM's ignore_eos), so both sides do the same work.
The server is one Ray Serve replica (onnxruntime with --threads intra-op threads) on a local Ray instance, bound to
127.0.0.1, behind the --ingress given (`road_export.app.serving.cli.start_ray`: Ray Serve's proxy, or its HAProxy
ingress); the client (httpx) runs in this process. The model: Llama-shaped (hidden --hidden, --layers layers) with a
tokenizer trained offline and four RoAd adapters (road_serving.example.build_example), exported in rotate mode.
The default size is not the flattering one: measured on the 2-core machine, a 5-row decode step costs about 1.4-1.6 x
a 1-row step at hidden 512, 1.55-1.6 x at hidden 1024 and 1.6-1.65 x at hidden 2048 (onnxruntime's fp32 MatMul
alone, 2048 x 5504 weights: 5 rows take 1.7 x as long as 1), so a wider model does not bring the ratio down. (Those
figures predate the attention pass, road_export/passes/attention.py; with it a 5-row step at hidden 512 costs
1.3-1.6 x a 1-row step on the same machine, depending on its load: tools/bench_attention.py.)

    python tools/bench_serve.py [--hidden 512] [--layers 4] [--tokens 32] [--rounds 3] [--requests 64] [--spin]
                                [--threads 2] [--batch-wait-ms 0] [--model-dir DIR] [--device cpu|cuda]
                                [--ingress proxy|haproxy]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = ["The quick brown fox jumps over", "Many tenants share one base model and", "Où est la gare? Zwölf",
           "Continuous batching lets a request join", "Ray Serve runs replicas across machines while"]
ADAPTERS = {
    "alpha": dict(variant="road_1", group_size=64, target_modules=["q_proj", "v_proj"]),
    "beta": dict(variant="road_4", group_size=64, target_modules=["q_proj", "o_proj", "down_proj"]),
    "gamma": dict(variant="road_2", group_size=64, target_modules="all-linear"),
    "delta": dict(variant="road_1", group_size=64, target_modules="all-linear"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one(client, model: str, prompt: str, tokens: int) -> float:
    started = time.perf_counter()
    response = await client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": tokens,
                                                           "temperature": 0, "ignore_eos": True})
    response.raise_for_status()
    assert response.json()["usage"]["completion_tokens"] == tokens, response.text
    return time.perf_counter() - started


async def together(client, jobs, tokens) -> tuple[float, list[float]]:
    started = time.perf_counter()
    latencies = await asyncio.gather(*(one(client, m, p, tokens) for m, p in jobs))
    return time.perf_counter() - started, list(latencies)


async def one_at_a_time(client, jobs, tokens) -> float:
    started = time.perf_counter()
    for model, prompt in jobs:
        await one(client, model, prompt, tokens)
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Runs:
    """An engine recorder: (rows, seconds) of every onnxruntime run since the last `take`."""

    def __init__(self):
        self.runs: list[tuple[int, float]] = []

    def on_step(self, batch_size: int, adapters: int, seconds: float) -> None:
        self.runs.append((batch_size, seconds))

    def on_finish(self, model: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        pass

    def take(self) -> list[tuple[int, float]]:
        runs, self.runs = self.runs, []
        return runs


def engine_only(model: Path, models: list[str], args) -> None:
    """The same five requests on an in-process Engine (no HTTP, no Ray): what onnxruntime's batch of 5 costs, and
    where the time goes (the prefill run, the decode runs, the engine's Python around them)."""
    from road_export.app.serving.app import providers_for
    from road_export.app.serving.engine import Engine, GenerationRequest, SamplingParams

    config = {"session.intra_op.allow_spinning": "0" if args.no_spin else "1"}
    runs = Runs()
    engine = Engine(model, max_batch_size=args.max_batch_size, threads=args.threads, session_config=config,
                    recorders=[runs], providers=providers_for(args.device))
    params = SamplingParams(args.tokens, 0, ignore_eos=True)
    five = [(m, engine.tokenizer.encode(PROMPTS[i % len(PROMPTS)])) for i, m in enumerate(models[:5])]

    def run(jobs) -> tuple[float, float, list[tuple[int, float]]]:
        """(wall, prefill seconds, decode runs) of `jobs` submitted together (non-streaming, as the HTTP side)."""
        runs.take()
        started = time.perf_counter()
        for m, ids in jobs:
            engine.submit(GenerationRequest(m, ids, params, stream=False))
        while engine.has_work():
            engine.step()
        wall = time.perf_counter() - started
        done = runs.take()
        return wall, done[0][1], done[1:]

    run(five)
    alone, joint = [], []
    for r in range(args.rounds * 3):
        alone.append(run([five[r % len(five)]]))
        joint.append(run(five))
    ratio = statistics.median(j[0] / a[0] for j, a in zip(joint, alone, strict=True))
    print(f"   the same on the engine alone (no HTTP): one {statistics.median(a[0] for a in alone) * 1000:8.1f} ms   "
          f"five {statistics.median(j[0] for j in joint) * 1000:8.1f} ms   ratio = {ratio:.2f} x")

    def parts(results):
        prefill = statistics.median(r[1] for r in results) * 1000
        step = statistics.median(s for r in results for _, s in r[2]) * 1000
        host = statistics.median(r[0] - r[1] - sum(s for _, s in r[2]) for r in results) * 1000
        rows = sorted({n for r in results for n, _ in r[2]})
        return prefill, step, host, len(results[0][2]), rows

    (p1, s1, h1, n1, _), (p5, s5, h5, n5, rows5) = parts(alone), parts(joint)
    print(f"   where it goes: prefill run one {p1:.1f} ms, five {p5:.1f} ms ({p5 / p1:.2f} x); {n5} decode runs of "
          f"{rows5} rows at {s5:.2f} ms against {n1} at {s1:.2f} ms ({s5 / s1:.2f} x); outside onnxruntime one "
          f"{h1:.1f} ms, five {h5:.1f} ms")
    decode_step(engine, args)


def decode_step(engine, args) -> None:
    """One onnxruntime decode step (past 40) for 1 row, 5 rows of 5 adapters, 5 rows of one adapter, interleaved."""
    import numpy as np

    session = engine.session.session
    pasts = [i for i in session.get_inputs() if i.name.startswith("past_key_values")]
    rng = np.random.default_rng(0)

    def feeds(ids):
        rows = len(ids)
        f = {"input_ids": np.ones((rows, 1), np.int64), "attention_mask": np.ones((rows, 41), np.int64),
             "position_ids": np.full((rows, 1), 40, np.int64), "adapter_ids": np.array(ids, np.int64)}
        f.update({i.name: rng.random((rows, i.shape[1], 40, i.shape[3]), np.float32) for i in pasts})
        return f

    cases = {"1 row": feeds([1]), "5 rows, 5 adapters": feeds([0, 1, 2, 3, 4]), "5 rows, 1 adapter": feeds([1] * 5)}
    times = {k: [] for k in cases}
    for _ in range(args.rounds * 50):
        for name, f in cases.items():
            started = time.perf_counter()
            session.run(None, f)
            times[name].append(time.perf_counter() - started)
    one = times["1 row"]
    print("   one decode step on onnxruntime: " + "   ".join(
        f"{k} {statistics.median(v) * 1000:.2f} ms ({statistics.median(a / b for a, b in zip(v, one)):.2f} x)"
        for k, v in times.items()))


async def bench(url: str, models: list[str], args) -> None:
    import httpx

    limits = httpx.Limits(max_connections=args.requests + 8, max_keepalive_connections=args.requests + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await together(client, [(m, PROMPTS[0]) for m in models], args.tokens)  # warm up every adapter
        five = [(m, PROMPTS[i % len(PROMPTS)]) for i, m in enumerate(models[:5])]
        alone, joint = [], []
        before = (await client.get("/stats")).json()["batch_sizes"]
        for r in range(args.rounds * 3):
            model, prompt = five[r % len(five)]
            alone.append(await one(client, model, prompt, args.tokens))
            joint.append((await together(client, five, args.tokens))[0])
        after = (await client.get("/stats")).json()["batch_sizes"]
        ratio = statistics.median(j / a for j, a in zip(joint, alone, strict=True))
        print(f"1. {len(five)} concurrent requests ({', '.join(m for m, _ in five)}), {args.tokens} tokens each:")
        print(f"   one alone {statistics.median(alone) * 1000:8.1f} ms   five together "
              f"{statistics.median(joint) * 1000:8.1f} ms   ratio together/alone = {ratio:.2f} x   (goal <= 1.6 x)")
        runs = {k: after[k] - before.get(k, 0) for k in after if after[k] > before.get(k, 0)}
        print(f"   server: onnxruntime runs by rows {runs} (five that arrive apart start in separate prefills)")

        engine_only(args.model, models, args)

        adapters = models[1:5]
        jobs = [(adapters[i % len(adapters)], PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
        serial, concurrent, latencies = [], [], []
        for _ in range(args.rounds):
            serial.append(await one_at_a_time(client, jobs, args.tokens))
            wall, lat = await together(client, jobs, args.tokens)
            concurrent.append(wall)
            latencies += lat
        ratio = statistics.median(s / c for s, c in zip(serial, concurrent, strict=True))
        total = args.requests * args.tokens
        print(f"2. {args.requests} requests over {len(adapters)} adapters, {args.tokens} tokens each "
              f"({args.rounds} rounds, medians):")
        print(f"   one at a time {statistics.median(serial):7.2f} s = {total / statistics.median(serial):7.1f} tok/s   "
              f"all at once {statistics.median(concurrent):7.2f} s = {total / statistics.median(concurrent):7.1f} "
              f"tok/s   throughput ratio = {ratio:.2f} x   (goal >= 3 x)")
        print(f"   latency of the concurrent requests: p50 {percentile(latencies, 0.5) * 1000:.0f} ms, "
              f"p95 {percentile(latencies, 0.95) * 1000:.0f} ms")
        stats = (await client.get("/stats")).json()
        print(f"   server: {stats['steps']} onnxruntime runs; rows per run {stats['batch_sizes']}; "
              f"adapters per run {stats['adapters_per_batch']}")


def main() -> None:
    from road_export.app.serving.cli import INGRESSES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=0.0, help="the server's --batch-wait-ms")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ingress", choices=INGRESSES, default="proxy", help="the server's --ingress")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="the server's --device (cuda: "
                        "onnxruntime-gpu, one GPU)")
    parser.add_argument("--spin", dest="no_spin", action="store_false", help="let onnxruntime's intra-op threads "
                        "spin-wait between runs (the server's default is not to: session.intra_op.allow_spinning 0)")
    parser.add_argument("--model-dir", help="serve this model directory instead of building one (needs adapters "
                        "alpha..delta)")
    args = parser.parse_args()

    import os

    from road_export.app.serving.cli import local_ray_environment, start_ray

    # before Ray is imported: loopback listeners, token auth (HAProxy's stats and metrics ports bind every interface
    # whatever the host, which the server command refuses on loopback; this benchmark accepts it for its run)
    environment = local_ray_environment(args.ingress, "0.0.0.0" if args.ingress == "haproxy" else "127.0.0.1")
    os.environ.update(environment)
    import ray
    from ray import serve

    from road_export.app.serving.app import build_app
    from road_export.app.serving.example import build_example

    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir:
            model = Path(args.model_dir)
        else:
            model = build_example(tmp, adapters=ADAPTERS, hidden_size=args.hidden, layers=args.layers,
                                  heads=args.hidden // 64, kv_heads=max(1, args.hidden // 256),
                                  intermediate_size=int(args.hidden * 2.6875) // 64 * 64, context=256).model
        port = free_port()
        ours = start_ray(None, args.ingress, environment=environment, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            config = {"session.intra_op.allow_spinning": "0" if args.no_spin else "1"}
            serve.run(build_app(str(model), max_batch_size=args.max_batch_size, threads=args.threads,
                                batch_wait_ms=args.batch_wait_ms, session_config=config, device=args.device,
                                max_queue=args.requests),  # every request of a round admitted: none gets 429
                      name="road-export", route_prefix="/")
            from road_export.app.serving.engine import Engine

            models = Engine(model, threads=1).model_names
            args.model = model
            spin = "" if args.no_spin else " (spinning)"
            print(f"model: hidden {args.hidden}, {args.layers} layers, {len(models) - 1} adapters; one replica on "
                  f"{args.device}, {args.threads} onnxruntime threads{spin}, max batch {args.max_batch_size}, "
                  f"batch wait {args.batch_wait_ms:g} ms; ingress {args.ingress}; client in-process")
            asyncio.run(bench(f"http://127.0.0.1:{port}", models, args))
        finally:
            if not ours:  # a local instance goes with ray.shutdown (serve.shutdown would wait for replicas to drain)
                serve.shutdown()
            ray.shutdown()
            if "RAY_SERVE_HAPROXY_SERVER_STATE_BASE" in environment:  # the private directory made for HAProxy
                import shutil

                shutil.rmtree(environment["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"], ignore_errors=True)


if __name__ == "__main__":
    main()
