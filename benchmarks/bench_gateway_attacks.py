"""Issue 26's resource attacks on a gateway, measured (not a test: the numbers depend on the
machine): gateway RSS while connections send unfinished request headers, and ``/live``
latency while the loop parses large JSON bodies.

    flock /tmp/harp-heavy.lock .venv/bin/python benchmarks/bench_gateway_attacks.py \\
        [--compare-src /path/to/old/tree] [--connections 4] [--header-mb 150]

Per code tree (this checkout, plus ``--compare-src`` trees) one gateway process in front of
one zero-delay fake backend, with an API key (every tree knows ``--api-key``):

* headers: ``--connections`` sockets each send ``--header-mb`` MiB of one unfinished header
  value; reported: the gateway's RSS before and at its peak, MiB each socket got to send,
  and when the gateway cut it;
* JSON: ``/live`` polled every 5 ms while the gateway receives a 3 MB body of a million
  empty lists (refused unparsed by the new gateway) and then a body of 49,000 empty lists
  (98,000 items: under the default ``max_json_items``, parsed, checked and refused with 422
  as a prompt of empty lists); reported: the slowest ``/live`` and the status of each body.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gateway import FAKE_BACKEND, KEY, REPO, start  # noqa: E402

from harp_vllm.process import ServerProcess, free_port  # noqa: E402


def header_attack(port: int, pid: int, n: int, mb: int) -> dict:
    proc = psutil.Process(pid)
    rss0 = proc.memory_info().rss
    peak, sent, cut = rss0, [0] * n, [""] * n

    def attack(i: int) -> None:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Big: ")
        chunk, t0 = b"a" * (1 << 20), time.monotonic()
        try:
            for _ in range(mb):
                s.sendall(chunk)
                sent[i] += 1
            cut[i] = "never cut"
        except OSError as e:
            cut[i] = f"{type(e).__name__} after {time.monotonic() - t0:.2f} s"
        s.close()

    threads = [threading.Thread(target=attack, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.02)
    return {"rss_before_mib": rss0 / 2**20, "rss_peak_mib": peak / 2**20,
            "rss_added_mib": (peak - rss0) / 2**20, "sent_mib": sent, "cut": cut}


def live_during(port: int, body: bytes) -> tuple[int, float]:
    """(status of the POST of ``body``, slowest /live in ms while it ran)."""
    slowest, stop = [0.0], threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                t = time.perf_counter()
                c.get(f"http://127.0.0.1:{port}/live")
                slowest[0] = max(slowest[0], time.perf_counter() - t)
                time.sleep(0.005)

    th = threading.Thread(target=poll)
    th.start()
    time.sleep(0.3)
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", content=body, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}",
                            "Content-Type": "application/json"})
    time.sleep(0.3)
    stop.set()
    th.join()
    return r.status_code, slowest[0] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare-src", action="append", default=[], metavar="DIR")
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--header-mb", type=int, default=150)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    million = b'{"model": "fake", "prompt": [' + b",".join([b"[]"] * 1_000_000) + b"]}"
    under = (b'{"model": "fake", "max_tokens": 1, "prompt": ['
             + b",".join([b"[]"] * 49_000) + b"]}")
    procs: list[ServerProcess] = []
    results = {}
    try:
        bport = free_port()
        procs.append(start([sys.executable, str(FAKE_BACKEND), "--port", str(bport),
                            "--model", "fake"], bport, "/health", REPO))
        trees = [("this tree", REPO)] + [(d, Path(d).resolve()) for d in args.compare_src]
        for name, tree in trees:
            gport = free_port()
            gw = start([sys.executable, "-m", "harp_vllm.cli", "gateway", "--port", str(gport),
                        "--backend", f"f=http://127.0.0.1:{bport}", "--api-key", KEY,
                        "--log-level", "warning"], gport, "/live", tree)
            procs.append(gw)
            out = {"headers": header_attack(gport, gw.pid, args.connections, args.header_mb)}
            time.sleep(11)  # the old gateway frees the memory at its 10 s header timeout
            out["million_lists"] = live_during(gport, million)
            out["49k_lists"] = live_during(gport, under)
            results[name] = out
            h = out["headers"]
            print(f"{name}: headers {args.connections} x {args.header_mb} MiB: RSS "
                  f"{h['rss_before_mib']:.1f} -> peak {h['rss_peak_mib']:.1f} MiB "
                  f"(+{h['rss_added_mib']:.1f}); sent MiB {h['sent_mib']}; {h['cut']}")
            for key in ("million_lists", "49k_lists"):
                status, ms = out[key]
                print(f"{name}: {key}: status {status}, slowest /live {ms:.1f} ms")
            sys.stdout.flush()
    finally:
        for p in procs:
            p.stop(10)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
