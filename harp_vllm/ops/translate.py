"""The plan: the compose file's services translated into local processes (commands,
environment, ports, mounts, health URLs, start order); see ``ops.stack``."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .compose import CONDITIONS, find_compose_file, load_compose, stack_dir

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
    native_svcs = native.get("services") or {}
    services, skipped, deps = _select_services(data, native_svcs, set(profiles or []), only)
    tr, main_port = _translator(data, services, base, sdir, native.get("volumes") or {})
    out: list[Service] = []
    for name in _topo_order(list(services), {n: deps[n] for n in services}):
        out.append(_native_service(name, services, deps, native_svcs.get(name) or {}, tr,
                                   main_port.get(name), base, sdir, env))
    return Plan(compose_file=str(path), stack_dir=str(sdir), services=out, skipped=skipped,
                base_env=env)


def _select_services(data: dict, native_svcs: dict, active: set[str], only: list[str] | None
                     ) -> tuple[dict[str, dict], dict[str, str], dict[str, dict[str, str]]]:
    """(services to run, skipped service -> why, service -> its checked depends_on): the
    active profiles' services (those of ``only`` and what they depend on, when given)."""
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
    return services, skipped, deps


def _translator(data: dict, services: dict[str, dict], base: Path, sdir: Path,
                native_vols: dict) -> tuple[_Translator, dict[str, int]]:
    """The address and mount translator, and each service's main container port."""
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
    return _Translator(ports, mounts), main_port


def _native_service(name: str, services: dict[str, dict], deps: dict[str, dict[str, str]],
                    nat: dict, tr: _Translator, main: int | None, base: Path, sdir: Path,
                    env: Mapping[str, str]) -> Service:
    """Service ``name`` as a local process: command, environment, address, health URL."""
    svc = services[name]
    bin_dir = str(Path(sys.executable).parent)
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
                depends_on=deps_here, host=tr.ports[(name, main)][0] if main else None,
                port=tr.ports[(name, main)][1] if main else None, health_url=health)
    if nat.get("executable") == "prometheus" or Path(argv[0]).name == "prometheus":
        _rewrite_prometheus(s, sdir, tr)
    return s


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


def plan_summary(plan: Plan) -> list[dict]:
    """A JSON-friendly view of the plan (``harp-vllm stack config``)."""
    return [asdict(s) | {"url": s.url} for s in plan.services]
