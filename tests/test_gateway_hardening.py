"""Issue 14 (gateway hardening) with real processes on 127.0.0.1: each defect of the issue has
a test here that failed on the gateway before the fix.

Backends are ``tests/fake_backend.py`` processes (its fault hooks: trickle, drop,
oversized replies and events, odd SSE error codes) and, for a backend that accepts
connections but never answers, a plain listening socket. Every gateway is a real
``python -m harp_vllm.cli gateway`` process, configured by file.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_gateway import (
    FAKE_BACKEND,
    Proc,
    assert_openai_error,
    fake_backend,
    gw_metrics,
    metric_sum,
)

from harp_vllm.process import free_port

KEY = "sk-hardening-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def gateway_from(tmp: Path, name: str, cfg: dict, probe: str = "/live") -> Proc:
    """A gateway process reading ``cfg`` from a JSON file (ready when ``probe`` answers);
    without ``api_keys`` it runs open (``allow_no_auth``)."""
    path = tmp / f"gw-{name}.json"
    path.write_text(json.dumps(cfg if cfg.get("api_keys") else {"allow_no_auth": True, **cfg}))
    port = free_port()
    return Proc([__import__("sys").executable, "-m", "harp_vllm.cli", "gateway", "--port",
                 str(port), "--log-level", "warning", "--config", str(path)],
                port, tmp / f"gw-{name}.log", probe=probe)


def run_gateway_cli(*args: str, env: dict | None = None) -> tuple[int, str]:
    import os
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "harp_vllm.cli", "gateway", "--port",
                        str(free_port()), *args], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "NO_COLOR": "1", **(env or {})})
    return p.returncode, p.stdout + p.stderr


class RawConn:
    """One client TCP connection, to see exactly what happens to it (keep-alive, closes)."""

    def __init__(self, port: int, timeout: float = 10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def request(self, body: bytes, path: str = "/v1/completions",
                headers: dict | None = None) -> tuple[int, dict, bytes]:
        head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: "
                           f"application/json\r\nContent-Length: {len(body)}\r\n{head}\r\n"
                           ).encode() + body)
        return self.response()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed by the server")
        self.buf += data

    def response(self) -> tuple[int, dict, bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        hdrs = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        n = int(hdrs.get("content-length", 0))
        while len(self.buf) < n:
            self._fill()
        body, self.buf = self.buf[:n], self.buf[n:]
        return int(lines[0].split()[1]), hdrs, body

    def closed_by_server(self, wait: float) -> bool:
        self.sock.settimeout(wait)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


class HungServer:
    """Accepts TCP connections and never answers (a hung backend)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.conns: list[socket.socket] = []
        self.stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop:
            with contextlib.suppress(OSError):
                self.conns.append(self.sock.accept()[0])

    def close(self) -> None:
        self.stop = True
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("hardening")


@pytest.fixture(scope="module")
def fast(tmp):
    p = fake_backend(tmp, "fast", 0.0)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def slow(tmp):
    p = fake_backend(tmp, "slowpoke", 0.5)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def gw(tmp, fast, slow):
    """One gateway for the checks that share it: keys, small caps, short limits."""
    g = gateway_from(tmp, "main", {
        "backends": [{"name": "fast", "url": fast.url}, {"name": "slow", "url": slow.url}],
        "api_keys": [KEY, "sk-second-key"], "max_tokens_limit": 64, "max_n": 2,
        "max_best_of": 2, "max_response_bytes": 200_000, "max_sse_event_bytes": 100_000,
        "request_timeout": 3, "read_timeout": 2, "body_timeout": 1, "health_interval": 0.5})
    yield g
    g.stop()


def inflight(g: Proc) -> float:
    return metric_sum(g, "harp_gateway_inflight_requests")


GOOD = {"model": "fast", "prompt": "one two", "max_tokens": 2}


# ---------------------------------------------------------------------------------------------
# 1. Auth
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_bearer_variants(gw):
    """Sent over a raw socket: an HTTP client would refuse some of these headers."""
    body = json.dumps(GOOD).encode()

    def status(header: bytes | None) -> tuple[int, str | None]:
        conn = RawConn(gw.port)
        try:
            extra = b"Authorization: " + header + b"\r\n" if header is not None else b""
            conn.sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                              b"application/json\r\nContent-Length: "
                              + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body)
            code, _, answer = conn.response()
            return code, json.loads(answer).get("error", {}).get("code") if code != 200 else None
        finally:
            conn.close()

    key = KEY.encode()
    for header in (b"Bearer " + key, b"bearer " + key, b"BEARER " + key, b"Bearer   " + key,
                   b"Bearer\t" + key, b"Bearer " + key + b"  ", b"  Bearer " + key,
                   b"Bearer sk-second-key"):
        assert status(header) == (200, None), header
    for header in (b"Bearer", b"Bearer ", b"Bearer  \t ", b"Bearer s", b"Bearer " + key[:-1],
                   b"Bearer " + key + b"x", b"Basic " + key, key, b"Bearer " + key + b" extra",
                   b"Token " + key, b"Bearer \xc3\xa9", b"Bearer " + key.upper()):
        assert status(header) == (401, "invalid_api_key"), header
    for header in (None, b"", b"   "):
        assert status(header) == (401, "missing_api_key"), header


@pytest.mark.timeout(60)
def test_bad_key_configuration_refuses_to_start(tmp, fast):
    """The issue's bypasses: a string for api_keys (was split into characters, so 'Bearer s'
    got in) and an empty key (a bare 'Bearer' got in). Both now stop the gateway at start
    with a message that names the setting but not the key."""
    path = tmp / "string-keys.json"
    path.write_text(json.dumps({"backends": [{"name": "a", "url": fast.url}],
                                "api_keys": "sk-secret"}))
    rc, out = run_gateway_cli("--config", str(path))
    assert rc == 2 and "api_keys: must be a list" in out and "sk-secret" not in out, out
    rc, out = run_gateway_cli("--backend", f"a={fast.url}", "--api-key", "")
    assert rc == 2 and "--api-key #1 is empty" in out, out
    rc, out = run_gateway_cli("--backend", "a=http://admin:s3cret-pass@127.0.0.1:99999")
    assert rc == 2 and "port" in out.lower() and "s3cret" not in out, out
    rc, out = run_gateway_cli("--backend", f"a={fast.url}", "--backend", f"b={fast.url}",
                              "--alias", "s=a:inf,b:1")
    assert rc == 2 and "alias" in out.lower(), out


# ---------------------------------------------------------------------------------------------
# 2. Odd JSON: a 400 on a connection that stays usable, gauges unchanged
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_odd_json_is_400_and_the_connection_stays_usable(gw):
    conn = RawConn(gw.port)
    good = json.dumps(GOOD).encode()
    try:
        for bad in (b'{"model": "fast", "prompt": NaN}',
                    b'{"model": "fast", "prompt": "x", "temperature": Infinity}',
                    b'{"model": "fast", "prompt": "\\ud800"}',
                    b'{"model": "fast", "prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}",
                    b"[" * 5000 + b"]" * 5000):
            status, hdrs, body = conn.request(bad, headers=AUTH)
            assert status == 400, (bad[:60], body)
            assert json.loads(body)["error"]["code"] == "invalid_json"
            assert hdrs.get("connection") != "close"
            status, _, body = conn.request(good, headers=AUTH)  # same connection
            assert status == 200, body
    finally:
        conn.close()
    assert inflight(gw) == 0


@pytest.mark.timeout(60)
def test_limits_on_max_tokens_n_best_of(gw):
    with httpx.Client(timeout=20, headers=AUTH) as c:
        for field, value in (("max_tokens", 65), ("n", 3), ("best_of", 3),
                             ("max_completion_tokens", 1000)):
            err = assert_openai_error(c.post(gw.url + "/v1/completions",
                                             json={**GOOD, field: value}), 400, "limit_exceeded")
            assert err["param"] == field
        assert c.post(gw.url + "/v1/completions", json={**GOOD, "max_tokens": 64}
                      ).status_code == 200


@pytest.mark.timeout(60)
def test_unexpected_exception_is_a_500_and_restores_gauges(fast, monkeypatch):
    """A bug anywhere in the request path (injected here) answers an OpenAI-style 500 on a
    connection that stays usable, with the in-flight gauge back to 0 (the old gateway leaked
    +1 per such request and closed the connection)."""
    import uvicorn
    from test_serve import metric_samples

    from harp_vllm.gateway import build_config, create_app, proxy

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(build_config(backends=[
        f"fast={fast.url}"], allow_no_auth=True)), host="127.0.0.1", port=port,
        log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    real_read, real_feed = proxy.read_capped, proxy.SSERelay.feed
    armed = {"read": True, "feed": True}

    async def read_once_broken(resp, cap):
        if armed.pop("read", False):
            raise RuntimeError("injected bug")
        return await real_read(resp, cap)

    def feed_once_broken(self, chunk):
        if armed.pop("feed", False):
            raise KeyError("injected bug")
        return real_feed(self, chunk)

    monkeypatch.setattr(proxy, "read_capped", read_once_broken)
    monkeypatch.setattr(proxy.SSERelay, "feed", feed_once_broken)
    conn = RawConn(port)
    try:
        status, _, body = conn.request(json.dumps(GOOD).encode())
        assert status == 500 and json.loads(body)["error"]["code"] == "internal_error", body
        assert conn.request(json.dumps(GOOD).encode())[0] == 200  # same connection
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=10,
                          json={**GOOD, "stream": True}) as s:
            last = [ln for ln in s.iter_lines() if ln.startswith("data: ")][-1]
        assert json.loads(last[6:])["error"]["code"] == "internal_error"
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert sum(v for _, v in metric_samples(text, "harp_gateway_inflight_requests")) == 0
        assert sum(v for lab, v in metric_samples(text, "harp_gateway_errors_total")
                   if lab["kind"] == "internal") == 2
    finally:
        conn.close()
        server.should_exit = True
        thread.join(10)


# ---------------------------------------------------------------------------------------------
# 3. Busy is not down; /health answers from background probes
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_full_pool_is_busy_not_down(tmp, fast, slow):
    g = gateway_from(tmp, "pool", {
        "backends": [{"name": "fast", "url": fast.url}, {"name": "slow", "url": slow.url}],
        "max_connections": 2, "queue_timeout": 0.5, "health_interval": 0.5})
    hold = {"model": "slowpoke", "prompt": "x", "max_tokens": 6, "stream": True}

    def stream(_):
        with httpx.stream("POST", g.url + "/v1/completions", json=hold, timeout=30) as r:
            return r.status_code, r.read()

    try:
        with ThreadPoolExecutor(6) as ex:
            futs = [ex.submit(stream, i) for i in range(6)]  # 2 hold the pool for 3 s
            time.sleep(1.0)
            # The other backend has its own pool: unaffected.
            r = httpx.post(g.url + "/v1/completions", timeout=10,
                           json={"model": "fast", "prompt": "x", "max_tokens": 2})
            assert r.status_code == 200
            results = [f.result() for f in futs]
        statuses = sorted(s for s, _ in results)
        assert statuses == [200, 200, 503, 503, 503, 503], statuses
        busy = [json.loads(b) for s, b in results if s == 503]
        assert all(e["error"]["code"] == "backend_busy" for e in busy)
        for lab, v in gw_metrics(g, "harp_gateway_backend_up"):
            assert v == 1, lab
        assert metric_sum(g, "harp_gateway_errors_total", kind="busy") == 4
        assert metric_sum(g, "harp_gateway_errors_total", kind="connect") == 0
        # A bounded queue: with a longer wait the same burst is served in turn.
        h = httpx.get(g.url + "/health", timeout=5).json()
        assert h["status"] == "ok"
    finally:
        g.stop()
    g = gateway_from(tmp, "queue", {"backends": [{"name": "slow", "url": slow.url}],
                                    "max_connections": 1, "queue_timeout": 20})
    try:
        hold["max_tokens"] = 2
        with ThreadPoolExecutor(3) as ex:
            assert [s for s, _ in ex.map(stream, range(3))] == [200, 200, 200]
    finally:
        g.stop()


@pytest.mark.timeout(90)
def test_health_answers_from_state_with_a_hung_backend(tmp, fast):
    hung = HungServer()
    late_port = free_port()
    g = gateway_from(tmp, "hung", {
        "backends": [{"name": "fast", "url": fast.url},
                     {"name": "hung", "url": hung.url, "models": ["hung-model"]},
                     {"name": "late", "url": f"http://127.0.0.1:{late_port}"}],
        "health_interval": 0.5, "health_timeout": 5, "read_timeout": 30})
    late = None
    try:
        def health(_):
            t0 = time.monotonic()
            r = httpx.get(g.url + "/health", timeout=30)
            return r.status_code, r.json(), time.monotonic() - t0

        # Every probe of the hung backend takes its 5 s health_timeout; /health never waits.
        with ThreadPoolExecutor(20) as ex:
            out = list(ex.map(health, range(200)))
        assert all(s == 200 for s, _, _ in out)
        assert all(b["backends"]["fast"]["up"] for _, b, _ in out)
        assert all(b["backends"]["hung"]["up"] is False for _, b, _ in out)
        # No /health call waited for a probe (each would have taken the 5 s health_timeout).
        assert max(t for _, _, t in out) < 4.0, max(t for _, _, t in out)
        r = httpx.post(g.url + "/v1/completions", timeout=10,
                       json={"model": "fast", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200
        assert httpx.get(g.url + "/live", timeout=5).json() == {"status": "ok"}
        # Each backend has its own probe loop: one that comes up is seen within a few
        # health_intervals, not after the hung backend's 5 s probe.
        late = Proc([__import__("sys").executable, str(FAKE_BACKEND),
                     "--port", str(late_port), "--model", "fake-late"], late_port,
                    tmp / "late-h.log")
        t0 = time.monotonic()
        while not httpx.get(g.url + "/health", timeout=5).json()["backends"]["late"]["up"]:
            assert time.monotonic() - t0 < 4.0
            time.sleep(0.1)
    finally:
        g.stop()
        hung.close()
        if late is not None:
            late.stop()


# ---------------------------------------------------------------------------------------------
# 4. Open endpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_open_endpoints_do_not_leak(tmp, fast):
    dead = free_port()
    g = gateway_from(tmp, "leak", {
        "backends": [{"name": "fast", "url": fast.url.replace("http://",
                                                              "http://admin:s3cret-pass@")},
                     {"name": "dead", "url": f"http://127.0.0.1:{dead}", "models": ["d"]}],
        "health_interval": 0.5})
    try:
        h = httpx.get(g.url + "/health", timeout=10)
        assert h.status_code == 200 and h.json()["backends"]["dead"]["up"] is False
        text = h.text
        assert "s3cret" not in text and "admin" not in text and "127.0.0.1" not in text
        assert "Error" not in text and "refused" not in text.lower()
        # The credentials do reach the backend as basic auth: the request is served.
        r = httpx.post(g.url + "/v1/completions", timeout=10,
                       json={"model": "fast", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200
        # A backend's SSE error code cannot mint new label values.
        with httpx.stream("POST", g.url + "/v1/completions", timeout=10,
                          json={"model": "fast", "prompt": "x", "max_tokens": 1, "stream": True,
                                "fake_sse_error_code": 999999}) as s:
            s.read()
        m = httpx.get(g.url + "/metrics", timeout=10).text
        assert 'status="999999"' not in m and 's3cret' not in m
        assert metric_sum(g, "harp_gateway_errors_total", status="500", kind="upstream") == 1
        series = [ln for ln in m.splitlines() if ln and not ln.startswith("#")]
        # Two backends: ~145 KB and ~1,370 series (the old gateway: 450 KB and 4,387).
        assert len(m) < 160_000 and len(series) < 1500, (len(m), len(series))
    finally:
        g.stop()


@pytest.mark.timeout(60)
def test_protected_metrics_and_health(tmp, fast):
    g = gateway_from(tmp, "protected", {
        "backends": [{"name": "fast", "url": fast.url.replace("http://", "http://u:pw-xyz@")}],
        "api_keys": [KEY], "protect_metrics": True})
    try:
        with httpx.Client(timeout=10) as c:
            assert_openai_error(c.get(g.url + "/metrics"), 401)
            assert_openai_error(c.get(g.url + "/health"), 401)
            assert c.get(g.url + "/live").json() == {"status": "ok"}
            assert "harp_gateway_requests_total" in c.get(g.url + "/metrics", headers=AUTH).text
            h = c.get(g.url + "/health", headers=AUTH).json()["backends"]["fast"]
            assert h["up"] and h["url"].startswith("http://***@127.0.0.1:")
            assert "pw-xyz" not in json.dumps(h)
    finally:
        g.stop()


# ---------------------------------------------------------------------------------------------
# 5. Time and size limits
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_request_deadline_stops_a_trickling_backend(gw):
    """The backend sends a byte every 1.5 s: under read_timeout=2 forever, but the 3 s
    request deadline ends it (the old gateway held such a request 18 s)."""
    with httpx.Client(timeout=30, headers=AUTH) as c:
        t0 = time.monotonic()
        r = c.post(gw.url + "/v1/completions", json={**GOOD, "fake_trickle": 1.5})
        assert_openai_error(r, 504, "request_timeout")
        assert time.monotonic() - t0 < 10
        with c.stream("POST", gw.url + "/v1/completions",
                      json={"model": "slowpoke", "prompt": "x", "max_tokens": 20,
                            "stream": True, "fake_token_delay": 1.5}) as s:
            assert s.status_code == 200
            last = [ln for ln in s.iter_lines() if ln.startswith("data: ")][-1]
        assert json.loads(last[6:])["error"]["code"] == "request_timeout"
        assert time.monotonic() - t0 < 15
    assert inflight(gw) == 0
    assert metric_sum(gw, "harp_gateway_errors_total", kind="deadline") == 2


@pytest.mark.timeout(60)
def test_reply_and_event_size_caps(gw):
    with httpx.Client(timeout=30, headers=AUTH) as c:
        r = c.post(gw.url + "/v1/completions", json={**GOOD, "fake_reply_bytes": 1_000_000})
        assert_openai_error(r, 502, "response_too_large")
        assert c.post(gw.url + "/v1/completions", json={**GOOD, "fake_reply_bytes": 1000}
                      ).status_code == 200
        with c.stream("POST", gw.url + "/v1/completions",
                      json={**GOOD, "stream": True, "fake_event_bytes": 1_000_000}) as s:
            last = [ln for ln in s.iter_lines() if ln.startswith("data: ")][-1]
        assert json.loads(last[6:])["error"]["code"] == "response_too_large"
    assert inflight(gw) == 0


@pytest.mark.timeout(60)
def test_slow_clients_are_cut_off(tmp, fast):
    g = gateway_from(tmp, "slowclients", {
        "backends": [{"name": "fast", "url": fast.url}], "header_timeout": 1,
        "body_timeout": 1, "max_client_connections": 20})
    try:
        # Slow loris: headers a byte at a time never finish within header_timeout.
        loris = [RawConn(g.port) for _ in range(5)]
        for c in loris:
            c.sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        for c in loris:
            c.sock.sendall(b"X")
        assert all(c.closed_by_server(5) for c in loris)
        assert b"408" in loris[0].buf
        # A body that stops arriving: 408 and the connection is closed.
        c = RawConn(g.port)
        c.sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                       b"Content-Type: application/json\r\n\r\n{\"model\"")
        status, hdrs, body = c.response()
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
        assert hdrs.get("connection") == "close"
        c.close()
        time.sleep(0.3)
        # The connection cap: the 21st open connection is refused with 503.
        idle = [RawConn(g.port) for _ in range(20)]
        extra = RawConn(g.port)
        assert extra.closed_by_server(5) and b" 503 " in extra.buf
        for c in idle:
            c.close()
        time.sleep(0.3)
        r = httpx.post(g.url + "/v1/completions", timeout=10,
                       json={"model": "fast", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200
        log = g.log_path.read_text()
        assert "Traceback" not in log
    finally:
        g.stop()


# ---------------------------------------------------------------------------------------------
# 6. Smaller items
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_backend_down_at_start_is_503_then_served(tmp):
    port = free_port()
    g = gateway_from(tmp, "late", {"backends": [{"name": "late", "url":
                                                 f"http://127.0.0.1:{port}"}],
                                   "health_interval": 0.3})
    b = None
    try:
        r = httpx.post(g.url + "/v1/completions", timeout=10,
                       json={"model": "fake-late", "prompt": "x", "max_tokens": 1})
        assert_openai_error(r, 503, "backend_unavailable")
        assert r.headers["retry-after"]
        b = Proc([__import__("sys").executable, str(FAKE_BACKEND),
                  "--port", str(port), "--model", "fake-late"], port, tmp / "late.log")
        deadline = time.monotonic() + 20
        while True:
            r = httpx.post(g.url + "/v1/completions", timeout=10,
                           json={"model": "fake-late", "prompt": "x", "max_tokens": 1})
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 200
        # A name no backend serves, once all are known, is still a 404.
        assert_openai_error(httpx.post(g.url + "/v1/completions", timeout=10,
                                       json={"model": "nope", "prompt": "x"}), 404)
    finally:
        g.stop()
        if b is not None:
            b.stop()


@pytest.mark.timeout(60)
def test_client_dropping_during_upload_is_quiet(gw):
    for _ in range(3):
        c = RawConn(gw.port)
        c.sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
                       b"Content-Type: application/json\r\n"
                       + f"Authorization: Bearer {KEY}\r\n\r\n".encode() + b'{"model": ')
        time.sleep(0.1)
        c.close()
    time.sleep(0.5)
    assert httpx.post(gw.url + "/v1/completions", json=GOOD, headers=AUTH,
                      timeout=10).status_code == 200
    log = gw.log_path.read_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-2000:]
    assert inflight(gw) == 0
