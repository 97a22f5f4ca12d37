"""``harp-vllm serve``: command building, the HARP stat logger, and real vLLM servers.

The real servers (dense SmolLM2 and a HARP-pruned SmolLM2, started in parallel) are started
ONCE per test session by ``vllm_pair`` and shared with tests/test_gateway.py and
tests/test_loadtest.py, which import ``get_vllm_pair`` from here (a process-wide pool, so the
files never start a second pair).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import threading
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import HarpServer

from harp_vllm.errors import UserError
from harp_vllm.process import free_port
from harp_vllm.serving import serve as serve_mod
from harp_vllm.serving.metrics import KVLayout, context_bucket, kv_layout

# The served pool's own HARP P=8 checkpoint (no alpha = 0 layer): the gateway's streaming and
# metrics tests need a model that keeps generating for a few tokens on their prompts.
PRUNED_LAYERS = {22: 0.2, 23: 0.3, 24: 0.4, 25: 0.5, 26: 0.5, 27: 0.6, 28: 0.7, 29: 0.8}
DENSE_NAME, HARP_NAME = "smollm2-dense", "smollm2-harp"
# One small KV-cache budget in bytes, the same for both servers (``VLLM_CPU_KVCACHE_SPACE``
# would override it: not passed on). tests/test_loadtest.py needs it binding: in bf16, the
# dense server fits 22 blocks of 128 tokens (2,816), the pruned one (8 of 30 layers without
# KV) 31. bf16, vLLM's choice for this fp32 checkpoint on a CPU with bf16 support: the load
# test's run takes over twice as long in fp32 here.
KV_BYTES = 64 * 2**20
MAX_LEN = 2560  # the load test's 2,048-token prompts and their output
SERVER_FLAGS = ["--enforce-eager", "--max-model-len", str(MAX_LEN), "--dtype", "bfloat16",
                "--kv-cache-memory-bytes", str(KV_BYTES), "--disable-uvicorn-access-log"]
NO_ENV = ("VLLM_CPU_KVCACHE_SPACE",)
STARTUP_TIMEOUT = 400  # two engines starting at once on 2 loaded cores


def http_get(url: str, timeout: float = 30) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric_samples(text: str, name: str) -> list[tuple[dict, float]]:
    """(labels, value) of every sample of ``name`` in a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^([^\s{]+)(?:\{(.*)\})?\s+(\S+)$", line)
        if m and m.group(1) == name:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
            out.append((labels, float(m.group(3))))
    return out


# ---------------------------------------------------------------------------------------------
# The shared pair of real servers
# ---------------------------------------------------------------------------------------------
_POOL: dict = {}
_POOL_LOCK = threading.Lock()


def _stop_pool() -> None:
    for srv in list(_POOL.get("servers", {}).values()):
        if isinstance(srv, HarpServer):
            srv.stop()
    _POOL.clear()


atexit.register(_stop_pool)


def plugin_present() -> bool:
    import importlib.util

    return (serve_mod.harp_plugin_entry() is not None
            and importlib.util.find_spec("harp_vllm.vllm_plugin") is not None)


def stop_vllm_pair() -> None:
    """Stop the shared servers (idempotent; each test file's session fixture calls it)."""
    with _POOL_LOCK:
        _stop_pool()


def get_vllm_pair(tmp_root: Path, smollm2_dir: Path) -> dict:
    """{"dense": HarpServer, "harp": HarpServer, "pruned_dir": Path}, started once.

    The pruned server is started through the real CLI (``python -m harp_vllm.cli serve``),
    the dense one through ``python -m harp_vllm.serving.serve``; both in parallel, then awaited.
    """
    with _POOL_LOCK:
        if "error" in _POOL:  # a missing part is a failure, in every test that needs it
            pytest.fail(f"vLLM servers unavailable: {_POOL['error']}", pytrace=False)
        if "servers" in _POOL:
            servers = _POOL["servers"]
            for key in ("dense", "harp"):  # a test may have killed one: bring it back
                if servers[key].proc.poll() is not None:
                    servers[key] = servers[key].restart().wait_ready(STARTUP_TIMEOUT)
            return servers
        if not plugin_present():
            _POOL["error"] = "the harp_vllm vLLM plugin is not installed"
            pytest.fail(_POOL["error"], pytrace=False)
        from harp_vllm.pruning.jobs.checkpoint import save_pruned
        from harp_vllm.pruning.reference import load_model
        from harp_vllm.spec import PruningSpec

        pruned = save_pruned(load_model(smollm2_dir),
                             PruningSpec(layers=dict(PRUNED_LAYERS), source_model="smollm2-135m"),
                             smollm2_dir, tmp_root / "smollm2-harp")
        servers = {
            "dense": HarpServer(
                [str(smollm2_dir), "--served-model-name", DENSE_NAME, *SERVER_FLAGS],
                port=free_port(), drop_env=NO_ENV, log_path=tmp_root / "dense.log"),
            "harp": HarpServer(
                [str(pruned), "--served-model-name", HARP_NAME, *SERVER_FLAGS],
                port=free_port(), drop_env=NO_ENV, log_path=tmp_root / "harp.log",
                via_cli=True),
        }
        _POOL["servers"] = {**servers, "pruned_dir": pruned}
        try:
            for srv in servers.values():
                srv.wait_ready(STARTUP_TIMEOUT)
        except Exception as e:
            _stop_pool()
            _POOL["error"] = str(e)[:2000]  # later users fail with this reason
            raise
        return _POOL["servers"]


@pytest.fixture(scope="session")
def vllm_pair(tmp_path_factory, smollm2_dir):
    yield get_vllm_pair(tmp_path_factory.mktemp("vllm-pair"), smollm2_dir)
    stop_vllm_pair()


# ---------------------------------------------------------------------------------------------
# Fast tests: no engine
# ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_context_buckets_edges():
    assert [context_bucket(n) for n in (0, 1024, 1025, 2048, 4096, 8192, 16384, 32768, 65536,
                                        65537)] == [
        "<=1k", "<=1k", "1k-2k", "1k-2k", "2k-4k", "4k-8k", "8k-16k", "16k-32k", "32k-64k",
        ">64k"]
    assert context_bucket(None) == "unknown"


@pytest.mark.timeout(30)
def test_kv_layout_dense_and_pruned():
    cfg = {"architectures": ["HarpLlamaForCausalLM"], "num_hidden_layers": 30,
           "harp_pruning": {"version": 1, "method": "harp",
                            "layers": {str(k): v for k, v in PRUNED_LAYERS.items()}}}
    lay = kv_layout("m", cfg, total_layers=30, num_kv_heads=3, head_size=64, dtype_bytes=4)
    assert (lay.method, lay.attention_layers, lay.pruned_layers) == ("harp", 22,
                                                                      tuple(range(22, 30)))
    assert lay.bytes_per_token == 2 * 3 * 64 * 4 * 22 == 33792
    assert lay.dense_bytes_per_token == 46080
    # vLLM's rule on 1 GiB with 128-token blocks: 182 dense blocks; the ratio rule without it.
    assert lay.dense_capacity_tokens(31744, 1 << 30, 128) == 23296
    assert lay.dense_capacity_tokens(31744) == 31744 * 22 // 30
    dense = kv_layout("d", {"architectures": ["LlamaForCausalLM"]}, 30, 3, 64, 4)
    assert (dense.method, dense.attention_layers, dense.bytes_per_token) == ("dense", 30, 46080)
    assert dense.dense_capacity_tokens(23296, 1 << 30, 128) == 23296



@pytest.mark.timeout(30)
def test_kv_layout_of_a_head_pruned_checkpoint():
    kv = [1] * 10 + [2] * 4 + [3] * 16  # 66 KV heads: 24 of 90 groups removed
    cfg = {"architectures": ["HarpLlamaForCausalLM"], "num_hidden_layers": 30,
           "harp_pruning": {"version": 1, "method": "flap", "layers": {}, "shapes": {
               "num_attention_heads": [3 * k for k in kv], "num_key_value_heads": kv,
               "intermediate_size": [1536] * 30}}}
    lay = kv_layout("m", cfg, total_layers=30, num_kv_heads=3, head_size=64, dtype_bytes=2)
    assert (lay.method, lay.attention_layers, lay.pruned_layers) == ("flap", 30, ())
    assert lay.bytes_per_token == 2 * 64 * 2 * 66 == 16896
    assert lay.dense_bytes_per_token == 23040
    assert lay.dense_capacity_tokens(90 * 128) == 66 * 128


@pytest.mark.timeout(30)
def test_build_command_resolves_known_name(monkeypatch, smollm2_dir):
    cmd = serve_mod.build_command(["smollm2-135m", "--port", "9", "--enforce-eager"],
                                  python="py")
    assert cmd[:3] == ["py", "-m", "harp_vllm.serving.serve"]
    assert cmd[cmd.index("--model") + 1] == str(smollm2_dir)
    assert cmd[cmd.index("--served-model-name") + 1] == "smollm2-135m"
    assert cmd[-3:] == ["--port", "9", "--enforce-eager"]
    # An explicit served name wins; --model X works like a positional MODEL.
    cmd = serve_mod.build_command(["--model", "smollm2-135m", "--served-model-name", "x"])
    assert cmd.count("--served-model-name") == 1 and "x" in cmd
    # Anything else (a hub id) goes to vLLM unchanged.
    assert serve_mod.build_command(["org/model"])[4] == "org/model"
    with pytest.raises(UserError, match="no model"):
        serve_mod.build_command(["--port", "1"])


@pytest.mark.timeout(30)
def test_env_flags_are_appended_unless_the_command_line_sets_them():
    env = {"HARP_VLLM_ARGS": "--max-num-seqs 4 --kv-cache-dtype fp8 --enable-prefix-caching"}
    cmd = serve_mod.build_command(["org/model", "--kv-cache-dtype=auto", "--port", "9"],
                                  python="py", env=env)
    assert cmd[4:] == ["org/model", "--kv-cache-dtype=auto", "--port", "9",
                       "--max-num-seqs", "4", "--enable-prefix-caching"]
    # the server process builds its command again from the first: nothing doubles
    assert serve_mod.build_command(cmd[3:], python="py", env=env) == cmd
    assert serve_mod.build_command(["org/model"], python="py", env={"HARP_VLLM_ARGS": ""}
                                   ) == ["py", "-m", "harp_vllm.serving.serve", "--model",
                                         "org/model"]
    assert serve_mod.env_flags({"HARP_VLLM_ARGS": "--a 'x y'"}) == ["--a", "x y"]
    with pytest.raises(UserError, match="HARP_VLLM_ARGS is not a valid flag list"):
        serve_mod.build_command(["org/model"], env={"HARP_VLLM_ARGS": "--a 'x"})
    with pytest.raises(UserError, match="must hold vLLM flags"):
        serve_mod.build_command(["org/model"], env={"HARP_VLLM_ARGS": "4 --max-num-seqs"})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("config", [
    {"architectures": ["HarpLlamaForCausalLM"], "harp_pruning": {"version": 1, "layers": {}}},
    {"architectures": ["HarpQwen2ForCausalLM"]},  # a HARP architecture (families.py) alone
])
def test_harp_checkpoint_without_plugin_is_refused(tmp_path, monkeypatch, config):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(serve_mod, "harp_plugin_entry", lambda: None)
    with pytest.raises(UserError, match="plugin is not installed"):
        serve_mod.build_command([str(d)])


@pytest.mark.timeout(30)
def test_vllm_plugins_filter_keeps_ours():
    env = serve_mod.serving_env({"VLLM_PLUGINS": "other"})
    names = env["VLLM_PLUGINS"].split(",")
    assert names[0] == "other" and "harp_metrics" in names
    assert "VLLM_PLUGINS" not in serve_mod.serving_env({})


@pytest.mark.timeout(60)
def test_stat_logger_records_engine_stats():
    """The logger's series from vLLM's own stats objects (no engine needed)."""
    from prometheus_client import REGISTRY
    from vllm.v1.engine import FinishReason
    from vllm.v1.metrics.stats import FinishedRequestStats, IterationStats

    from harp_vllm.serving.stat_logger import HarpStatLogger, unregister_harp_metrics

    hf = SimpleNamespace(architectures=["HarpLlamaForCausalLM"], num_hidden_layers=30,
                         harp_pruning={"version": 1, "method": "harp",
                                       "layers": {str(k): v for k, v in PRUNED_LAYERS.items()}})
    mc = SimpleNamespace(served_model_name="unit", hf_config=hf, dtype=__import__("torch").float32,
                         get_total_num_hidden_layers=lambda: 30,
                         get_total_num_kv_heads=lambda: 3, get_head_size=lambda: 64)
    cc = SimpleNamespace(cache_dtype="auto", kv_cache_size_tokens=31744, num_gpu_blocks=248,
                         block_size=128, kv_cache_memory_bytes=1 << 30)
    try:
        lg = HarpStatLogger(SimpleNamespace(model_config=mc, cache_config=cc), [0])
        assert lg.enabled
        lg.log_engine_initialized()
        it = IterationStats()
        it.finished_requests.append(FinishedRequestStats(
            finish_reason=FinishReason.LENGTH, e2e_latency=2.0, num_prompt_tokens=1500,
            num_generation_tokens=11, prefill_time=0.5, decode_time=1.0, num_cached_tokens=0))
        lg.record(None, it)
        v = REGISTRY.get_sample_value
        lab = {"model_name": "unit", "context": "1k-2k"}
        assert v("harp_kv_cache_bytes_per_token", {"model_name": "unit", "model": "served"}
                 ) == 33792
        assert v("harp_kv_cache_capacity_tokens", {"model_name": "unit", "engine": "0",
                                                   "model": "dense_original"}) == 23296
        assert v("harp_request_prefill_throughput_tokens_per_second_sum", lab) == 3000.0
        assert v("harp_request_decode_throughput_tokens_per_second_sum", lab) == 10.0
        assert v("harp_request_time_to_first_token_seconds_sum", lab) == 1.0
        assert v("harp_request_e2e_latency_seconds_sum", lab) == 2.0
        assert v("harp_requests_finished_total", {**lab, "finish_reason": "length"}) == 1
        # A broken stats object is logged, never raised into vLLM.
        lg.record(None, SimpleNamespace(finished_requests=[object()]))
    finally:
        unregister_harp_metrics()


# ---------------------------------------------------------------------------------------------
# Real servers
# ---------------------------------------------------------------------------------------------
def _openai(srv):
    from openai import OpenAI

    return OpenAI(base_url=srv.url + "/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.mark.vllm
@pytest.mark.real_model
@pytest.mark.timeout(STARTUP_TIMEOUT + 120)
def test_serve_health_and_models(vllm_pair):
    for key, name in (("dense", DENSE_NAME), ("harp", HARP_NAME)):
        srv = vllm_pair[key]
        assert http_get(srv.url + "/health")[0] == 200
        status, body = http_get(srv.url + "/v1/models")
        assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == [name]


@pytest.mark.vllm
@pytest.mark.real_model
@pytest.mark.timeout(STARTUP_TIMEOUT + 180)
def test_pruned_serve_with_openai_client(vllm_pair):
    client = _openai(vllm_pair["harp"])
    assert [m.id for m in client.models.list()] == [HARP_NAME]
    c = client.completions.create(model=HARP_NAME, prompt="The capital of France is",
                                  max_tokens=8, temperature=0)
    assert c.choices[0].text and 1 <= c.usage.completion_tokens <= 8
    chat = client.chat.completions.create(
        model=HARP_NAME, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
        temperature=0)
    assert chat.choices[0].message.content and chat.usage.prompt_tokens > 5
    pieces = [ch.choices[0].text for ch in client.completions.create(
        model=HARP_NAME, prompt="One, two, three,", max_tokens=6, temperature=0, stream=True)
        if ch.choices]
    assert len(pieces) >= 3 and "".join(pieces)
    deltas = [ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model=HARP_NAME, messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=6, temperature=0, stream=True) if ch.choices]
    assert sum(1 for d in deltas if d) >= 3


def _engine_log_capacity(srv) -> int:
    m = re.search(r"KV cache size: ([\d,]+) tokens", srv.log_path.read_text(errors="replace"))
    assert m, "no 'KV cache size' line in the engine log"
    return int(m.group(1).replace(",", ""))


@pytest.mark.vllm
@pytest.mark.real_model
@pytest.mark.timeout(STARTUP_TIMEOUT + 120)
def test_metrics_have_vllm_and_harp_series(vllm_pair):
    dense, harp = vllm_pair["dense"], vllm_pair["harp"]
    client = _openai(dense)
    client.completions.create(model=DENSE_NAME, prompt="Hello there", max_tokens=4,
                              temperature=0)
    _openai(harp).completions.create(model=HARP_NAME, prompt="Hello there", max_tokens=4,
                                     temperature=0)
    texts = {k: http_get(s.url + "/metrics")[1] for k, s in (("dense", dense), ("harp", harp))}
    for text in texts.values():
        assert metric_samples(text, "vllm:num_requests_running")
        assert metric_samples(text, "vllm:cache_config_info")

    (info, _), = metric_samples(texts["harp"], "harp_model_info")
    assert info["method"] == "harp" and info["model_name"] == HARP_NAME
    assert (info["total_layers"], info["attention_layers"]) == ("30", "22")
    assert info["pruned_layers"] == ",".join(str(i) for i in sorted(PRUNED_LAYERS))
    (dinfo, _), = metric_samples(texts["dense"], "harp_model_info")
    assert (dinfo["method"], dinfo["attention_layers"], dinfo["pruned_layers"]) == (
        "dense", "30", "none")

    def capacity(text, which):
        return next(v for lab, v in metric_samples(text, "harp_kv_cache_capacity_tokens")
                    if lab["model"] == which)

    def bpt(text, which):
        return next(v for lab, v in metric_samples(text, "harp_kv_cache_bytes_per_token")
                    if lab["model"] == which)

    for key, srv in (("dense", dense), ("harp", harp)):
        engine = _engine_log_capacity(srv)
        assert capacity(texts[key], "served") == engine
        (cc, _), = metric_samples(texts[key], "vllm:cache_config_info")
        assert int(cc["kv_cache_size_tokens"]) == engine
    # The pruned server's "dense original" is exactly what the dense server really got.
    assert capacity(texts["harp"], "dense_original") == capacity(texts["dense"], "served")
    assert bpt(texts["harp"], "dense_original") == bpt(texts["dense"], "served")
    assert bpt(texts["harp"], "served") * 30 == bpt(texts["harp"], "dense_original") * 22
    assert capacity(texts["harp"], "served") > capacity(texts["dense"], "served") * 1.3

    for text, name in ((texts["dense"], DENSE_NAME), (texts["harp"], HARP_NAME)):
        for series in ("harp_request_prefill_throughput_tokens_per_second_count",
                       "harp_request_decode_throughput_tokens_per_second_count",
                       "harp_request_time_to_first_token_seconds_count",
                       "harp_request_e2e_latency_seconds_count"):
            got = {lab["context"]: v for lab, v in metric_samples(text, series)
                   if lab["model_name"] == name}
            assert got.get("<=1k", 0) >= 1, series


@pytest.mark.timeout(60)
def test_serve_cli_rejects_missing_model():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "harp_vllm.cli", "serve", "/no/such/dir"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "NO_COLOR": "1"})
    assert r.returncode == 2 and "error:" in r.stderr


def test_kvlayout_capacity_rules():
    """HARP P=8 of 30 layers: 22 layers hold KV, so the dense original fits 30/22 fewer
    tokens; with vLLM's budget and block size the count is whole dense blocks."""
    per_layer = 2 * 3 * 64 * 4  # K and V, 3 KV heads of 64, fp32
    lay = KVLayout("m", "harp", "A", 30, tuple(range(22, 30)), per_layer)
    assert lay.attention_layers == 22
    assert lay.bytes_per_token == per_layer * 22
    assert lay.dense_bytes_per_token == per_layer * 30
    assert lay.dense_capacity_tokens(3000) == 2200
    budget = per_layer * 30 * 16 * 10 + 123  # ten dense blocks of 16 tokens, plus change
    assert lay.dense_capacity_tokens(0, kv_memory_bytes=budget, block_size=16) == 160
    dense = KVLayout("m", "dense", "A", 30, (), per_layer)
    assert dense.dense_capacity_tokens(3000) == 3000
    heads = KVLayout("m", "flap", "A", 30, (), per_layer, served_bytes_per_token=per_layer * 20)
    assert heads.dense_capacity_tokens(3000) == 2000
