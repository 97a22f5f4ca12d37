"""What an engine's KV-cache pool holds: the scheduler's KV groups (one per layer kind: full
attention or a sliding window, vLLM's hybrid manager) and how many sequences of a given
length fit in the pool at once by vLLM's own block accounting. Beside the cost model's
prediction (``pruning/costs.py``: ``served_kv_bytes_per_sequence``)."""

from __future__ import annotations

from typing import Any

from ..pruning.costs import blocks_per_sequence


def kv_groups(llm: Any) -> dict:
    """The scheduler's KV-cache groups of an in-process engine (``LLM`` with
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0``; empty otherwise): per group its layer count, block
    size and sliding window (None: full attention); all groups draw their blocks from one
    pool of ``kv_pool_blocks``."""
    core = getattr(getattr(llm.llm_engine, "engine_core", None), "engine_core", None)
    config = getattr(getattr(core, "scheduler", None), "kv_cache_config", None)
    if config is None:
        return {}
    groups = [{"layers": len(g.layer_names), "block_size": int(g.kv_cache_spec.block_size),
               "sliding_window": getattr(g.kv_cache_spec, "sliding_window", None)}
              for g in config.kv_cache_groups]
    return {"kv_groups": groups, "kv_pool_blocks": int(config.num_blocks)}


def sequences_that_fit(groups: dict, context: int) -> float:
    """How many ``context``-token sequences the pool holds at once (``groups`` from
    ``kv_groups``): a full-attention group takes ``cdiv(context, block)`` blocks per
    sequence, a sliding-window group at most ``cdiv(W - 1, block) + 1`` (blocks wholly
    outside the window are freed)."""
    need = sum(blocks_per_sequence(g["sliding_window"], context, g["block_size"])
               for g in groups["kv_groups"])
    return groups["kv_pool_blocks"] / need
