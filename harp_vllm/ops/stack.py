"""Run the compose stack (``deploy/docker-compose.yml``) as local processes, without Docker.

``harp-vllm stack up|down|status`` reads the compose file itself, so the native topology is the
one Docker runs: the same services, commands, environment, published ports, health checks and
``depends_on`` conditions. What differs is translated, not restated:

* interpolation: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?message}`` and
  ``$$`` from the shell environment, then ``deploy/.env``, as Compose does;
* ports: every service listens on 127.0.0.1 (or ``HARP_BIND_ADDRESS``) at its published host
  port; ``--port``/``--host``/``0.0.0.0:PORT`` of its own command, the ``SERVICE:PORT``
  addresses of the others (in commands, environment and the Prometheus targets) and the health
  check URLs are rewritten to match;
* volumes: a bind mount's container path becomes the host path; a named volume becomes
  ``x-native.volumes.NAME`` of the compose file or ``$HARP_STACK_DIR/volumes/NAME``;
* images: a service built from this repository runs its command with this interpreter's
  ``harp-vllm``/``python`` first on ``PATH`` (working directory: the build context); another
  image runs ``x-native.services.NAME.executable`` (``prometheus``: Debian's package) or is
  skipped (``skip``: Grafana); the Prometheus configuration is copied with its targets rewritten;
* a service that others wait for with ``service_completed_successfully`` (or with
  ``restart: "no"``) runs to completion; the others stay up, detached in their own session, with
  their log in ``$HARP_STACK_DIR/logs``. Restart policies and resource limits are Docker's only.

Processes are started and stopped by ``harp_vllm.process`` (``ServerProcess``, ``attach``,
``stop_process``). State (pids with their creation times, ports, URLs) is kept in
``$HARP_STACK_DIR/state.json``; ``down`` stops every process it recorded, with its whole process
tree and group (vLLM's engine core and workers), and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import RunFailure
from ..process import ServerProcess, attach, http_ok, log_tail, port_free, stop_process
from .compose import STATE_FILE
from .translate import Plan, Service


class Stack:
    """The native stack of one compose file, with its state in ``plan.stack_dir``."""

    def __init__(self, plan: Plan, echo: Callable[[str], None] | None = None):
        self.plan = plan
        self.dir = Path(plan.stack_dir)
        self.echo = echo or (lambda _msg: None)

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    def read_state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def _write_state(self, state: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_path)

    def running(self) -> dict[str, Any]:
        """Recorded long-running services whose process is still alive."""
        out = {}
        for name, rec in (self.read_state().get("services") or {}).items():
            if rec.get("pid") and attach(rec["pid"], rec.get("create_time")) is not None:
                out[name] = rec
        return out

    # -- up ---------------------------------------------------------------------------------
    def up(self, timeout: float = 900.0) -> dict:
        """Start every service in dependency order; return when all are healthy (or fail).

        (Long: one polling loop with the per-state transitions written out in order.)
        """
        if self.running():
            raise RunFailure(f"a stack is already running from {self.dir} (harp-vllm stack "
                            "status / down)")
        for s in self.plan.services:
            if s.port and not port_free(s.host or "127.0.0.1", s.port):
                raise RunFailure(f"{s.name}: port {s.port} is in use; set its port variable "
                                "(see deploy/.env.example) or stop what listens there")
        logs = self.dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {"compose_file": self.plan.compose_file, "started": time.time(),
                 "services": {}, "skipped": self.plan.skipped}
        self._write_state(state)
        status: dict[str, str] = {}  # pending | started | healthy | completed
        procs: dict[str, ServerProcess] = {}
        deadline = time.monotonic() + timeout
        try:
            while True:
                for s in self.plan.services:
                    if s.name in procs:
                        continue
                    if all(self._dep_ok(status.get(d, "pending"), c)
                           for d, c in s.depends_on.items()):
                        procs[s.name] = self._start(s, logs, state)
                        status[s.name] = "started"
                        self.echo(f"started {s.name} (pid {procs[s.name].pid})"
                                  + (f" on {s.url}" if s.url else ""))
                for s in self.plan.services:
                    p = procs.get(s.name)
                    if p is None or status[s.name] in ("completed",):
                        continue
                    rc = p.poll()
                    if rc is not None:
                        if s.oneshot and rc == 0:
                            status[s.name] = "completed"
                            state["services"][s.name]["exit_code"] = 0
                            self._write_state(state)
                            self.echo(f"{s.name} completed")
                            continue
                        raise RunFailure(f"{s.name} exited with code {rc}; log "
                                        f"{state['services'][s.name]['log']}:\n"
                                        f"{log_tail(state['services'][s.name]['log'])}")
                    if status[s.name] == "started" and not s.oneshot and p.healthy():
                        status[s.name] = "healthy"
                        self.echo(f"{s.name} healthy")
                if all(status.get(s.name) in ("healthy", "completed")
                       for s in self.plan.services):
                    break
                if time.monotonic() > deadline:
                    waiting = [n for n in status if status[n] == "started"]
                    raise RunFailure(f"not healthy after {timeout:.0f} s: {', '.join(waiting)}")
                time.sleep(1.0)
        except BaseException:
            self.echo("start-up failed: stopping what was started")
            self.down()
            raise
        finally:
            for p in procs.values():  # our handles: do not leave zombies behind
                with contextlib.suppress(Exception):
                    p.poll()
        return self.status()

    @staticmethod
    def _dep_ok(state: str, condition: str) -> bool:
        if condition == "service_started":
            return state in ("started", "healthy", "completed")
        if condition == "service_healthy":
            return state == "healthy"
        return state == "completed"

    def _start(self, s: Service, logs: Path, state: dict) -> ServerProcess:
        for path, content in s.files.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content)
        for a in s.argv:  # data folders of the translated volumes
            if a.startswith("--storage.tsdb.path="):
                Path(a.split("=", 1)[1]).mkdir(parents=True, exist_ok=True)
        log = logs / f"{s.name}.log"
        # no health URL: healthy once started (the URL only names where it listens)
        p = ServerProcess(s.argv, None, {**(self.plan.base_env or os.environ), **s.env}, log,
                          cwd=Path(s.cwd), health_url=s.health_url, fresh_log=False,
                          log_command=True)
        state["services"][s.name] = {
            "pid": p.pid, "create_time": p.create_time, "argv": s.argv, "log": str(log),
            "url": s.url, "health_url": s.health_url, "oneshot": s.oneshot}
        self._write_state(state)
        return p

    # -- down / status ----------------------------------------------------------------------
    def down(self, timeout: float = 30.0) -> list[str]:
        """Stop every recorded process tree, last started first; forget the state."""
        state = self.read_state()
        stopped = []
        for name, rec in reversed(list((state.get("services") or {}).items())):
            if rec.get("pid") and stop_process(rec["pid"], rec.get("create_time"), timeout):
                stopped.append(name)
                self.echo(f"stopped {name}")
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        return stopped

    def status(self) -> dict:
        """Per service: pid, whether it runs, health, URL, log."""
        state = self.read_state()
        out = {}
        for name, rec in (state.get("services") or {}).items():
            alive = attach(rec["pid"], rec.get("create_time")) is not None
            if rec.get("oneshot") and not alive:
                st = "completed" if rec.get("exit_code") == 0 else "exited"
            elif not alive:
                st = "dead"
            elif rec.get("health_url"):
                st = "healthy" if http_ok(rec["health_url"]) else "unhealthy"
            else:
                st = "running"
            out[name] = {"state": st, "pid": rec["pid"], "url": rec.get("url"),
                         "log": rec.get("log")}
        for name, why in (state.get("skipped") or {}).items():
            out[name] = {"state": "skipped", "pid": None, "url": None, "log": None,
                         "note": why}
        return out
