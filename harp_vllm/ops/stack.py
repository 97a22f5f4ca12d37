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

State (pids, ports, URLs) is kept in ``$HARP_STACK_DIR/state.json``; ``down`` stops every process
it recorded, with its whole process tree (vLLM's engine core and workers), and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RunFailure, UserError
from ..paths import cache_dir
from ..process import http_ok, log_tail, port_free

STACK_DIR_ENV = "HARP_STACK_DIR"
STATE_FILE = "state.json"
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the repository (harp_vllm/ops/../..)
DEFAULT_COMPOSE = Path("deploy") / "docker-compose.yml"
CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")


def stack_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$HARP_STACK_DIR`` or ``<model cache>/stack``."""
    env = os.environ if env is None else env
    value = env.get(STACK_DIR_ENV)
    return Path(value).expanduser() if value else cache_dir() / "stack"


def find_compose_file(path: str | Path | None = None) -> Path:
    """The compose file: ``path``, else ``deploy/docker-compose.yml`` here or in the source tree."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"compose file not found: {p}")
        return p.resolve()
    for cand in (Path.cwd() / DEFAULT_COMPOSE, SOURCE_ROOT / DEFAULT_COMPOSE):
        if cand.is_file():
            return cand.resolve()
    raise UserError(f"no {DEFAULT_COMPOSE} in {Path.cwd()} or {SOURCE_ROOT}; pass --file")


# -- compose file: .env, interpolation -----------------------------------------------------------

def read_env_file(path: Path) -> dict[str, str]:
    """A Compose ``.env`` file: ``KEY=VALUE`` lines, ``#`` comments, optional quotes."""
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        out[key] = value
    return out


_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])((?:[^{}]|\{[^{}]*\})*))?\}"
                  r"|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose variable interpolation of every string in ``value`` (recursively)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        val = env.get(name)
        if op is None:
            return val or ""
        unset_or_empty = val is None or (op.startswith(":") and val == "")
        if op.endswith("-"):
            return interpolate(arg, env) if unset_or_empty else (val or "")
        if op.endswith("?"):
            if unset_or_empty:
                raise UserError(f"compose variable {name} is required: {arg}")
            return val or ""
        return "" if unset_or_empty else interpolate(arg, env)  # "+": alternative value

    return _VAR.sub(sub, value)


def load_compose(path: Path, env: Mapping[str, str] | None = None) -> dict:
    """The compose file with variables interpolated (shell environment over ``.env``)."""
    import yaml

    merged = {**read_env_file(path.parent / ".env"), **(os.environ if env is None else env)}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        raise UserError(f"{path} has no services")
    return interpolate(data, merged)


# -- the plan ---------------------------------------------------------------------------------

@dataclass
class Service:
    """One compose service translated into a local process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: str
    oneshot: bool
    depends_on: dict[str, str]
    host: str | None = None
    port: int | None = None  # published host port (the main one)
    health_url: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # generated file -> content

    @property
    def url(self) -> str | None:
        return f"http://127.0.0.1:{self.port}" if self.port else None


@dataclass
class Plan:
    compose_file: str
    stack_dir: str
    services: list[Service]
    skipped: dict[str, str]
    # Environment the services start from (the caller's; each service adds its own on top).
    base_env: dict[str, str] = field(default_factory=dict, repr=False)

    def service(self, name: str) -> Service:
        for s in self.services:
            if s.name == name:
                return s
        raise KeyError(name)


def _parse_port(spec: Any) -> tuple[str, int, int]:
    """``[ADDR:]HOST:CONTAINER[/proto]`` -> (address, host port, container port)."""
    if isinstance(spec, dict):
        return (spec.get("host_ip") or "127.0.0.1", int(spec["published"]), int(spec["target"]))
    parts = str(spec).split("/")[0].split(":")
    if len(parts) == 3:
        return parts[0] or "127.0.0.1", int(parts[1]), int(parts[2])
    if len(parts) == 2:
        return "127.0.0.1", int(parts[0]), int(parts[1])
    raise UserError(f"port {spec!r}: the native runner needs a published host port")


def _parse_volume(spec: Any) -> tuple[str, str]:
    if isinstance(spec, dict):
        return str(spec.get("source", "")), str(spec["target"])
    parts = str(spec).split(":")
    if len(parts) < 2:
        raise UserError(f"volume {spec!r}: anonymous volumes are not supported natively")
    return parts[0], parts[1]


def _env_dict(environment: Any) -> dict[str, str]:
    if not environment:
        return {}
    if isinstance(environment, dict):
        return {str(k): "" if v is None else str(v) for k, v in environment.items()}
    out = {}
    for item in environment:
        k, _, v = str(item).partition("=")
        out[k] = v
    return out


def _depends(svc: dict) -> dict[str, str]:
    dep = svc.get("depends_on") or {}
    if isinstance(dep, list):
        return {d: "service_started" for d in dep}
    return {k: (v or {}).get("condition", "service_started") for k, v in dep.items()}


def _topo_order(names: list[str], deps: dict[str, dict[str, str]]) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(n: str) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise UserError(f"depends_on cycle at {n}")
        state[n] = 1
        for d in deps.get(n, {}):
            if d in deps:
                visit(d)
        state[n] = 2
        order.append(n)

    for n in names:
        visit(n)
    return order


class _Translator:
    """Rewrites container addresses and paths of the compose file into local ones."""

    def __init__(self, ports: dict[tuple[str, int], tuple[str, int]],
                 mounts: dict[str, dict[str, str]]):
        self.ports = ports
        self.mounts = mounts

    def addr(self, service: str, cport: int) -> str | None:
        hit = self.ports.get((service, cport))
        return f"127.0.0.1:{hit[1]}" if hit else None

    def text(self, s: str, own: str) -> str:
        def other(m: re.Match) -> str:
            name, port = m.group(1), int(m.group(2))
            if name in ("localhost", "127.0.0.1", "0.0.0.0"):
                hit = self.ports.get((own, port))
                if not hit:
                    return m.group(0)
                host = hit[0] if name == "0.0.0.0" else "127.0.0.1"
                return f"{host}:{hit[1]}"
            return self.addr(name, port) or m.group(0)

        s = re.sub(r"(?<![\w.-])([A-Za-z0-9][\w.-]*):(\d+)\b", other, s)
        for target in sorted(self.mounts.get(own, {}), key=len, reverse=True):
            host = self.mounts[own][target]

            def keep(_m: re.Match, h: str = host) -> str:  # the path, never a template
                return h

            s = re.sub(rf"(?<![\w./-]){re.escape(target)}(?=/|$|[^\w.-])", keep, s)
        return s

    def argv(self, args: list[str], own: str, cport: int | None) -> list[str]:
        out: list[str] = []
        hit = self.ports.get((own, cport)) if cport else None
        for i, a in enumerate(args):
            prev = args[i - 1] if i else ""
            if hit and prev == "--port" and a == str(cport):
                out.append(str(hit[1]))
            elif hit and prev == "--host" and a in ("0.0.0.0", "::"):
                out.append(hit[0])
            elif hit and a == f"--port={cport}":
                out.append(f"--port={hit[1]}")
            else:
                out.append(self.text(a, own))
        return out


def build_plan(compose_file: str | Path | None = None, env: Mapping[str, str] | None = None,
               profiles: list[str] | None = None,
               only: list[str] | None = None) -> Plan:
    """Translate the compose file into local processes (nothing is started)."""
    path = find_compose_file(compose_file)
    env = dict(os.environ if env is None else env)
    data = load_compose(path, env)
    base = path.parent
    sdir = stack_dir(env)
    native = data.get("x-native") or {}
    native_vols = native.get("volumes") or {}
    native_svcs = native.get("services") or {}
    active = set(profiles or [])

    services: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for name, svc in data["services"].items():
        svc = svc or {}
        prof = set(svc.get("profiles") or [])
        if prof and not prof & active and name not in (only or []):
            continue
        nat = native_svcs.get(name) or {}
        if nat.get("skip"):
            skipped[name] = str(nat["skip"])
            continue
        services[name] = svc
    deps = {n: {d: c for d, c in _depends(s).items()} for n, s in services.items()}
    for n, d in deps.items():
        for dep, cond in d.items():
            if cond not in CONDITIONS:
                raise UserError(f"{n}: unknown depends_on condition {cond!r}")
            if dep not in services and dep not in skipped:
                raise UserError(f"{n} depends on {dep}, which is not part of the stack")
    if only:
        wanted: set[str] = set()
        stack = list(only)
        while stack:
            n = stack.pop()
            if n not in services:
                raise UserError(f"unknown service {n!r} (have: {', '.join(services)})")
            if n not in wanted:
                wanted.add(n)
                stack.extend(d for d in deps[n] if d in services)
        services = {n: s for n, s in services.items() if n in wanted}

    # Addresses of the whole topology (also of services not started now: `up prometheus`).
    ports: dict[tuple[str, int], tuple[str, int]] = {}
    main_port: dict[str, int] = {}
    for name, svc in data["services"].items():
        for spec in (svc or {}).get("ports") or []:
            addr, hport, cport = _parse_port(spec)
            ports[(name, cport)] = (addr, hport)
            main_port.setdefault(name, cport)
    mounts: dict[str, dict[str, str]] = {}
    for name, svc in services.items():
        m = {}
        for spec in svc.get("volumes") or []:
            src, target = _parse_volume(spec)
            if src.startswith((".", "/", "~")):
                host = (base / Path(src).expanduser()).resolve()
            else:
                host = Path(str(native_vols.get(src) or sdir / "volumes" / src)).expanduser()
                if not host.is_absolute():
                    host = (base / host).resolve()
            m[target] = str(host)
        mounts[name] = m
    tr = _Translator(ports, mounts)
    bin_dir = str(Path(sys.executable).parent)

    out: list[Service] = []
    for name in _topo_order(list(services), {n: deps[n] for n in services}):
        svc = services[name]
        nat = native_svcs.get(name) or {}
        cmd = svc.get("command") or []
        cmd = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
        if "build" in svc:
            if not cmd:
                raise UserError(f"{name}: the native runner needs an explicit command")
            build = svc["build"]
            ctx = build if isinstance(build, str) else build.get("context", ".")
            cwd = str((base / ctx).resolve())
            argv = cmd
        elif nat.get("executable"):
            exe = shutil.which(nat["executable"])
            if exe is None:
                raise UserError(f"{name}: {nat['executable']!r} is not installed (needed to run "
                                f"{svc.get('image')} natively)")
            argv, cwd = [exe, *cmd], str(sdir)
        else:
            raise UserError(f"{name}: image {svc.get('image')!r} has no native equivalent "
                            "(x-native.services.NAME.executable or skip)")
        main = main_port.get(name)
        argv = tr.argv(argv, name, main)
        if argv and argv[0] == "python":
            argv[0] = sys.executable
        elif argv and argv[0] == "harp-vllm":
            argv[0] = str(Path(bin_dir) / "harp-vllm")
        senv = {k: tr.text(v, name) for k, v in _env_dict(svc.get("environment")).items()}
        senv["PATH"] = bin_dir + os.pathsep + env.get("PATH", os.defpath)
        senv.setdefault("PYTHONUNBUFFERED", "1")
        health = None
        hc = svc.get("healthcheck") or {}
        if hc and not hc.get("disable"):
            test = hc.get("test")
            text = " ".join(test) if isinstance(test, list) else str(test or "")
            url = re.search(r"https?://[^\s'\"]+", text)
            if url:
                health = tr.text(url.group(0), name)
        deps_here = {d: c for d, c in deps[name].items() if d in services}
        oneshot = svc.get("restart") in ("no", False) or any(
            deps[o].get(name) == "service_completed_successfully" for o in services)
        s = Service(name=name, argv=argv, env=senv, cwd=cwd, oneshot=oneshot,
                    depends_on=deps_here, host=ports[(name, main)][0] if main else None,
                    port=ports[(name, main)][1] if main else None, health_url=health)
        if nat.get("executable") == "prometheus" or Path(argv[0]).name == "prometheus":
            _rewrite_prometheus(s, sdir, tr)
        out.append(s)
    return Plan(compose_file=str(path), stack_dir=str(sdir), services=out, skipped=skipped,
                base_env=env)


def _rewrite_prometheus(s: Service, sdir: Path, tr: _Translator) -> None:
    """Point ``--config.file`` at a copy whose targets are the local addresses."""
    import yaml

    for i, a in enumerate(s.argv):
        if a.startswith("--config.file="):
            src = Path(a.split("=", 1)[1])
            if not src.is_file():
                raise UserError(f"{s.name}: Prometheus config not found: {src}")
            cfg = yaml.safe_load(src.read_text()) or {}
            for job in cfg.get("scrape_configs") or []:
                for sc in job.get("static_configs") or []:
                    sc["targets"] = [tr.text(t, s.name) for t in sc.get("targets") or []]
            out = sdir / "prometheus.yml"
            s.files[str(out)] = ("# Generated by harp-vllm stack from " + str(src) + "\n"
                                 + yaml.safe_dump(cfg, sort_keys=False))
            s.argv[i] = f"--config.file={out}"


# -- processes --------------------------------------------------------------------------------

def _proc(pid: int, create_time: float | None):
    """The psutil process ``pid`` if it is still the one started (same creation time)."""
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


def stop_tree(pid: int, create_time: float | None, timeout: float = 30.0) -> list[int]:
    """SIGTERM ``pid``'s process group and process tree, then SIGKILL what is left.

    Returns the pids that were signalled. Only that recorded process (checked by its creation
    time) and its descendants are touched.
    """
    import psutil

    root = _proc(pid, create_time)
    if root is None:
        return []
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = [root]
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGTERM)
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    if alive:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            # descendants started meanwhile
            alive += [c for p in alive for c in p.children(recursive=True)]
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
    # Reap our own direct child, if we are its parent (a test calling the API in-process).
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    return [p.pid for p in procs]


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
            if rec.get("pid") and _proc(rec["pid"], rec.get("create_time")) is not None:
                out[name] = rec
        return out

    # -- up ---------------------------------------------------------------------------------
    def up(self, timeout: float = 900.0) -> dict:
        """Start every service in dependency order; return when all are healthy (or fail)."""
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
        procs: dict[str, subprocess.Popen] = {}
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
                    if status[s.name] == "started" and not s.oneshot and (
                            s.health_url is None or http_ok(s.health_url)):
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
            for p in procs.values():  # our Popen handles: do not leave zombies behind
                with contextlib.suppress(Exception):
                    if p.poll() is not None:
                        p.wait(0)
        return self.status()

    @staticmethod
    def _dep_ok(state: str, condition: str) -> bool:
        if condition == "service_started":
            return state in ("started", "healthy", "completed")
        if condition == "service_healthy":
            return state == "healthy"
        return state == "completed"

    def _start(self, s: Service, logs: Path, state: dict) -> subprocess.Popen:
        import psutil

        for path, content in s.files.items():
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content)
        for a in s.argv:  # data folders of the translated volumes
            if a.startswith("--storage.tsdb.path="):
                Path(a.split("=", 1)[1]).mkdir(parents=True, exist_ok=True)
        log = logs / f"{s.name}.log"
        env = {**(self.plan.base_env or os.environ), **s.env}
        with open(log, "ab") as fh:
            fh.write(f"$ {shlex.join(s.argv)}\n".encode())
            fh.flush()
            p = subprocess.Popen(s.argv, cwd=s.cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            ctime = psutil.Process(p.pid).create_time()
        except psutil.NoSuchProcess:
            ctime = None
        state["services"][s.name] = {
            "pid": p.pid, "create_time": ctime, "argv": s.argv, "log": str(log),
            "url": s.url, "health_url": s.health_url, "oneshot": s.oneshot}
        self._write_state(state)
        return p

    # -- down / status ----------------------------------------------------------------------
    def down(self, timeout: float = 30.0) -> list[str]:
        """Stop every recorded process tree, last started first; forget the state."""
        state = self.read_state()
        stopped = []
        for name, rec in reversed(list((state.get("services") or {}).items())):
            if rec.get("pid") and stop_tree(rec["pid"], rec.get("create_time"), timeout):
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
            alive = _proc(rec["pid"], rec.get("create_time")) is not None
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


def plan_summary(plan: Plan) -> list[dict]:
    """A JSON-friendly view of the plan (``harp-vllm stack config``)."""
    return [asdict(s) | {"url": s.url} for s in plan.services]
