"""Scrape a vLLM server's Prometheus ``/metrics``: snapshots, deltas and peaks during a run.

Counters (preemptions, prompt/generation tokens, prefix-cache hits) are compared before and
after each run; gauges (waiting and running requests, KV-cache usage) are also sampled while
the run goes on, since an idle server shows zero both before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

COUNTERS = {
    "preemptions": "vllm:num_preemptions",
    "prompt_tokens": "vllm:prompt_tokens",
    "generation_tokens": "vllm:generation_tokens",
    "prefix_cache_queries": "vllm:prefix_cache_queries",
    "prefix_cache_hits": "vllm:prefix_cache_hits",
}
GAUGES = {
    "waiting": "vllm:num_requests_waiting",
    "running": "vllm:num_requests_running",
    "kv_cache_usage": "vllm:kv_cache_usage_perc",
}
CACHE_INFO = "vllm:cache_config_info"
CACHE_INFO_KEYS = ("kv_cache_size_tokens", "num_gpu_blocks", "block_size",
                   "kv_cache_memory_bytes", "kv_cache_max_concurrency", "enable_prefix_caching")


def parse(text: str) -> dict:
    """Sum each metric of interest over its label sets; ``cache_info`` from the info metric."""
    out: dict = {"cache_info": {}}
    wanted = {v: k for k, v in {**COUNTERS, **GAUGES}.items()}
    for fam in text_string_to_metric_families(text):
        if fam.name == CACHE_INFO:
            for s in fam.samples:
                out["cache_info"] = {k: s.labels[k] for k in CACHE_INFO_KEYS if k in s.labels}
            continue
        key = wanted.get(fam.name.removesuffix("_total"))
        if key is None:
            continue
        total = 0.0
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            total += s.value
        out[key] = total
    return out


def scrape(url: str, timeout: float = 5.0) -> dict | None:
    """One snapshot of ``url`` (the ``/metrics`` address), or None if it is not a vLLM one."""
    try:
        r = httpx.get(url, timeout=timeout)
        r.raise_for_status()
        snap = parse(r.text)
    except Exception:
        return None
    if not any(k in snap for k in (*COUNTERS, *GAUGES)):
        return None
    return snap


def deltas(before: dict | None, after: dict | None) -> dict:
    """Counter increases and gauge values after the run (None where not available)."""
    res: dict = {}
    for k in COUNTERS:
        if before and after and k in before and k in after:
            res[k] = after[k] - before[k]
        else:
            res[k] = None
    for k in GAUGES:
        res[f"{k}_after"] = after.get(k) if after else None
    return res


class Sampler:
    """Polls a ``/metrics`` address in the running event loop and keeps the gauges' peaks."""

    def __init__(self, url: str | None, interval: float = 0.5):
        self.url = url
        self.interval = interval
        self.peaks: dict = {k: None for k in GAUGES}
        self.samples = 0
        self._task: asyncio.Task | None = None

    async def _loop(self) -> None:
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                t0 = time.perf_counter()
                with contextlib.suppress(Exception):
                    r = await client.get(str(self.url))
                    snap = parse(r.text)
                    for k in GAUGES:
                        if k in snap:
                            v = snap[k]
                            cur = self.peaks[k]
                            self.peaks[k] = v if cur is None else max(cur, v)
                    self.samples += 1
                await asyncio.sleep(max(0.0, self.interval - (time.perf_counter() - t0)))

    def start(self) -> None:
        if self.url:
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> dict:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return {f"{k}_peak": v for k, v in self.peaks.items()} | {"samples": self.samples}
