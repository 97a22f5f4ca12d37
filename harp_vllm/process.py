"""The one way this package starts, health-checks and stops a server process.

``ServerProcess`` runs a command in its own process group with its output in a log file,
waits for its health URL (failing early, with the log's tail, when the process exits) and
stops the whole group (API server, engine core, workers): SIGTERM, then SIGKILL. The tests'
servers (``harp-vllm serve``, gateways, fake backends, Prometheus) run on it; the stack runner
(``ops.stack``), whose processes outlive the command that started them, shares its probes
(``http_ok``, ``port_free``, ``log_tail``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    """Whether ``port`` can be bound on ``host`` ("" or 0.0.0.0: every interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host if host not in ("", "0.0.0.0") else "0.0.0.0", port))
        except OSError:
            return False
    return True


def http_ok(url: str, timeout: float = 3.0) -> bool:
    """Whether GET ``url`` answers 2xx."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def log_tail(path: str | Path | None, n: int = 30) -> str:
    """The last ``n`` lines of a log file ("" if there is none)."""
    if path is None:
        return ""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class ServerProcess:
    """``cmd`` started in the background, in its own process group, output to ``log_path``.

    ``url`` is the server's base URL; ``wait_ready`` polls ``url + health_path`` every
    ``poll`` seconds until it answers 2xx (``healthy``). ``cwd``: the working directory (None:
    this process's).
    """

    def __init__(self, cmd: Sequence[str], url: str, env: Mapping[str, str] | None = None,
                 log_path: Path | None = None, health_path: str = "/health",
                 poll: float = 1.0, cwd: Path | None = None):
        self.cmd = list(cmd)
        self.cwd = cwd
        self.url = url
        self.health_path = health_path
        self.poll = poll
        self.log_path = Path(log_path) if log_path else None
        self._env = dict(os.environ if env is None else env)
        self._log: IO[bytes] | int = subprocess.DEVNULL
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.write_bytes(b"")
        self._spawn()

    def _spawn(self) -> None:
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(self.cmd, env=self._env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=self.cwd)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 40) -> str:
        return log_tail(self.log_path, n)

    def healthy(self, timeout: float = 2.0) -> bool:
        return http_ok(self.url + self.health_path, timeout)

    def wait_ready(self, timeout: float = 300.0) -> ServerProcess:
        """Return once healthy; RuntimeError (with the log's tail) if the process exits first,
        TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was "
                                   f"ready; log tail:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(self.poll)
        raise TimeoutError(f"server not healthy after {timeout:.0f} s; log tail:\n"
                           f"{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the process group at once (a crash, as tests simulate)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        if not isinstance(self._log, int) and not self._log.closed:
            self._log.close()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the process group, SIGKILL it after ``timeout`` s; children left behind in
        the group (engine core, workers) go too."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if not isinstance(self._log, int) and not self._log.closed:
            self._log.close()
