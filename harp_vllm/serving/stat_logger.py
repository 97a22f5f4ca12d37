"""HARP metrics from inside vLLM: a stat logger on vLLM's own ``/metrics``.

Installed as the ``vllm.stat_logger_plugins`` entry point ``harp_metrics``; vLLM's ``AsyncLLM``
(the API-server process) loads it next to its own Prometheus logger, so the series below are
served by the same ``/metrics`` route as the ``vllm:*`` ones, and are taken from the engine's
own per-request stats, not estimated. It works the same for a dense model (``method="dense"``,
no pruned layers), so both sides of an A/B expose the same series.

Series (``model_name`` is the served model name, as in vLLM's own series):

* ``harp_model_info{model_name, method, architecture, total_layers, attention_layers,
  pruned_layers}`` = 1
* ``harp_kv_cache_bytes_per_token{model_name, model="served"|"dense_original"}``
* ``harp_kv_cache_capacity_tokens{model_name, model="served"|"dense_original", engine}``:
  "served" is the engine's own ``kv_cache_size_tokens`` (the number in its "KV cache size: N
  tokens" log line); "dense_original" is what the same KV memory holds for the unpruned model
  (see ``harp_vllm.serving.metrics.KVLayout``).
* per finished request, by context bucket (prompt tokens) ``context``:
  ``harp_request_prefill_throughput_tokens_per_second`` (prompt tokens computed / prefill time),
  ``harp_request_decode_throughput_tokens_per_second`` (tokens after the first / decode time),
  ``harp_request_time_to_first_token_seconds``, ``harp_request_e2e_latency_seconds``,
  ``harp_requests_finished_total{finish_reason}``, ``harp_request_prompt_tokens_total``,
  ``harp_request_generation_tokens_total``.

Timings come from vLLM's ``FinishedRequestStats``: prefill time = first scheduled -> first token,
decode time = first token -> last token (both engine-core clock), e2e = arrival -> finish
(frontend clock). Time to first token is ``e2e - decode time`` (arrival -> first token, including
queueing and tokenization), because the per-request first-token latency is not part of the
finished-request record. A failure here is logged once and never breaks the server.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from vllm.v1.metrics.loggers import AggregateStatLoggerBase

from .metrics import (
    LATENCY_BUCKETS_S,
    THROUGHPUT_BUCKETS_TPS,
    KVLayout,
    context_bucket,
    kv_layout,
    zero_buckets,
)

# Under "vllm." so the lines land in the server log with vLLM's own handler and format.
logger = logging.getLogger("vllm.harp_vllm.stat_logger")

METRIC_PREFIX = "harp_"
# Set to 0 to keep the plugin installed but silent (it then registers no series).
ENABLE_ENV = "HARP_VLLM_METRICS"


def unregister_harp_metrics(registry=REGISTRY) -> None:
    """Drop earlier ``harp_*`` collectors (a second engine in one process re-creates them)."""
    for collector in list(registry._collector_to_names):
        name = getattr(collector, "_name", "")
        if isinstance(name, str) and name.startswith(METRIC_PREFIX):
            registry.unregister(collector)


def layout_from_vllm_config(vllm_config) -> KVLayout:
    """The model's ``KVLayout`` from the engine's resolved config."""
    from vllm.utils.torch_utils import get_dtype_size, kv_cache_dtype_str_to_dtype

    mc = vllm_config.model_config
    dtype = kv_cache_dtype_str_to_dtype(vllm_config.cache_config.cache_dtype, mc)
    return kv_layout(model_name=mc.served_model_name, hf_config=mc.hf_config,
                     total_layers=mc.get_total_num_hidden_layers(),
                     num_kv_heads=mc.get_total_num_kv_heads(), head_size=mc.get_head_size(),
                     dtype_bytes=get_dtype_size(dtype))


class HarpStatLogger(AggregateStatLoggerBase):
    """Exports the HARP series (see module docstring) for every engine of one API server."""

    def __init__(self, vllm_config, engine_indexes: list[int] | None = None):
        self.vllm_config = vllm_config
        self.engine_indexes = list(engine_indexes or [0])
        self.enabled = os.environ.get(ENABLE_ENV, "1") not in ("0", "false", "no")
        self._failed = False
        if not self.enabled:
            return
        try:
            self._setup()
        except Exception:  # never take the server down for a metric
            logger.exception("HARP metrics disabled: could not set them up")
            self.enabled = False

    # -- setup -------------------------------------------------------------------------------
    def _setup(self) -> None:
        unregister_harp_metrics()
        self.layout = layout_from_vllm_config(self.vllm_config)
        self.model_name = self.layout.model_name
        lay = self.layout
        mp: dict[str, Any] = {"multiprocess_mode": "mostrecent"}
        info = Gauge("harp_model_info", "Served model: pruning method and layer counts",
                     ["model_name", "method", "architecture", "total_layers",
                      "attention_layers", "pruned_layers"], **mp)
        info.labels(self.model_name, lay.method, lay.architecture, str(lay.total_layers),
                    str(lay.attention_layers),
                    ",".join(str(i) for i in lay.pruned_layers) or "none").set(1)
        bpt = Gauge("harp_kv_cache_bytes_per_token",
                    "KV-cache bytes per token (all layers) for the served model and its dense "
                    "original", ["model_name", "model"], **mp)
        bpt.labels(self.model_name, "served").set(lay.bytes_per_token)
        bpt.labels(self.model_name, "dense_original").set(lay.dense_bytes_per_token)
        self.capacity = Gauge("harp_kv_cache_capacity_tokens",
                              "KV-cache capacity in tokens (engine-reported for the served model; "
                              "same KV memory for the dense original)",
                              ["model_name", "model", "engine"], **mp)
        labels = ["model_name", "context"]
        self.prefill_tps = Histogram(
            "harp_request_prefill_throughput_tokens_per_second",
            "Per finished request: prompt tokens computed / prefill time, by context bucket",
            labels, buckets=THROUGHPUT_BUCKETS_TPS)
        self.decode_tps = Histogram(
            "harp_request_decode_throughput_tokens_per_second",
            "Per finished request: output tokens after the first / decode time, by context "
            "bucket", labels, buckets=THROUGHPUT_BUCKETS_TPS)
        self.ttft = Histogram("harp_request_time_to_first_token_seconds",
                              "Per finished request: arrival to first token, by context bucket",
                              labels, buckets=LATENCY_BUCKETS_S)
        self.e2e = Histogram("harp_request_e2e_latency_seconds",
                             "Per finished request: arrival to finish, by context bucket",
                             labels, buckets=LATENCY_BUCKETS_S)
        self.finished = Counter("harp_requests_finished",
                                "Finished requests by context bucket and finish reason",
                                [*labels, "finish_reason"])
        self.prompt_tokens = Counter("harp_request_prompt_tokens",
                                     "Prompt tokens of finished requests, by context bucket",
                                     labels)
        self.generation_tokens = Counter("harp_request_generation_tokens",
                                         "Output tokens of finished requests, by context bucket",
                                         labels)
        zero_buckets((self.prefill_tps, self.decode_tps, self.ttft, self.e2e,
                      self.prompt_tokens, self.generation_tokens), self.model_name)
        for reason in ("stop", "length"):
            zero_buckets((self.finished,), self.model_name, suffix=(reason,))
        self._set_capacity()

    def _set_capacity(self) -> bool:
        cc = self.vllm_config.cache_config
        tokens = getattr(cc, "kv_cache_size_tokens", None)
        if not tokens and cc.num_gpu_blocks:
            tokens = cc.num_gpu_blocks * cc.block_size
        if not tokens:
            return False
        for idx in self.engine_indexes:
            self.capacity.labels(self.model_name, "served", str(idx)).set(tokens)
            self.capacity.labels(self.model_name, "dense_original", str(idx)).set(
                self.layout.dense_capacity_tokens(
                    int(tokens), getattr(cc, "kv_cache_memory_bytes", None), cc.block_size))
        return True

    # -- StatLoggerBase ----------------------------------------------------------------------
    def log_engine_initialized(self) -> None:
        if self.enabled:
            try:
                if self._set_capacity():
                    lay = self.layout
                    logger.info("HARP metrics: %s (%s), %d/%d attention layers, %d KV bytes/token "
                                "(dense original %d)", self.model_name, lay.method,
                                lay.attention_layers, lay.total_layers, lay.bytes_per_token,
                                lay.dense_bytes_per_token)
            except Exception:
                self._fail("log_engine_initialized")

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        if not self.enabled or iteration_stats is None or not iteration_stats.finished_requests:
            return
        try:
            for req in iteration_stats.finished_requests:
                self._observe(req)
        except Exception:
            self._fail("record")

    def _observe(self, req) -> None:
        labels = (self.model_name, context_bucket(req.num_prompt_tokens))
        reason = getattr(req.finish_reason, "name", str(req.finish_reason)).lower()
        self.finished.labels(*labels, reason).inc()
        self.prompt_tokens.labels(*labels).inc(req.num_prompt_tokens)
        self.generation_tokens.labels(*labels).inc(req.num_generation_tokens)
        if req.num_generation_tokens <= 0:  # aborted before the first token: no timings
            return
        self.e2e.labels(*labels).observe(max(req.e2e_latency, 0.0))
        self.ttft.labels(*labels).observe(max(req.e2e_latency - req.decode_time, 0.0))
        computed = req.num_prompt_tokens - (req.num_cached_tokens or 0)
        if computed > 0 and req.prefill_time > 0:
            self.prefill_tps.labels(*labels).observe(computed / req.prefill_time)
        if req.num_generation_tokens > 1 and req.decode_time > 0:
            self.decode_tps.labels(*labels).observe(
                (req.num_generation_tokens - 1) / req.decode_time)

    def _fail(self, where: str) -> None:
        if not self._failed:
            logger.exception("HARP metrics: %s failed (further failures are silent)", where)
            self._failed = True
