"""The A/B load test of docs/results.md section 6: dense SmolLM2-135M vs a HARP-pruned
checkpoint, each on its own ``harp-vllm serve`` with the same KV-cache budget, then
``harp-vllm loadtest`` against both. The servers are ``harp_vllm.process.ServerProcess``es
(own process group, log in OUT, ``/health`` wait that fails early with the log's tail, group
stop at the end, also on a failure or Ctrl-C)::

    .venv/bin/python benchmarks/loadtest_smollm2.py PRUNED_DIR OUT_DIR [loadtest options ...]

Environment: KV_BYTES (KV-cache bytes per server, default 256 MiB so the capacity scenario
saturates the dense server), MAX_MODEL_LEN (default 4608: vLLM refuses a context the KV
budget cannot hold once), VLLM_CPU_OMP_THREADS_BIND (default auto; equal for both).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

from harp_vllm.process import ServerProcess

PORTS = {"dense": 8101, "pruned": 8102}


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    pruned, out, extra = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k != "VLLM_CPU_KVCACHE_SPACE"}  # it would override --kv-cache-memory-bytes
    common = ["--dtype", "float32", "--enforce-eager",
              "--max-model-len", os.environ.get("MAX_MODEL_LEN", "4608"),
              "--kv-cache-memory-bytes", os.environ.get("KV_BYTES", "268435456"),
              "--host", "127.0.0.1"]
    models = {"dense": ["smollm2-135m"],
              "pruned": [pruned, "--served-model-name", "smollm2-harp-p8"]}
    serve = [sys.executable, "-m", "harp_vllm.cli", "serve"]
    with ExitStack() as stack:
        servers = {name: stack.enter_context(ServerProcess(
            [*serve, *models[name], "--port", str(port), *common],
            f"http://127.0.0.1:{port}", env, out / f"{name}-server.log", poll=2.0))
            for name, port in PORTS.items()}
        for server in servers.values():
            server.wait_ready(900)
        cmd = [sys.executable, "-m", "harp_vllm.cli", "loadtest",
               "--dense-url", servers["dense"].url or "",
               "--pruned-url", servers["pruned"].url or "", "--out", str(out), *extra]
        print("+", shlex.join(cmd), flush=True)
        return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
