"""The load-test scenario files (``loadtest/profiles``, ``loadtest/comparisons``) and the
``--profile``/``--comparison``/``--quick`` options that read them. No engine: the command runs
in process up to ``run_loadtest`` (replaced to capture the ``Config``), and once against two
``tests/fake_backend.py`` processes through the endpoint checks."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from harp_vllm.loadtest import ab_sequence, outputs
from harp_vllm.loadtest.command import app
from harp_vllm.loadtest.endpoints import Endpoint, EndpointError, check_endpoint
from harp_vllm.loadtest.scenario_files import (
    PROFILE_DIR,
    load_comparison,
    load_profile,
    profile_path,
)
from harp_vllm.loadtest.scenarios import PROFILE_KEYS, Config, plan
from harp_vllm.ops.translate import build_plan
from harp_vllm.process import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[1]
PROFILES = sorted((REPO / "loadtest" / "profiles").glob("*.toml"))
COMPARISONS = sorted((REPO / "loadtest" / "comparisons").glob("*.toml"))
PAIR = ("--dense-url", "http://127.0.0.1:1", "--pruned-url", "http://127.0.0.1:2")


def _run(args: list[str], monkeypatch) -> tuple[object, Config | None]:
    """The command in process; returns (CliRunner result, the Config it would run)."""
    seen: list[Config] = []

    def fake_run(cfg, out, progress=True, on_update=None):
        seen.append(cfg)
        return {"status": "complete", "message": None, "runs": []}

    monkeypatch.setattr(ab_sequence, "run_loadtest", fake_run)
    monkeypatch.setattr(outputs, "write_outputs", lambda *a, **k: {})
    res = CliRunner().invoke(app, [*args, "--out", "/tmp/unused-loadtest-out"])
    return res, (seen[0] if seen else None)


def _load(cfg: Config) -> dict:
    return {k: getattr(cfg, k) for k in PROFILE_KEYS}


# -- the shipped files ------------------------------------------------------------------------

def test_the_package_reads_the_top_level_profiles():
    assert PROFILE_DIR.resolve() == (REPO / "loadtest" / "profiles").resolve()
    assert {p.stem for p in PROFILES} >= {"quick", "full", "long-7k"}
    assert len(COMPARISONS) >= 2


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_every_profile_is_valid(path):
    load = load_profile(path)
    assert set(load) == set(PROFILE_KEYS)
    cfg = Config(dense_url="http://a", pruned_url="http://b", **load)
    # SmolLM2's context: every shipped profile fits it, but the ones for Gemma 3's 32k
    context = 32768 if path.name.startswith("capacity-32k") else 8192
    steps, notes = plan(cfg, context)
    assert steps and not notes
    if context > 8192:  # and it really needs the long context: nothing of it fits 8k
        assert not plan(cfg, 8192)[0]


def test_long_profile_is_capacity_bound_at_7168():
    load = load_profile(profile_path("long-7k"))
    assert load["prompt_lens"] == [4096, 7168] and load["capacity"]
    assert load["capacity_prompt_len"] == 7168
    # docs/results.md: 13.0 dense vs 16.7 plan27 sequences of 7,168 tokens (4 GiB KV space)
    assert min(load["capacity_concurrency"]) < 13 and max(load["capacity_concurrency"]) > 17


@pytest.mark.parametrize("path", COMPARISONS, ids=lambda p: p.name)
def test_every_comparison_is_valid(path):
    comp = load_comparison(path)
    assert comp.profile.parent.resolve() == PROFILE_DIR.resolve()
    for side in (comp.dense, comp.pruned):
        assert side.url.startswith("http") and side.model and side.metrics_url


def _flags(command: str) -> dict[str, str]:
    return dict(re.findall(r"(--[a-z-]+) (\S+)", command))


def test_comparisons_match_the_compose_and_native_stacks(tmp_path):
    """compose-gateway.toml is the compose loadtest service's pair, native-gateway.toml the same
    service as ``harp-vllm stack`` runs it (the .env defaults' model names)."""
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    svc = compose["services"]["loadtest"]
    defaults = {k: re.fullmatch(r"\$\{\w+:-(.*)\}", v)[1] for k, v in svc["environment"].items()
                if k in ("HARP_MODEL", "HARP_PRUNED_NAME")}
    native = build_plan(REPO / "deploy" / "docker-compose.yml",
                        env={"HARP_STACK_DIR": str(tmp_path)}, profiles=["loadtest"],
                        only=["loadtest"]).service("loadtest")
    for name, command in (("compose-gateway", svc["command"][-1]),
                          ("native-gateway", native.argv[-1])):
        f = _flags(command)
        comp = load_comparison(REPO / "loadtest" / "comparisons" / f"{name}.toml")
        assert (comp.dense.url, comp.pruned.url) == (f["--dense-url"], f["--pruned-url"])
        assert (comp.dense.metrics_url, comp.pruned.metrics_url) == (
            f["--metrics-url-dense"], f["--metrics-url-pruned"])
        assert (comp.dense.model, comp.pruned.model) == (defaults["HARP_MODEL"],
                                                         defaults["HARP_PRUNED_NAME"])


def test_dockerfiles_build_with_the_profiles():
    """The images install the package from a copy of the repository: the symlinked profiles
    need loadtest/ in it before the install, or the wheel ships no profiles."""
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (REPO / "docker" / name).read_text()
        copy = text.index("COPY loadtest ./loadtest")
        assert text.index("COPY harp_vllm ./harp_vllm") < copy
        assert re.search(r"^RUN .*pip install (--no-deps )?\.( |$)", text[copy:], re.M), name


# -- the options ------------------------------------------------------------------------------

def test_quick_runs_the_quick_profile_and_the_default_is_full(monkeypatch):
    res, cfg = _run([*PAIR, "--quick"], monkeypatch)
    assert res.exit_code == 0, res.output
    assert _load(cfg) == load_profile(profile_path("quick"))
    assert cfg.profile == str(profile_path("quick"))
    _, cfg = _run(list(PAIR), monkeypatch)
    assert _load(cfg) == load_profile(profile_path("full"))
    _, cfg = _run([*PAIR, "--profile", str(REPO / "loadtest/profiles/long-7k.toml")], monkeypatch)
    assert _load(cfg) == load_profile(profile_path("long-7k"))


def test_comparison_gives_endpoints_and_profile(monkeypatch):
    path = REPO / "loadtest" / "comparisons" / "native-gateway.toml"
    comp = load_comparison(path)
    res, cfg = _run(["--comparison", str(path)], monkeypatch)
    assert res.exit_code == 0, res.output
    assert (cfg.dense_url, cfg.model_dense, cfg.metrics_url_dense) == (
        comp.dense.url, comp.dense.model, comp.dense.metrics_url)
    assert (cfg.pruned_url, cfg.model_pruned, cfg.metrics_url_pruned) == (
        comp.pruned.url, comp.pruned.model, comp.pruned.metrics_url)
    assert _load(cfg) == load_profile(comp.profile) and cfg.comparison == str(path)


def test_explicit_options_win_over_the_files(monkeypatch):
    path = REPO / "loadtest" / "comparisons" / "native-gateway.toml"
    comp = load_comparison(path)
    res, cfg = _run(["--comparison", str(path), "--profile", "long-7k", "--concurrency", "2,3",
                     "--no-capacity", "--output-len", "5", "--repeats", "1",
                     "--capacity-concurrency", "7", "--model-pruned", "other",
                     "--dense-url", "http://127.0.0.1:9/v1",
                     "--metrics-url-pruned", "http://127.0.0.1:10/metrics"], monkeypatch)
    assert res.exit_code == 0, res.output
    long = load_profile(profile_path("long-7k"))
    assert _load(cfg) == long | {"concurrency": [2, 3], "capacity": False, "output_len": 5,
                                 "repeats": 1, "capacity_concurrency": [7]}
    assert (cfg.dense_url, cfg.model_dense) == ("http://127.0.0.1:9/v1", comp.dense.model)
    assert (cfg.pruned_url, cfg.model_pruned) == (comp.pruned.url, "other")
    assert cfg.metrics_url_pruned == "http://127.0.0.1:10/metrics"
    _, cfg = _run(["--comparison", str(path), "--quick"], monkeypatch)  # over full
    assert _load(cfg) == load_profile(profile_path("quick"))
    _, cfg = _run([*PAIR, "--quick", "--capacity"], monkeypatch)
    assert cfg.capacity is True


# -- bad files --------------------------------------------------------------------------------

GOOD_PROFILE = (REPO / "loadtest" / "profiles" / "quick.toml").read_text()
GOOD_COMPARISON = """profile = "quick"
[dense]
url = "http://127.0.0.1:1"
[pruned]
url = "http://127.0.0.1:2"
model = "m"
"""

BAD_PROFILES = [  # (file text, what the message names)
    (GOOD_PROFILE + "rate = 3\n", "unknown key 'rate'"),
    (GOOD_PROFILE.replace("output_len = 16", "output_len = \"16\""), "output_len must be"),
    (GOOD_PROFILE.replace("output_len = 16", "output_len = 0"), "output_len must be"),
    (GOOD_PROFILE.replace("repeats = 2", "repeats = 2.5"), "repeats must be"),
    (GOOD_PROFILE.replace("prompt_lens = [512, 2048]", "prompt_lens = 512"), "prompt_lens must"),
    (GOOD_PROFILE.replace("concurrency = [1, 4]", "concurrency = []"), "concurrency must"),
    (GOOD_PROFILE.replace("capacity = true", "capacity = 1"), "capacity must be true or false"),
    (GOOD_PROFILE.replace("capacity_waves = 1", ""), "missing key 'capacity_waves'"),
    (GOOD_PROFILE + "[[x\n", "not valid TOML"),
]


@pytest.mark.parametrize("text,named", BAD_PROFILES)
def test_bad_profile_clear_error(text, named, tmp_path, monkeypatch):
    path = tmp_path / "p.toml"
    path.write_text(text)
    res, cfg = _run([*PAIR, "--profile", str(path)], monkeypatch)
    assert res.exit_code == 2 and cfg is None
    assert f"error: {path}: " in res.output and named in res.output, res.output
    assert isinstance(res.exception, SystemExit)  # a clean exit, not a traceback


BAD_COMPARISONS = [
    ("extra = 1\n" + GOOD_COMPARISON, "unknown key 'extra'"),
    (GOOD_COMPARISON + 'metrics = "http://x"\n', "unknown key 'pruned.metrics'"),
    (GOOD_COMPARISON.replace('profile = "quick"', ""), "missing key 'profile'"),
    (GOOD_COMPARISON.replace('profile = "quick"', 'profile = "nope"'), "no profile named"),
    (GOOD_COMPARISON.replace('profile = "quick"', 'profile = "missing.toml"'),
     "missing.toml: no such file"),
    (GOOD_COMPARISON.replace("[dense]\nurl", "[dense]\nuri"), "unknown key 'dense.uri'"),
    (GOOD_COMPARISON.replace("[dense]\n", "[densr]\n"), "unknown key 'densr'"),
    (GOOD_COMPARISON.replace('model = "m"', "model = 3"), "pruned.model must be"),
    (GOOD_COMPARISON.replace("http://127.0.0.1:1", "ftp://127.0.0.1:1"),
     "dense.url must start with http"),
    ('api_key = "sk-secret"\n' + GOOD_COMPARISON, "api_key: API keys are not stored"),
    (GOOD_COMPARISON + 'token = "sk-secret"\n', "pruned.token: API keys are not stored"),
]


@pytest.mark.parametrize("text,named", BAD_COMPARISONS)
def test_bad_comparison_clear_error(text, named, tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text(text)
    res, cfg = _run(["--comparison", str(path)], monkeypatch)
    assert res.exit_code == 2 and cfg is None
    assert f"error: {path}: " in res.output and named in res.output, res.output
    assert "sk-secret" not in res.output


def test_comparison_profile_path_is_relative_to_the_file(tmp_path, monkeypatch):
    (tmp_path / "mine.toml").write_text(GOOD_PROFILE.replace("[512, 2048]", "[100]"))
    path = tmp_path / "c.toml"
    path.write_text(GOOD_COMPARISON.replace('"quick"', '"mine.toml"'))
    res, cfg = _run(["--comparison", str(path)], monkeypatch)
    assert res.exit_code == 0, res.output
    assert cfg.prompt_lens == [100] and cfg.profile == str(tmp_path / "mine.toml")


@pytest.mark.parametrize("key", ["url", "metrics_url"])
def test_credentials_in_a_comparison_url_are_refused(key, tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text(GOOD_COMPARISON + f'{key} = "http://bob:hunter2@127.0.0.1:2/x"\n'
                    if key == "metrics_url" else
                    GOOD_COMPARISON.replace("http://127.0.0.1:2", "http://bob:hunter2@h:2"))
    res, cfg = _run(["--comparison", str(path)], monkeypatch)
    assert res.exit_code == 2 and cfg is None
    assert f"{path}: pruned.{key}: a URL with credentials" in res.output, res.output
    assert "hunter2" not in res.output


def test_credentials_in_an_option_url_are_refused(monkeypatch):
    res, cfg = _run(["--dense-url", "http://bob:hunter2@127.0.0.1:1", "--pruned-url",
                     "http://127.0.0.1:2"], monkeypatch)
    assert res.exit_code == 2 and cfg is None
    assert "--dense-url: a URL with credentials" in res.output and "hunter2" not in res.output


def test_missing_urls_and_conflicting_options(monkeypatch):
    res, _ = _run(["--pruned-url", "http://127.0.0.1:2"], monkeypatch)
    assert res.exit_code == 2 and "--dense-url is required" in res.output
    res, _ = _run([*PAIR, "--quick", "--profile", "full"], monkeypatch)
    assert res.exit_code == 2 and "--quick or --profile" in res.output
    res, _ = _run([*PAIR, "--profile", "nope"], monkeypatch)
    assert res.exit_code == 2 and "no profile named 'nope'" in res.output


@pytest.mark.timeout(60)
def test_cli_bad_file_no_traceback(tmp_path):
    """The real command line (not the in-process runner): one line, exit 2."""
    path = tmp_path / "c.toml"
    path.write_text(GOOD_COMPARISON.replace("http://127.0.0.1:1", "https://u:pw@h"))
    r = subprocess.run([sys.executable, "-m", "harp_vllm.loadtest", "--comparison", str(path)],
                       cwd=REPO, capture_output=True, text=True, timeout=50)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (f"error: {path}: dense.url: a URL with credentials "
                                "(user:password@host) is refused; API keys are not stored in "
                                "scenario files: export OPENAI_API_KEY (sent as a Bearer token "
                                "to both endpoints)")


# -- API key from the environment -------------------------------------------------------------

class _KeyedServer(BaseHTTPRequestHandler):
    """/v1/models and /v1/completions that answer 401 without ``Bearer sk-test``."""

    def _reply(self, body: dict) -> None:
        if self.headers.get("Authorization") != "Bearer sk-test":
            self.send_response(401)
            self.end_headers()
            return
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self._reply({"data": [{"id": "m"}]})

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._reply({"usage": {"completion_tokens": 2, "prompt_tokens": 1}})

    def log_message(self, *args):
        pass


def test_endpoint_checks_send_openai_api_key(monkeypatch):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _KeyedServer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_port}"
    try:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        with pytest.raises(EndpointError, match="HTTP 401"):
            check_endpoint(Endpoint("dense", url, metrics_url=url + "/metrics"), 5)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        ep = Endpoint("dense", url, metrics_url=url + "/metrics")
        check_endpoint(ep, 5)
        assert ep.served_model == "m"
    finally:
        srv.shutdown()


# -- end to end against fake backends --------------------------------------------------------

@pytest.mark.timeout(120)
def test_comparison_reaches_the_endpoints(tmp_path, monkeypatch):
    """A comparison file against two fake OpenAI servers: its URLs and model names are the
    ones checked, its tokenizer the one loaded (a missing one here: the run stops there)."""
    ports = {"dense": free_port(), "pruned": free_port()}
    procs: list[ServerProcess] = []
    try:
        for label, port in ports.items():
            procs.append(ServerProcess([sys.executable, str(REPO / "tests" / "fake_backend.py"),
                                        "--port", str(port), "--model", f"fake-{label}"],
                                       f"http://127.0.0.1:{port}", poll=0.2))
        for p in procs:
            p.wait_ready(60)
        path = tmp_path / "fake.toml"
        path.write_text(
            f'profile = "quick"\ntokenizer = "{tmp_path}/no-tokenizer"\n' + "".join(
                f'[{label}]\nurl = "http://127.0.0.1:{port}/v1"\nmodel = "fake-{label}"\n'
                f'metrics_url = "http://127.0.0.1:{port}/metrics"\n'
                for label, port in ports.items()))
        out = tmp_path / "out"
        res = CliRunner().invoke(app, ["--comparison", str(path), "--out", str(out),
                                       "--no-progress", "--no-plots"])
        assert res.exit_code == 1, res.output
        assert "could not load the tokenizer" in res.output
        results = json.loads((out / "results.json").read_text())
        for label, port in ports.items():
            ep = results["endpoints"][label]
            assert (ep["url"], ep["model"]) == (f"http://127.0.0.1:{port}", f"fake-{label}")
        assert results["tokenizer"] == f"{tmp_path}/no-tokenizer"
        assert results["config"]["comparison"] == str(path)
        assert results["config"]["prompt_lens"] == load_profile(profile_path("quick"))[
            "prompt_lens"]
    finally:
        for p in procs:
            p.stop(10)
