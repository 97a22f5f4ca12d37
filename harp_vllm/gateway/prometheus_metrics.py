"""The gateway's Prometheus series (own registry: several gateways can live in one process).

Labels: ``backend`` (config name), ``role`` (``primary``: the caller's request; ``shadow``: a
mirrored copy), ``context`` (bucket of the prompt length reported by the backend's ``usage``;
``unknown`` when the backend gave none, e.g. a failed request).

* ``harp_gateway_requests_total{backend, model, role, context, status}``: every request that
  reached routing (``model`` is the name the caller asked for, alias or not).
* ``harp_gateway_errors_total{backend, role, status, kind}``: failures by HTTP status the caller
  got (or would have got, for a shadow) and kind (``upstream`` error status, ``connect``,
  ``timeout``, ``deadline``, ``busy`` (no free connection within ``queue_timeout``),
  ``too_large`` reply or SSE event, ``broken`` response, ``client_disconnect``, ``internal``).
  ``status`` is always ``100``..``599`` or ``other`` (a backend's SSE error code is arbitrary).
* ``harp_gateway_rejected_total{status, reason}``: requests refused before routing (auth,
  validation, size, limits, unknown model, slow or surplus client connections).
* ``harp_gateway_prompt_tokens_total``, ``harp_gateway_output_tokens_total`` (from ``usage``).
* histograms ``harp_gateway_time_to_first_token_seconds`` and
  ``harp_gateway_inter_token_latency_seconds`` (streamed requests only: gaps between chunks
  that carry generated text), ``harp_gateway_e2e_latency_seconds`` (request received to last
  byte), ``harp_gateway_output_tokens_per_second`` (output tokens / e2e latency).
* gauges ``harp_gateway_backend_up{backend}``, ``harp_gateway_inflight_requests{backend, role}``;
  counter ``harp_gateway_shadow_dropped_total{backend}`` (mirror skipped: too many in flight).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..serving.metrics import LATENCY_BUCKETS_S, THROUGHPUT_BUCKETS_TPS, zero_buckets

ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
                 0.75, 1.0, 2.5, 5.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        base = ["backend", "role", "context"]
        self.requests = Counter("harp_gateway_requests", "Routed requests",
                                ["backend", "model", "role", "context", "status"], registry=r)
        self.errors = Counter("harp_gateway_errors", "Failed routed requests",
                              ["backend", "role", "status", "kind"], registry=r)
        self.rejected = Counter("harp_gateway_rejected", "Requests refused before routing",
                                ["status", "reason"], registry=r)
        self.prompt_tokens = Counter("harp_gateway_prompt_tokens", "Prompt tokens (backend usage)",
                                     base, registry=r)
        self.output_tokens = Counter("harp_gateway_output_tokens", "Output tokens (backend usage)",
                                     base, registry=r)
        self.ttft = Histogram("harp_gateway_time_to_first_token_seconds",
                              "Request received to first generated text (streams)", base,
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.itl = Histogram("harp_gateway_inter_token_latency_seconds",
                             "Gap between chunks carrying generated text (streams)", base,
                             buckets=ITL_BUCKETS_S, registry=r)
        self.e2e = Histogram("harp_gateway_e2e_latency_seconds",
                             "Request received to last byte from the backend", base,
                             buckets=LATENCY_BUCKETS_S, registry=r)
        self.tps = Histogram("harp_gateway_output_tokens_per_second",
                             "Output tokens / end-to-end latency per request", base,
                             buckets=THROUGHPUT_BUCKETS_TPS, registry=r)
        self.backend_up = Gauge("harp_gateway_backend_up",
                                "1 if the backend is up: its last health probe or request "
                                "reached it",
                                ["backend"], registry=r)
        self.inflight = Gauge("harp_gateway_inflight_requests", "Requests in flight",
                              ["backend", "role"], registry=r)
        self.shadow_dropped = Counter("harp_gateway_shadow_dropped",
                                      "Mirrors skipped because too many were in flight",
                                      ["backend"], registry=r)

    def init_backend(self, backend: str, shadow_target: bool = False) -> None:
        """Export ``backend``'s per-bucket series at zero from the start (see
        :func:`~harp_vllm.serving.metrics.zero_buckets`); the ``shadow`` role only for a
        backend that some ``--shadow`` mirrors to (a scrape stays small)."""
        for role in ("primary", "shadow") if shadow_target else ("primary",):
            self.inflight.labels(backend, role)
            zero_buckets((self.prompt_tokens, self.output_tokens, self.ttft, self.itl, self.e2e,
                          self.tps), backend, role)
