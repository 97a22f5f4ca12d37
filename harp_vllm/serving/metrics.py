"""Serving metrics shared by ``harp-vllm serve`` and the gateway (no vLLM import here).

* Context-length buckets: one label value per prompt-length range, the same in both places, so
  an operator can put the engine's and the gateway's series side by side.
* The KV-cache layout of a (possibly HARP-pruned) model: how many layers keep attention, KV
  bytes per token for the served model and for its dense original, and the dense original's
  capacity at the same KV-cache memory.

The vLLM stat logger that exports these from the engine lives in ``harp_vllm.serving.stat_logger``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Upper bounds (inclusive, prompt tokens) and labels; the last bucket is open.
CONTEXT_BUCKETS: tuple[tuple[int, str], ...] = (
    (1024, "<=1k"),
    (2048, "1k-2k"),
    (4096, "2k-4k"),
    (8192, "4k-8k"),
    (16384, "8k-16k"),
    (32768, "16k-32k"),
    (65536, "32k-64k"),
)
OPEN_BUCKET = ">64k"
UNKNOWN_BUCKET = "unknown"
BUCKET_LABELS: tuple[str, ...] = (*(label for _, label in CONTEXT_BUCKETS), OPEN_BUCKET)

# Histogram buckets (shared by the engine-side and the gateway-side series).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0,
                     80.0, 160.0, 320.0, 640.0)
THROUGHPUT_BUCKETS_TPS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 750, 1000,
                          2000, 5000, 10000, 20000, 50000)


def context_bucket(prompt_tokens: int | None) -> str:
    """The bucket label of a prompt of ``prompt_tokens`` tokens ("1k" = 1024 tokens).

    >>> context_bucket(1024), context_bucket(1025), context_bucket(70000), context_bucket(None)
    ('<=1k', '1k-2k', '>64k', 'unknown')
    """
    if prompt_tokens is None or prompt_tokens < 0:
        return UNKNOWN_BUCKET
    for upper, label in CONTEXT_BUCKETS:
        if prompt_tokens <= upper:
            return label
    return OPEN_BUCKET


def zero_buckets(metrics: tuple[Any, ...], *labels: str, suffix: tuple[str, ...] = ()) -> None:
    """Create the series ``labels + (bucket,) + suffix`` of each metric for every context bucket.

    A Prometheus series born with its first observation has no earlier sample, so ``rate()``
    misses the first requests of a bucket; exporting every bucket at zero from start-up avoids
    that (used by the engine-side stat logger and by the gateway).
    """
    for bucket in BUCKET_LABELS:
        for metric in metrics:
            metric.labels(*labels, bucket, *suffix)


@dataclass(frozen=True)
class KVLayout:
    """Which layers of a model keep attention (and so a KV cache), and what a token costs.

    ``bytes_per_token_layer`` is one attention layer's K and V for one token:
    ``2 * num_kv_heads * head_size * dtype_bytes`` (the same quantity vLLM's full-attention
    KV-cache spec uses to size a page). A HARP-pruned layer has no q/k projections and never
    builds an attention module, so it holds no KV cache at all; therefore

    * served bytes/token = ``bytes_per_token_layer * attention_layers``
    * dense bytes/token  = ``bytes_per_token_layer * total_layers``
      = served bytes/token * total_layers / attention_layers,

    and at the same KV-cache memory the dense original holds
    ``capacity * attention_layers / total_layers`` tokens, up to vLLM's rounding to whole
    blocks (``dense_capacity_tokens`` applies that rounding when the KV budget is known).
    """

    model_name: str
    method: str  # "dense" for an unpruned model
    architecture: str
    total_layers: int
    pruned_layers: tuple[int, ...]
    bytes_per_token_layer: int
    # Head/MLP-pruned checkpoints (amp, flap, wanda-sp) keep attention in every layer with
    # fewer KV heads; their served bytes/token is summed over the per-layer KV heads.
    served_bytes_per_token: int | None = None

    @property
    def attention_layers(self) -> int:
        return self.total_layers - len(self.pruned_layers)

    @property
    def bytes_per_token(self) -> int:
        if self.served_bytes_per_token is not None:
            return self.served_bytes_per_token
        return self.bytes_per_token_layer * self.attention_layers

    @property
    def dense_bytes_per_token(self) -> int:
        return self.bytes_per_token_layer * self.total_layers

    def dense_capacity_tokens(self, capacity_tokens: int, kv_memory_bytes: int | None = None,
                              block_size: int | None = None) -> int:
        """Tokens the dense original would hold in the same KV-cache memory.

        With the engine's KV memory budget and block size (vLLM on CPU reports both), this is
        vLLM's own rule for a full-attention model: whole blocks of
        ``block_size * dense_bytes_per_token`` bytes. Otherwise it is the bytes ratio
        ``capacity_tokens * bytes_per_token / dense_bytes_per_token`` (for HARP the layer
        ratio ``attention_layers / total_layers``).
        """
        if kv_memory_bytes and block_size and self.dense_bytes_per_token > 0:
            return (int(kv_memory_bytes) // (block_size * self.dense_bytes_per_token)
                    ) * block_size
        if self.bytes_per_token <= 0:
            return capacity_tokens
        return (capacity_tokens * self.bytes_per_token) // self.dense_bytes_per_token


def pruning_section(hf_config: Any) -> dict | None:
    """The ``harp_pruning`` section of an HF config object or dict (None for a dense model)."""
    from ..spec import CONFIG_KEY

    section = (hf_config.get(CONFIG_KEY) if isinstance(hf_config, dict)
               else getattr(hf_config, CONFIG_KEY, None))
    return section if isinstance(section, dict) else None


def kv_layout(model_name: str, hf_config: Any, total_layers: int, num_kv_heads: int,
              head_size: int, dtype_bytes: int) -> KVLayout:
    """The ``KVLayout`` of a model from its HF config and vLLM's view of its attention shape."""
    from ..pruning.costs import kv_head_bytes
    from ..spec import PruningSpec

    section = pruning_section(hf_config)
    arch_list = (hf_config.get("architectures") if isinstance(hf_config, dict)
                 else getattr(hf_config, "architectures", None)) or ["unknown"]
    head_bytes = kv_head_bytes(head_size, dtype_bytes)  # K and V of one KV head, one token
    served = None
    pruned: tuple[int, ...] = ()
    if section is None:
        method = "dense"
    else:
        spec = PruningSpec.from_dict(section, num_layers=total_layers)
        method, pruned = spec.method, spec.attention_free_layers
        if spec.shapes is not None or spec.kv_sharing:
            served = head_bytes * sum(spec.kv_heads(total_layers, num_kv_heads))
    return KVLayout(model_name=model_name, method=method, architecture=str(arch_list[0]),
                    total_layers=int(total_layers), pruned_layers=pruned,
                    bytes_per_token_layer=head_bytes * int(num_kv_heads),
                    served_bytes_per_token=served)
