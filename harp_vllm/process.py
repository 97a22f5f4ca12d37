"""The one way this package starts, health-checks, finds again and stops a server process.

``ServerProcess`` runs a command detached in its own session (its own process group), stdin
closed, its output in a log file; it records the pid and the process's creation time, waits for
a health URL (failing early, with the log's tail, when the process exits) and stops the whole
group and process tree (API server, engine core, workers): SIGTERM, then SIGKILL.
``attach`` and ``stop_process`` do the same for a process started by an earlier command,
found again by its recorded pid and creation time (never another process that reused the pid).
Its users: the native stack (``ops.stack``, whose services outlive ``harp-vllm stack up``),
the tests' servers (``harp-vllm serve``, gateways, fake backends, Prometheus) and the
benchmarks'; the probes (``http_ok``, ``port_free``, ``log_tail``, ``free_port``) are here too.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


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


# -- a recorded process: found again, stopped ---------------------------------------------------

def attach(pid: int, create_time: float | None):
    """The psutil process ``pid`` if it is still the one recorded (same creation time) and has
    not exited (a zombie counts as exited); else None."""
    import psutil

    try:
        p = psutil.Process(pid)
        if create_time is not None and abs(p.create_time() - create_time) > 0.01:
            return None
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_process(pid: int, create_time: float | None, timeout: float = 30.0,
                 child: subprocess.Popen | None = None) -> list[int]:
    """SIGTERM ``pid``'s process group and process tree, SIGKILL what is left after
    ``timeout`` s; return the pids signalled.

    Only the recorded process (checked by its creation time), its descendants and its own
    process group are touched. ``child``: this process's handle on ``pid`` (a ``ServerProcess``),
    waited on so its exit status is kept; without it an exited child of ours is reaped here.
    """
    import psutil

    root = attach(pid, create_time)
    if root is None:
        if child is not None:  # exited; what it left in its group goes too
            _killpg(pid, signal.SIGKILL)
            child.wait(10)
        return []
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = [root]
    own_group = False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        own_group = os.getpgid(pid) == pid
    if own_group:
        _killpg(pid, signal.SIGTERM)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    deadline = time.monotonic() + timeout
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout)
    _gone, alive = psutil.wait_procs(procs, timeout=max(0.0, deadline - time.monotonic()))
    if alive:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            # descendants started meanwhile
            alive += [c for p in alive for c in p.children(recursive=True)]
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
    if own_group:  # members that left the tree (their parent died) but not the group
        _killpg(pid, signal.SIGKILL)
    if child is not None:
        child.wait(10)
    else:  # our own direct child, if we are its parent (the stack's API called in-process)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
    return [p.pid for p in procs]


# -- a process started here ---------------------------------------------------------------------

class ServerProcess:
    """``cmd`` started detached (own session and process group, stdin closed), output to
    ``log_path``; ``pid`` and ``create_time`` identify it for ``attach``/``stop_process``.

    ``url`` is the server's base URL; ``wait_ready`` polls the health URL (``health_url``, else
    ``url + health_path``; with neither, running counts as healthy) every ``poll`` seconds until
    it answers 2xx (``healthy``). ``cwd``: the working directory (None: this process's).
    ``fresh_log``: empty the log first (else append); ``log_command``: write ``$ cmd`` into it
    before the output (not for commands with secrets).
    """

    def __init__(self, cmd: Sequence[str], url: str | None = None,
                 env: Mapping[str, str] | None = None, log_path: Path | None = None,
                 health_path: str = "/health", poll: float = 1.0, cwd: Path | None = None,
                 health_url: str | None = None, fresh_log: bool = True,
                 log_command: bool = False):
        self.cmd = list(cmd)
        self.cwd = cwd
        self.url = url
        self.health_path = health_path
        self._health_url = health_url
        self.poll_interval = poll
        self.log_path = Path(log_path) if log_path else None
        self.log_command = log_command
        self._env = dict(os.environ if env is None else env)
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            if fresh_log:
                self.log_path.write_bytes(b"")
        self._spawn()

    def _spawn(self) -> None:
        import psutil

        with contextlib.ExitStack() as stack:
            out: Any = subprocess.DEVNULL
            if self.log_path:
                out = stack.enter_context(open(self.log_path, "ab"))
                if self.log_command:
                    out.write(f"$ {shlex.join(self.cmd)}\n".encode())
                    out.flush()
            self.proc = subprocess.Popen(self.cmd, env=self._env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=self.cwd)
        try:
            self.create_time: float | None = psutil.Process(self.proc.pid).create_time()
        except psutil.NoSuchProcess:
            self.create_time = None

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def health_url(self) -> str | None:
        if self._health_url is not None:
            return self._health_url
        return None if self.url is None else self.url + self.health_path

    def poll(self) -> int | None:
        """The exit status, or None while it runs."""
        return self.proc.poll()

    def log_tail(self, n: int = 40) -> str:
        return log_tail(self.log_path, n)

    def healthy(self, timeout: float = 2.0) -> bool:
        url = self.health_url
        return self.proc.poll() is None if url is None else http_ok(url, timeout)

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
            time.sleep(self.poll_interval)
        raise TimeoutError(f"server not healthy after {timeout:.0f} s; log tail:\n"
                           f"{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the process group at once (a crash, as tests simulate)."""
        if self.proc.poll() is None:
            _killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the process group and tree (``stop_process``): SIGTERM, SIGKILL after
        ``timeout`` s; children left behind in the group (engine core, workers) go too."""
        stop_process(self.pid, self.create_time, timeout, child=self.proc)
