"""The A/B load test harness: prompts, metrics parsing, report, and quick runs on real servers.

The servers are test_serve's shared pool (a dense SmolLM2 and a HARP-pruned SmolLM2 served by
the plugin, started once per session), with a small, equal KV-cache budget in bytes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_serve import MAX_LEN, get_vllm_pair, stop_vllm_pair

from harp_vllm.loadtest import outputs, summary
from harp_vllm.loadtest import server_metrics as prom
from harp_vllm.loadtest.prompts import PromptFactory
from harp_vllm.process import free_port

REPO = Path(__file__).resolve().parents[1]


def _loadtest(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harp_vllm.loadtest", *args], cwd=REPO,
                          timeout=timeout, capture_output=True, text=True)


# ---------------------------------------------------------------------------- no server

@pytest.mark.real_model
@pytest.mark.timeout(120)
def test_prompts_exact_length_unique_prefix(smollm2_dir):
    from transformers import AutoTokenizer

    from harp_vllm.evaluation.data import load_text

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    f = PromptFactory(tok, load_text("wikitext2", "test")[:400_000], seed=1)
    prompts = [f.make(n) for n in (40, 512, 513, 2048, 7168) for _ in range(3)]
    for p in prompts:
        assert len(tok(p.text)["input_ids"]) == p.tokens
    firsts = {tuple(tok(p.text)["input_ids"][:16]) for p in prompts}
    assert len(firsts) == len(prompts)  # no two prompts share their first tokens
    assert len({p.request_id for p in prompts}) == len(prompts)


METRICS_TEXT = """\
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{engine="0",model_name="m"} 3.0
vllm:num_preemptions_created{engine="0",model_name="m"} 1.7e9
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 100.0
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="128",kv_cache_size_tokens="2816",num_gpu_blocks="22"} 1.0
"""


def test_metrics_parse_and_deltas():
    snap = prom.parse(METRICS_TEXT)
    assert snap["preemptions"] == 3.0 and snap["waiting"] == 2.0
    assert snap["kv_cache_usage"] == 0.5
    assert snap["cache_info"]["kv_cache_size_tokens"] == "2816"
    after = dict(snap, preemptions=5.0, generation_tokens=164.0)
    d = prom.deltas(snap, after)
    assert d["preemptions"] == 2.0 and d["generation_tokens"] == 64.0
    assert d["prefix_cache_hits"] is None


def _fake_run(side, rep, plen, conc, tps, ttft, preempt=0, scenario="sweep"):
    stats = {"ok": 2, "failed": 0, "duration_s": 1.0, "output_tokens": 32, "prompt_tokens": 2,
             "total_tps": tps, "output_tps": tps / 10, "ttft_p50_ms": ttft,
             "itl_p50_ms": 10.0, "tpot_p50_ms": 10.0, "e2el_p50_ms": 100.0}
    return {"endpoint": side, "scenario": scenario, "repeat": rep, "prompt_len": plen,
            "concurrency": conc, "stats": stats, "requests": [],
            "server": {"preemptions": preempt, "waiting_peak": 0, "kv_cache_usage_peak": 0.5,
                       "generation_tokens": 32}}


def test_report_ratios_and_capacity(tmp_path):
    runs = []
    for rep in range(2):
        runs += [_fake_run("dense", rep, 512, 1, 100.0 + rep, 50.0),
                 _fake_run("pruned", rep, 512, 1, 150.0 + 3 * rep, 25.0)]
    for conc, dp, pp in ((2, 0, 0), (4, 1, 0), (6, 4, 2)):
        runs += [_fake_run("dense", 0, 1024, conc, 100.0, 50.0, dp, "capacity"),
                 _fake_run("pruned", 0, 1024, conc, 140.0, 40.0, pp, "capacity")]
    results = {"status": "interrupted", "message": "stopped", "config": {"output_len": 16},
               "runs": runs, "endpoints": {}}
    s = summary.summarize(results)
    pt = next(p for p in s["points"] if p["scenario"] == "sweep")
    assert pt["ratio"]["total_tps"]["median"] == pytest.approx((1.5 + 153 / 101) / 2)
    assert pt["ratio"]["ttft_p50_ms"]["median"] == pytest.approx(0.5)
    assert pt["dense"]["total_tps"] == {"median": 100.5, "min": 100.0, "max": 101.0, "n": 2}
    assert s["capacity"]["dense"]["max_concurrency_without_preemption"] == 2
    assert s["capacity"]["pruned"]["max_concurrency_without_preemption"] == 4
    paths = outputs.write_outputs(results, tmp_path, "python -m harp_vllm.loadtest ...")
    md = paths["report"].read_text()
    assert "Partial report" in md and "## Pruned / dense ratios" in md and "## Capacity" in md
    for name in ("throughput_ratio", "ttft", "capacity"):
        assert paths[name].stat().st_size > 1000
    assert json.loads(paths["json"].read_text())["summary"]["points"]


@pytest.mark.timeout(120)
def test_unreachable_url_clear_message(tmp_path):
    port = free_port()
    r = _loadtest(["--dense-url", f"http://127.0.0.1:{port}", "--pruned-url",
                   f"http://127.0.0.1:{port}/v1", "--quick", "--out", str(tmp_path),
                   "--no-progress"], timeout=100)
    assert r.returncode == 1
    assert "dense endpoint" in r.stderr and "unreachable" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "failed" and res["runs"] == []
    assert "Partial report" in (tmp_path / "report.md").read_text()


@pytest.mark.timeout(60)
def test_bad_options_clear_message(tmp_path):
    r = _loadtest(["--dense-url", "localhost:1", "--pruned-url", "http://x", "--out",
                   str(tmp_path)], timeout=50)
    assert r.returncode != 0 and "must start with http" in r.stderr
    r = _loadtest(["--dense-url", "http://a", "--pruned-url", "http://b", "--prompt-lens",
                   "1k", "--out", str(tmp_path)], timeout=50)
    assert r.returncode == 2 and "--prompt-lens" in r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------- real servers

@pytest.fixture(scope="session")
def ab_servers(tmp_path_factory, smollm2_dir):
    """(dense_url, pruned_url, pruned checkpoint): test_serve's pool, the dense SmolLM2 and a
    HARP P=8 checkpoint (``PRUNED_LAYERS``), both with the same small KV budget in bytes
    (``KV_BYTES``, binding: the capacity scenario's 4 x 1,040 tokens do not fit). Without the
    plugin the pruned server does not start: the comparison fails rather than comparing dense
    with dense."""
    pool = get_vllm_pair(tmp_path_factory.mktemp("vllm-pair-lt"), smollm2_dir)
    yield pool["dense"].url, pool["harp"].url, pool["pruned_dir"]
    stop_vllm_pair()


@pytest.mark.vllm
@pytest.mark.real_model
@pytest.mark.timeout(900)
def test_quick_run_real_servers(ab_servers, tmp_path):
    dense, pruned, pruned_dir = ab_servers
    t0 = time.time()
    # the quick profile with shorter prompts and one repeat (explicit options win over a
    # profile): every scenario and check of the quick run at about half its load
    r = _loadtest(["--dense-url", dense, "--pruned-url", pruned + "/v1", "--quick",
                   "--prompt-lens", "256,1024", "--repeats", "1",
                   "--out", str(tmp_path), "--no-progress"], timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "complete"
    cfg = res["config"]
    out_len = cfg["output_len"]
    assert (cfg["prompt_lens"], cfg["repeats"], cfg["concurrency"]) == ([256, 1024], 1, [1, 4])
    # every (scenario, length, concurrency, repeat) ran on both sides, dense first
    sweep = [x for x in res["runs"] if x["scenario"] == "sweep"]
    assert len(sweep) == 2 * len(cfg["prompt_lens"]) * len(cfg["concurrency"]) * cfg["repeats"]
    assert [x["endpoint"] for x in res["runs"][:4]] == ["dense", "pruned"] * 2
    for run in res["runs"]:
        assert run["requests"], run
        for q in run["requests"]:
            if q["ok"]:  # an ok request really got its tokens
                assert q["output_tokens"] == out_len
                assert q["prompt_tokens"] == run["prompt_len"]
                assert q["ttft"] > 0 and q["latency"] >= q["ttft"]
                assert q["text_chars"] > 0 and len(q["itl"]) >= 1
        st = run["stats"]
        assert st["ok"] + st["failed"] == run["n_requests"]
        # the server's own counters saw the tokens the client counted
        assert run["server"]["generation_tokens"] == sum(q["output_tokens"]
                                                         for q in run["requests"])
        assert run["server"]["prompt_tokens"] >= st["prompt_tokens"]
        assert run["server"]["prefix_cache_hits"] == 0  # unique prefixes: no cache help
    total_ok = sum(x["stats"]["ok"] for x in res["runs"])
    assert total_ok == sum(x["n_requests"] for x in res["runs"])
    s = res["summary"]
    assert {p["scenario"] for p in s["points"]} == {"sweep", "capacity"}
    for p in s["points"]:
        assert set(p) >= {"dense", "pruned", "ratio"}
        assert p["ratio"]["total_tps"]["median"] > 0
    for side in ("dense", "pruned"):
        c = s["checks"][side]
        assert c["ok"] == c["requests"] == c["ok_with_exact_output_tokens"]
        assert c["server_generation_tokens"] == c["client_output_tokens"]
        assert s["capacity"][side]["tested"] == [1, 2, 3, 4]
    md = (tmp_path / "report.md").read_text()
    for head in ("## Pruned / dense ratios", "## Dense", "## Pruned", "## Server metrics",
                 "## Capacity", "## Checks", "python -m harp_vllm.loadtest"):
        assert head in md
    for png in ("throughput_ratio.png", "ttft.png", "capacity.png"):
        assert (tmp_path / png).stat().st_size > 1000
    # the pruned side really is the HARP checkpoint: same KV budget, 22 of 30 layers with
    # attention, so 30/22 times the tokens fit (within a block of 128 tokens either way)
    eps = res["endpoints"]
    assert eps["pruned"]["root"] == str(pruned_dir)
    dense_tokens = int(eps["dense"]["cache_info"]["kv_cache_size_tokens"])
    pruned_tokens = int(eps["pruned"]["cache_info"]["kv_cache_size_tokens"])
    assert abs(pruned_tokens - dense_tokens * 30 / 22) <= 2 * 128, (dense_tokens, pruned_tokens)
    print(f"quick run {time.time() - t0:.0f} s")


@pytest.mark.vllm
@pytest.mark.real_model
@pytest.mark.timeout(200)
def test_wrong_model_name(ab_servers, tmp_path):
    dense, pruned, _ = ab_servers
    r = _loadtest(["--dense-url", dense, "--pruned-url", pruned, "--model-pruned", "nosuch",
                   "--quick", "--out", str(tmp_path), "--no-progress"], timeout=150)
    assert r.returncode == 1
    assert "does not serve model 'nosuch'" in r.stderr and "smollm2-harp" in r.stderr
    assert "Traceback" not in r.stderr
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"


class _FailingOpenAI(BaseHTTPRequestHandler):
    """Passes the harness's endpoint checks, then answers every streamed request with 500."""

    root = ""

    def log_message(self, *a):
        pass

    def _json(self, code, payload):
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/v1/models"):
            self._json(200, {"data": [{"id": "flaky", "root": self.root,
                                       "max_model_len": MAX_LEN}]})
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        req = json.loads(self.rfile.read(n) or b"{}")
        if req.get("stream"):
            self._json(500, {"error": "engine dead"})
        else:  # the checks: 2 tokens for "Hello", the 64-token probe for the tokenizer check
            self._json(200, {"choices": [{"text": "x"}], "usage": {
                "prompt_tokens": 64, "completion_tokens": req.get("max_tokens")}})


@pytest.mark.vllm
@pytest.mark.real_model
@pytest.mark.timeout(300)
def test_failing_endpoint_partial_report(ab_servers, smollm2_dir, tmp_path):
    dense, _, _ = ab_servers
    _FailingOpenAI.root = str(smollm2_dir)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FailingOpenAI)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        r = _loadtest(["--dense-url", dense, "--pruned-url",
                       f"http://127.0.0.1:{srv.server_port}", "--quick", "--prompt-lens", "512",
                       "--concurrency", "2", "--no-capacity", "--out", str(tmp_path),
                       "--no-progress"], timeout=250)
    finally:
        srv.shutdown()
    assert r.returncode == 1
    assert "pruned endpoint" in r.stderr and "failed all 2 requests" in r.stderr
    assert "Traceback" not in r.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "failed"
    assert [x["endpoint"] for x in res["runs"]] == ["dense", "pruned"]
    assert res["runs"][0]["stats"]["ok"] == 2 and res["runs"][1]["stats"]["failed"] == 2
    md = (tmp_path / "report.md").read_text()
    assert "Partial report" in md and "| 512 | 2 | 2 / 0 |" in md


@pytest.mark.vllm
@pytest.mark.real_model
@pytest.mark.timeout(300)
def test_ctrl_c_writes_partial_report(ab_servers, tmp_path):
    dense, pruned, _ = ab_servers
    proc = subprocess.Popen(
        [sys.executable, "-m", "harp_vllm.loadtest", "--dense-url", dense, "--pruned-url", pruned,
         "--quick", "--prompt-lens", "512", "--concurrency", "1", "--repeats", "20",
         "--no-capacity", "--out", str(tmp_path), "--no-progress"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 200
        while time.time() < deadline:
            p = tmp_path / "results.json"
            if p.exists() and len(json.loads(p.read_text()).get("runs", [])) >= 2:
                break
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "interrupted" and len(res["runs"]) >= 2
    assert "Partial report" in (tmp_path / "report.md").read_text()
    assert os.path.exists(tmp_path / "ttft.png")


def test_ctrl_c_survives_code_that_swallows_the_interrupt():
    """SIGINT sets a flag checked after every run, so a run that loses the KeyboardInterrupt
    (asyncio cancellation racing the benchmark's end) still stops the load test."""
    from harp_vllm.loadtest.ab_sequence import _CtrlC

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when run in a background job
    ctrl_c = _CtrlC()
    ctrl_c.install()
    try:
        ctrl_c.check()  # nothing yet
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            pass  # swallowed, as a cancelled asyncio run may do
        with pytest.raises(KeyboardInterrupt):
            ctrl_c.check()
    finally:
        ctrl_c.uninstall()
    assert signal.getsignal(signal.SIGINT) == before
