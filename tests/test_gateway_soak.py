"""Bounded soak and HTTP fuzzing of a real gateway process (issue 14).

* Soak: ``HARP_GATEWAY_SOAK_N`` requests (default 2,000, a size for CI; the issue's 20,000
  is ``HARP_GATEWAY_SOAK_N=20000``) at concurrency 16 through an A/B alias with mirroring,
  with faults drawn at random: backend error statuses, streams that break off, non-JSON
  replies, replies and SSE events over the caps, callers that hang up mid-stream, bad JSON,
  unknown models, non-strict JSON, and issue 26's shapes (UTF-16 bodies, ``1e999``, a body
  over the JSON-value limit, a text/plain body, a 70 KB header, a too-deeply nested backend
  reply, a backend's text/plain error page). Afterwards no request is lost or hung (each got its
  expected answer), every gauge is back to 0, the counters add up, and the gateway's RSS and
  open file descriptors are back near their level after the warm-up.
* Fuzz: hypothesis-generated bodies sent over HTTP: never a 5xx, always an OpenAI error shape.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter

import aiohttp
import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_gateway import fake_backend, gw_metrics, metric_sum
from test_gateway_hardening import gateway_from
from test_gateway_units import fields, json_values

SOAK_N = int(os.environ.get("HARP_GATEWAY_SOAK_N", "2000"))
OK = {"model": "ab", "prompt": "one two three", "max_tokens": 4}

# name: (weight, body or raw bytes, stream, expected status, routed to a backend)
SCENARIOS = {
    "ok": (40, OK, False, 200, True),
    "ok_stream": (25, {**OK, "stream": True}, True, 200, True),
    "backend_500": (4, {**OK, "fake_status": 500}, False, 500, True),
    "backend_429": (3, {**OK, "fake_status": 429}, False, 429, True),
    "drop_mid_stream": (4, {**OK, "stream": True, "fake_drop_after": 1}, True, 200, True),
    "garbage": (3, {**OK, "fake_garbage": True}, False, 502, True),
    "reply_too_large": (2, {**OK, "fake_reply_bytes": 300_000}, False, 502, True),
    "event_too_large": (2, {**OK, "stream": True, "fake_event_bytes": 300_000}, True, 200,
                        True),
    "caller_hangs_up": (5, {**OK, "stream": True, "max_tokens": 30, "fake_token_delay": 0.02},
                        True, 200, True),
    "bad_json": (3, b'{"model": "ab", "prompt": ', False, 400, False),
    "nan": (3, b'{"model": "ab", "prompt": NaN}', False, 400, False),
    "unknown_model": (3, {**OK, "model": "nope"}, False, 404, False),
    "bad_type": (3, {**OK, "max_tokens": "4"}, False, 422, False),
    # Issue 26's shapes.
    "utf16": (2, json.dumps(OK).encode("utf-16"), False, 400, False),
    "inf_number": (2, b'{"model": "ab", "prompt": "x", "temperature": 1e999}', False, 400,
                   False),
    "too_many_values": (1, b'{"model": "ab", "prompt": [' + b",".join([b"[]"] * 100_001)
                        + b"]}", False, 413, False),
    "text_plain": (2, OK, False, 415, False),
    "huge_header": (2, OK, False, 431, False),
    "deep_reply": (2, {**OK, "fake_deep_reply": 50_000}, False, 502, True),
    "text_error_page": (2, {**OK, "fake_text_status": 503}, False, 503, True),
}
# Request headers per scenario (every other one sends Content-Type: application/json).
HEADERS = {"text_plain": {"Content-Type": "text/plain"},
           "huge_header": {"Content-Type": "application/json", "X-Pad": "p" * 70_000}}


async def one(session: aiohttp.ClientSession, url: str, name: str) -> str:
    """Send one request of scenario ``name``; return what went wrong ('' if nothing)."""
    _, body, stream, want, _ = SCENARIOS[name]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = HEADERS.get(name, {"Content-Type": "application/json"})
    async with session.post(url, data=data, headers=headers) as r:
        if r.status != want:
            return f"{name}: status {r.status}, wanted {want}: {(await r.read())[:200]!r}"
        if name == "caller_hangs_up":
            await r.content.readline()
            r.close()  # leave mid-stream
            return ""
        text = (await r.read()).decode()
        if stream and name == "ok_stream" and not text.rstrip().endswith("data: [DONE]"):
            return f"{name}: stream did not end with [DONE]: {text[-200:]}"
        if name in ("drop_mid_stream", "event_too_large") and '"error"' not in text:
            return f"{name}: no error event: {text[-200:]}"
        if want >= 400 and "error" not in json.loads(text):
            return f"{name}: not an OpenAI error: {text[:200]}"
        if name == "text_error_page" and "10.1.2.3" in text:
            return f"{name}: the backend's page was passed on: {text[:200]}"
        return ""


async def soak(url: str, n: int, concurrency: int, seed: int) -> tuple[Counter, list[str]]:
    rng = random.Random(seed)
    names = rng.choices(list(SCENARIOS), weights=[s[0] for s in SCENARIOS.values()], k=n)
    problems: list[str] = []
    queue = list(reversed(names))
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def worker() -> None:
            while queue:
                name = queue.pop()
                try:
                    problem = await one(session, url, name)
                except (aiohttp.ClientError, TimeoutError) as e:
                    problem = f"{name}: {type(e).__name__}: {e}"
                if problem:
                    problems.append(problem)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Counter(names), problems


def usage(proc: psutil.Process) -> tuple[float, int]:
    return proc.memory_info().rss / 2**20, proc.num_fds()


@pytest.mark.timeout(900)
def test_soak_with_random_faults(tmp_path):
    a, b = fake_backend(tmp_path, "soak-a"), fake_backend(tmp_path, "soak-b")
    gw = gateway_from(tmp_path, "soak", {
        "backends": [{"name": "a", "url": a.url}, {"name": "b", "url": b.url}],
        "aliases": [{"name": "ab", "targets": [{"backend": "a"}, {"backend": "b"}]}],
        "shadows": [{"source": "a", "target": "b", "fraction": 0.1}],
        "max_connections": 8, "queue_timeout": 10, "request_timeout": 20,
        "max_response_bytes": 100_000, "max_sse_event_bytes": 100_000, "health_interval": 1})
    url = gw.url + "/v1/completions"
    try:
        proc = psutil.Process(gw.proc.pid)
        warm, problems = asyncio.run(soak(url, 300, 16, seed=1))
        assert not problems, problems[:5]
        rss0, fds0 = usage(proc)
        counts, problems = asyncio.run(soak(url, SOAK_N, 16, seed=2))
        assert not problems, (len(problems), problems[:10])
        total = warm + counts
        for _ in range(100):  # shadows and cancelled streams settle within seconds
            if metric_sum(gw, "harp_gateway_inflight_requests") == 0:
                break
            time.sleep(0.1)
        assert metric_sum(gw, "harp_gateway_inflight_requests") == 0
        routed = sum(c for name, c in total.items() if SCENARIOS[name][4])
        assert metric_sum(gw, "harp_gateway_requests_total", role="primary") == routed
        refused = sum(c for name, c in total.items() if not SCENARIOS[name][4])
        assert metric_sum(gw, "harp_gateway_rejected_total") == refused
        assert metric_sum(gw, "harp_gateway_errors_total", kind="internal") == 0
        assert metric_sum(gw, "harp_gateway_errors_total", kind="busy") == 0
        for lab, up in gw_metrics(gw, "harp_gateway_backend_up"):
            assert up == 1, lab
        time.sleep(4)  # idle pooled connections expire (3 s keep-alive)
        rss1, fds1 = usage(proc)
        print(f"soak n={SOAK_N}: RSS {rss0:.1f} -> {rss1:.1f} MiB, fds {fds0} -> {fds1}, "
              f"scenarios {dict(counts)}")
        assert fds1 <= fds0 + 8, (fds0, fds1)
        assert rss1 <= rss0 + 20 + SOAK_N / 1000, (rss0, rss1)
        log = gw.log_path.read_text()
        assert "Traceback" not in log, log[-3000:]
    finally:
        gw.stop()
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def fuzz_gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    a = fake_backend(tmp, "fuzz-a")
    gw = gateway_from(tmp, "fuzz", {"backends": [{"name": "a", "url": a.url}]})
    yield gw
    gw.stop()
    a.stop()


@pytest.mark.timeout(300)
@settings(max_examples=int(os.environ.get("HARP_GATEWAY_FUZZ_N", "150")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=st.one_of(fields, json_values), real_model=st.booleans(),
       endpoint=st.sampled_from(["completions", "chat/completions"]))
def test_fuzzed_bodies_over_http(fuzz_gw, body, real_model, endpoint):
    """The gateway answers any body with 200 or a 4xx OpenAI error: never a 5xx of its own
    (a backend's answer is passed through: it carries X-Harp-Backend)."""
    if isinstance(body, dict):
        if real_model and "model" in body:
            body["model"] = "fuzz-a"  # so some bodies reach the backend
        if isinstance(body.get("max_tokens"), int):
            body["max_tokens"] = min(abs(body["max_tokens"]), 8)
        body.pop("stream", None)
    # json.dumps writes Infinity for an infinite float: non-strict JSON reaches the gateway too.
    r = httpx.post(f"{fuzz_gw.url}/v1/{endpoint}", content=json.dumps(body), timeout=20,
                   headers={"Content-Type": "application/json"})
    routed = "x-harp-backend" in r.headers
    assert r.status_code in (200, 400, 404, 422) or routed, (r.status_code, r.text[:300])
    if r.status_code != 200:
        err = r.json()["error"]
        assert err["message"] and err["type"] and "param" in err and "code" in err
    assert metric_sum(fuzz_gw, "harp_gateway_inflight_requests") == 0
