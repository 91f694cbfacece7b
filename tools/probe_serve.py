"""road-export serve as an operator and an attacker see it (issue 27), over loopback: the figures of the closing note.

Starts `python -m road_export.app.cli serve MODEL` from the source tree --repo (this checkout by default; give an older
checkout to measure the code before), with --max-batch-size 8 --threads 1 (and, where that code has them, the
options given with --new-options), then measures:

1. the line the server printed;
2. a small completion's latency alone and while a 10 MB `role` is uploaded beside it (median of --rounds), and what
   the 10 MB request got;
3. a flood: --flood short requests (4 tokens) sent at once: the time until all are answered, how many got 200, how
   many 429 (with Retry-After) and how many anything else;
4. 64 stalled uploads (headers and part of a body): whether a small request still completes, and in how long
   (up to 20 s);
5. the addresses every process of the server listens on (psutil), loopback or not;
6. a replica crash (SIGKILL to the ServeReplica process, once a stream has begun) with a streaming and a
   non-streaming request in flight (120 tokens each): what each client got, and the seconds until a completion
   succeeds again;
7. a second server started beside it (same machine, no RAY_ADDRESS): whether the first still answers its own
   models while the second runs and after it stopped.

    python tools/probe_serve.py MODEL_DIR [--repo DIR] [--new-options "--max-queue 16"] [--flood 200] [--rounds 3]
                                          [--steps 1234567]

MODEL_DIR: a model directory (road_export.app.serving.example.build_example writes one). Each step prints one line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`road-export serve` from `repo` in a subprocess; `url` once it printed its serving line."""

    def __init__(self, repo: str, model: str, options: list[str]):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ROAD_EXPORT_API_KEY")}
        env["PYTHONPATH"] = repo
        self.proc = subprocess.Popen([sys.executable, "-m", "road_export.app.cli", "serve", model, "--port",
                                      str(self.port), "--max-batch-size", "8", "--threads", "1", *options],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=repo)
        self.lines: list[str] = []
        deadline = time.monotonic() + 240
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("serving "):
                break
            if time.monotonic() > deadline:
                break
        if self.proc.poll() is not None or not self.lines or not self.lines[-1].startswith("serving "):
            raise RuntimeError("the server did not start:\n" + "".join(self.lines[-30:]))
        threading.Thread(target=lambda: [self.lines.append(x) for x in self.proc.stdout], daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode


def listeners(pid: int) -> dict[str, str]:
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


def is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address.rsplit(":", 1)[0].strip("[]"))
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


SMALL = {"model": "alpha", "prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0}


async def small_latency(client) -> float:
    start = time.perf_counter()
    response = await client.post("/v1/completions", json=SMALL)
    assert response.status_code == 200, response.text
    return time.perf_counter() - start


async def beside_huge(url: str, rounds: int) -> tuple[float, float, str]:
    import httpx

    huge = {"model": "alpha", "messages": [{"role": "r" * 10_000_000, "content": "hi"}], "max_tokens": 4}
    alone, beside, got = [], [], ""
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        for _ in range(rounds):
            alone.append(await small_latency(c))
            big = asyncio.ensure_future(c.post("/v1/chat/completions", json=huge))
            await asyncio.sleep(0.3)
            beside.append(await small_latency(c))
            response = await big
            got = f"{response.status_code} {response.text[:80]!r}"
    return statistics.median(alone), statistics.median(beside), got


async def flood(url: str, count: int) -> tuple[float, dict[str, int], bool]:
    import httpx

    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=count + 10)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as c:
        start = time.perf_counter()

        async def one(i):
            try:
                return await c.post("/v1/completions", json={**SMALL, "prompt": f"request {i}"})
            except httpx.HTTPError as e:
                return e

        responses = await asyncio.gather(*(one(i) for i in range(count)))
        seconds = time.perf_counter() - start
    counts: dict[str, int] = {}
    retry_after = True
    for r in responses:
        key = type(r).__name__ if isinstance(r, Exception) else str(r.status_code)
        counts[key] = counts.get(key, 0) + 1
        if not isinstance(r, Exception) and r.status_code == 429 and "retry-after" not in r.headers:
            retry_after = False
    return seconds, counts, retry_after


def stalled(url: str, port: int) -> str:
    import httpx

    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"model\": ")
    socks = []
    try:
        for _ in range(64):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(head)
            socks.append(s)
        time.sleep(1)
        start = time.perf_counter()
        try:
            response = httpx.post(f"{url}/v1/completions", json=SMALL, timeout=20)
            return f"small request {response.status_code} after {time.perf_counter() - start:.2f} s"
        except httpx.TimeoutException:
            return "small request still waiting after 20 s"
    finally:
        for s in socks:
            s.close()


def models(url: str) -> str:
    import httpx

    try:
        response = httpx.get(f"{url}/v1/models", timeout=20)
    except httpx.HTTPError as e:
        return type(e).__name__
    if response.status_code != 200:
        return str(response.status_code)
    return ",".join(m["id"] for m in response.json()["data"])


def crash(server: Server) -> str:
    import httpx
    import psutil

    replicas = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
                if "ServeReplica" in p.name() or any("ServeReplica" in a for a in p.cmdline()[:1])]
    if not replicas:
        return "no replica process found"
    long = {"model": "beta", "prompt": "x", "max_tokens": 120, "ignore_eos": True, "temperature": 0}
    results, streaming = {}, threading.Event()

    def plain():
        try:
            r = httpx.post(f"{server.url}/v1/completions", json=long, timeout=60)
            results["plain"] = f"{r.status_code} {r.headers.get('content-type')} {r.text[:60]!r}"
        except httpx.HTTPError as e:
            results["plain"] = type(e).__name__

    def stream():
        lines = []
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json={**long, "stream": True},
                              timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        streaming.set()
            results["stream"] = f"{r.status_code}, {len(lines)} events, last {lines[-1][:80] if lines else ''!r}"
        except httpx.HTTPError as e:
            last = lines[-1][:60] if lines else ""
            results["stream"] = f"{type(e).__name__} after {len(lines)} events, last {last!r}"

    threads = [threading.Thread(target=plain), threading.Thread(target=stream)]
    for t in threads:
        t.start()
    streaming.wait(30)  # both in flight: the stream has begun
    killed = time.perf_counter()
    for p in replicas:
        p.send_signal(signal.SIGKILL)
    for t in threads:
        t.join(90)
    recovered = None
    while time.perf_counter() - killed < 120:
        try:
            if httpx.post(f"{server.url}/v1/completions", json=SMALL, timeout=10).status_code == 200:
                recovered = time.perf_counter() - killed
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    back = f"{recovered:.1f} s" if recovered is not None else "not within 120 s"
    return f"non-streaming: {results.get('plain')}; streaming: {results.get('stream')}; serving again after {back}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--new-options", default="", help="options only the code at --repo has")
    parser.add_argument("--flood", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", default="1234567", help="which of the numbered measurements to run")
    args = parser.parse_args()
    options = shlex.split(args.new_options)
    print(f"code: {args.repo}; options: --max-batch-size 8 --threads 1 {args.new_options}")
    server = Server(args.repo, args.model, options)
    try:
        print("1. serving line:", server.lines[-1].strip())
        if "2" in args.steps:
            alone, beside, got = asyncio.run(beside_huge(server.url, args.rounds))
            print(f"2. small request alone {alone * 1000:.0f} ms, beside a 10 MB role {beside * 1000:.0f} ms "
                  f"(median of {args.rounds}); the 10 MB request got {got}")
        if "3" in args.steps:
            seconds, counts, retry_after = asyncio.run(flood(server.url, args.flood))
            print(f"3. flood of {args.flood}: all answered in {seconds:.1f} s; {counts}"
                  f"{'' if retry_after else ' (a 429 without Retry-After)'}")
        if "4" in args.steps:
            print(f"4. 64 stalled uploads: {stalled(server.url, server.port)}")
        if "5" in args.steps:
            found = listeners(server.proc.pid)
            wide = sorted(f"{a} ({n})" for a, n in found.items() if not is_loopback(a))
            print(f"5. listeners: {len(found)}, {len(found) - len(wide)} on loopback; others: {wide}")
        if "6" in args.steps:
            print(f"6. replica crash: {crash(server)}")
        if "7" in args.steps:
            before = models(server.url)
            second = Server(args.repo, args.model, ["--served-model-name", "second"])
            during = models(server.url)
            code = second.stop()
            time.sleep(2)
            after = models(server.url)
            print(f"7. second server: first's /v1/models before [{before}], while the second runs [{during}], "
                  f"after it stopped (exit {code}) [{after}]")
    finally:
        print("server exit code", server.stop())


if __name__ == "__main__":
    main()
