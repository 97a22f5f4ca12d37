"""Gateway overhead: the same zero-delay fake backend asked directly and through the gateway.

    flock /tmp/harp-heavy.lock .venv/bin/python benchmarks/bench_gateway.py \
        [--requests 5000] [--concurrency 50] [--compare-src /path/to/old/checkout] [--stream]

One fake backend (``tests/fake_backend.py``, no token delay) and one gateway process
per code tree (this checkout, plus ``--compare-src`` trees, e.g. an older commit unpacked with
``git archive``) run on 127.0.0.1. A keep-alive HTTP/1.1 load generator written on raw asyncio
streams (so the client's own cost stays small) sends ``--requests`` completions at
``--concurrency`` to each target in turn, after a warm-up. Reported per target: requests/s,
p50/p99 latency, the latency added over the direct path, and the CPU seconds per request of
the gateway process and of the backend process (from /proc, user + system).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from harp_vllm.process import ServerProcess, free_port

FAKE_BACKEND = Path(__file__).resolve().parents[1] / "tests" / "fake_backend.py"

REPO = Path(__file__).resolve().parents[1]
# Every gateway runs with a key (a gateway without one needs --allow-no-auth, which older
# trees do not know); the fake backend ignores the header.
KEY = "sk-bench"


def start(cmd: list[str], port: int, probe: str, tree: Path) -> ServerProcess:
    """Start ``cmd`` importing harp_vllm from ``tree`` (its cwd: ``python -m`` puts the cwd
    first on sys.path, ahead of PYTHONPATH and the editable install); ready when ``probe``
    answers."""
    proc = ServerProcess(cmd, f"http://127.0.0.1:{port}", {**os.environ, "PYTHONPATH": str(tree)},
                         health_path=probe, poll=0.2, cwd=tree)
    try:
        return proc.wait_ready(60)
    except Exception:
        proc.stop()
        raise


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one HTTP/1.1 response (Content-Length or chunked); return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length, chunked = None, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def load(port: int, n: int, concurrency: int, body: bytes, path: str
               ) -> tuple[float, list[float], int]:
    """Send ``n`` POSTs over ``concurrency`` keep-alive connections: (wall s, latencies, errors)."""
    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Content-Type: application/json\r\nAuthorization: Bearer {KEY}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n"
               ).encode() + body
    latencies: list[float] = []
    errors = 0
    left = n

    async def worker() -> None:
        nonlocal left, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while left > 0:
                left -= 1
                t0 = time.perf_counter()
                writer.write(request)
                status = await read_response(reader)
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors += 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0, latencies, errors


@dataclass
class Result:
    target: str
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    added_p50_ms: float
    added_p99_ms: float
    gateway_cpu_ms_per_req: float
    backend_cpu_ms_per_req: float


def measure(name: str, port: int, args: argparse.Namespace, body: bytes,
            gateway_pid: int | None, backend_pid: int, direct: Result | None) -> Result:
    asyncio.run(load(port, args.warmup, args.concurrency, body, "/v1/completions"))
    cpu0 = cpu_seconds(gateway_pid) if gateway_pid else 0.0
    bcpu0 = cpu_seconds(backend_pid)
    wall, lat, errors = asyncio.run(load(port, args.requests, args.concurrency, body,
                                         "/v1/completions"))
    cpu = (cpu_seconds(gateway_pid) - cpu0) if gateway_pid else 0.0
    bcpu = cpu_seconds(backend_pid) - bcpu0
    qs = statistics.quantiles(lat, n=100)
    p50, p99 = statistics.median(lat) * 1e3, qs[98] * 1e3
    return Result(name, args.requests, errors, args.requests / wall, p50, p99,
                  p50 - direct.p50_ms if direct else 0.0, p99 - direct.p99_ms if direct else 0.0,
                  cpu / args.requests * 1e3, bcpu / args.requests * 1e3)


def median_result(rs: list[Result]) -> Result:
    """Per-field medians of one target's rounds."""
    out = Result(**asdict(rs[0]))
    out.errors = max(r.errors for r in rs)
    for f in ("rps", "p50_ms", "p99_ms", "added_p50_ms", "added_p99_ms",
              "gateway_cpu_ms_per_req", "backend_cpu_ms_per_req"):
        setattr(out, f, statistics.median(getattr(r, f) for r in rs))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--stream", action="store_true", help="streamed completions (SSE)")
    ap.add_argument("--compare-src", action="append", default=[], metavar="DIR",
                    help="another code tree (holding harp_vllm/) to measure in the same run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    body = json.dumps({"model": "fake", "prompt": "one two three four", "stream": args.stream,
                       "max_tokens": args.max_tokens}).encode()
    procs: list[ServerProcess] = []
    rounds: list[list[Result]] = []
    try:
        bport = free_port()
        backend = start([sys.executable, str(FAKE_BACKEND), "--port",
                         str(bport), "--model", "fake"], bport, "/health", REPO)
        procs.append(backend)
        gateways = []
        trees = [("gateway (this tree)", REPO)] + [
            (f"gateway ({d})", Path(d).resolve()) for d in args.compare_src]
        for name, tree in trees:
            gport = free_port()
            # trees before issue 14 (e.g. b2088f3) have no /live: wait on /health there
            probe = "/live" if '"/live"' in (tree / "harp_vllm/gateway/app.py").read_text() \
                else "/health"
            gw = start([sys.executable, "-m", "harp_vllm.cli", "gateway", "--port", str(gport),
                        "--backend", f"f=http://127.0.0.1:{bport}", "--api-key", KEY,
                        "--log-level", "warning"],
                       gport, probe, tree)
            procs.append(gw)
            gateways.append((name, gport, gw.pid))
        for _ in range(args.rounds):  # interleaved, so drift in machine load hits all alike
            direct = measure("direct", bport, args, body, None, backend.pid, None)
            rounds.append([direct] + [measure(name, port, args, body, pid, backend.pid, direct)
                                      for name, port, pid in gateways])
    finally:
        for p in procs:
            p.stop(10)
    results = [median_result(list(col)) for col in zip(*rounds, strict=True)]

    print(f"{args.requests} requests x {args.rounds} rounds (medians), concurrency "
          f"{args.concurrency}, "
          f"{'streamed' if args.stream else 'non-streamed'}, max_tokens {args.max_tokens}")
    print(f"{'target':<40} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'+p50':>6} {'+p99':>6} "
          f"{'gw CPU ms/req':>13} {'backend CPU ms/req':>18} {'errors':>6}")
    for r in results:
        print(f"{r.target:<40} {r.rps:7.0f} {r.p50_ms:7.1f} {r.p99_ms:7.1f} "
              f"{r.added_p50_ms:6.1f} {r.added_p99_ms:6.1f} {r.gateway_cpu_ms_per_req:13.2f} "
              f"{r.backend_cpu_ms_per_req:18.2f} {r.errors:6d}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))


if __name__ == "__main__":
    main()
