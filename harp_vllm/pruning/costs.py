"""The cost model: KV bytes, parameters and multiply-adds per token of every layer choice.

One place for the arithmetic the planner budgets with and the reports predict speed-ups from.
Per decoder layer and token (``d`` hidden size, ``H``/``G`` query/KV heads, ``h`` head dim,
``I`` MLP width, ``V`` vocabulary, ``N`` context length), in multiply-adds (MACs):

- attention projections: ``q`` ``d*H*h``, ``k`` and ``v`` ``d*G*h`` each, ``o`` ``H*h*d``;
- attention core (``QK^T`` and ``AV``): ``2*H*h*n`` for a token attending to ``n`` tokens.
  Prefilling ``N`` tokens causally costs ``H*h*N*(N+1)`` over the prompt, i.e.
  ``H*h*(N+1)`` per token; decoding one token at context ``N`` costs ``2*H*h*N``. A layer
  with a sliding window ``W`` attends to ``min(n, W)`` tokens: prefill
  ``2*H*h*(W*(W+1)/2 + (N-W)*W)/N`` per token when ``N > W``, decode ``2*H*h*min(N, W)``;
- MLP (gated): ``3*d*I``;
- a fitted linear map: ``2*d*r`` (rank ``r``) or ``d*d`` (full); a removed sublayer: 0;
  a map added to narrowed attention (removed KV groups predicted, ``group_fit.py``):
  ``2*d*r`` on top of the kept heads' attention, ``r`` the removed heads' width;
- the LM head, ``d*V``: once per sequence in prefill (vLLM computes logits only for the last
  prompt token), once per token in decode.

A layer windowed in some KV groups only (``group_windows``) is two parts: the groups kept whole
(and the query heads that read them) as a full layer, the others as a windowed one.

A layer sharing an earlier layer's KV cache (``kv_sharing``) has no ``k``/``v`` projections
and the same attention core as its target's kind (its window, if any).

Norms, rotary embeddings, sampling and the embedding lookup are left out (O(d) per token).
KV cache: ``2*G*h*dtype_bytes`` per token and layer (K and V); a windowed layer keeps at most
``W`` tokens of a sequence, so at context ``N`` it holds ``min(N, W)/N`` of that per token
(a KV budget with windows is stated at a context length); a sharing layer holds none (vLLM
registers no KV-cache spec for it: it is in no KV group and takes no blocks). The predicted
speed-up of a pruned model is the ratio of summed MACs, dense over pruned: it assumes a MAC
costs the same in attention as in a GEMM, which the engine benchmarks check (see
``docs/results.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..families import head_dim


@dataclass(frozen=True)
class LayerShape:
    """What one decoder layer computes: attention kind and sizes, MLP width."""

    attention: str  # "dense" | "linear" | "removed"
    q_heads: int = 0
    kv_heads: int = 0
    rank: int | None = None  # linear: None = full d x d
    intermediate: int = 0
    added_rank: int = 0  # dense: the rank of a map added to the attention (0: none)
    window: int | None = None  # dense: sliding-window attention over the last W tokens
    shares: int | None = None  # dense: reads this earlier layer's KV cache, stores none
    whole_kv_heads: int = 0  # dense with a window: KV heads (groups) kept whole, not windowed

    def parts(self) -> list[tuple[int, int, int | None]]:
        """(query heads, KV heads, window) of each part of a dense layer's attention: one,
        or two when a window spares some KV groups (``whole_kv_heads``: those keep every
        token, with the query heads that read them)."""
        if not self.whole_kv_heads or self.window is None:
            return [(self.q_heads, self.kv_heads, self.window)]
        q_whole = self.q_heads * self.whole_kv_heads // self.kv_heads
        return [(q_whole, self.whole_kv_heads, None),
                (self.q_heads - q_whole, self.kv_heads - self.whole_kv_heads, self.window)]


def layer_params(cfg: Any, s: LayerShape) -> int:
    """Weights of one layer's attention and MLP (norms and biases left out)."""
    d, h = cfg.hidden_size, head_dim(cfg)
    if s.attention == "dense":
        kv = 0 if s.shares is not None else 2 * d * s.kv_heads * h  # k and v
        attn = 2 * d * s.q_heads * h + kv + 2 * d * s.added_rank
    elif s.attention == "linear":
        attn = d * d if s.rank is None else 2 * d * s.rank
    else:
        attn = 0
    return attn + 3 * d * s.intermediate


def layer_macs(cfg: Any, s: LayerShape, context: int, phase: str = "prefill") -> float:
    """Multiply-adds per token of one layer at context ``context`` (prefill or decode)."""
    # every weight is one MAC per token, plus the attention core
    return float(layer_params(cfg, s)) + attention_core_macs(cfg, s, context, phase)


def attention_core_macs(cfg: Any, s: LayerShape, context: int, phase: str = "prefill"
                        ) -> float:
    """Multiply-adds per token of one layer's ``QK^T`` and ``AV`` at context ``context`` (0
    for a layer without attention)."""
    if s.attention != "dense":
        return 0.0
    total = 0.0
    for q_heads, _, w in s.parts():
        n: float
        if phase == "decode":
            n = 2 * (context if w is None else min(context, w))
        elif w is None or context <= w:
            n = context + 1
        else:  # tokens 1..W attend to themselves and all before, the rest to W tokens
            n = 2 * (w * (w + 1) / 2 + (context - w) * w) / context
        total += q_heads * head_dim(cfg) * n
    return float(total)


def kv_head_bytes(head_size: int, dtype_bytes: int = 2) -> int:
    """KV-cache bytes of one KV head for one token: its K and V (the quantity vLLM's
    full-attention KV-cache spec sizes a page with)."""
    return 2 * int(head_size) * int(dtype_bytes)


def kv_bytes(cfg: Any, s: LayerShape, dtype_bytes: int = 2, context: int | None = None
             ) -> float:
    """KV-cache bytes one token takes in this layer; with ``context``, the mean per token of
    a ``context``-token sequence (a windowed layer keeps ``min(context, W)`` tokens; a layer
    sharing another's KV cache keeps none)."""
    if s.attention != "dense" or s.shares is not None:
        return 0
    total = 0.0
    for _, kv_heads, w in s.parts():
        per_token = kv_heads * kv_head_bytes(head_dim(cfg), dtype_bytes)
        total += (per_token if w is None or context is None or context <= w
                  else per_token * w / context)
    return int(total) if total.is_integer() else total


def kv_bytes_per_token(cfg: Any, shapes: list[LayerShape] | None = None,
                       dtype_bytes: int = 2, context: int | None = None) -> float:
    """KV-cache bytes one token takes over all layers (``shapes`` None: the dense model);
    with ``context``, the mean per token of a ``context``-token sequence (windows counted)."""
    if shapes is None:
        shapes = dense_shapes(cfg)
    total = sum(kv_bytes(cfg, s, dtype_bytes, context) for s in shapes)
    return int(total) if float(total).is_integer() else total


def kv_bytes_per_sequence(cfg: Any, shapes: list[LayerShape], context: int,
                          dtype_bytes: int = 2, block_size: int | None = None) -> int:
    """KV-cache bytes one ``context``-token sequence holds over all layers. With
    ``block_size``, as vLLM allocates them: whole blocks, ``cdiv(N, block)`` per layer, and a
    windowed layer at most ``cdiv(W - 1, block) + 1`` (its blocks wholly outside the window
    are freed; the one the window starts in is kept)."""
    if block_size is None:
        return round(kv_bytes_per_token(cfg, shapes, dtype_bytes, context) * context)
    total = 0.0
    for s in shapes:
        if s.attention != "dense" or s.shares is not None:
            continue
        # a layer windowed per KV group is served as one-head caches: vLLM gives those
        # blocks of as many more tokens as a whole layer's page holds heads
        block = block_size * s.kv_heads if s.whole_kv_heads and s.window else block_size
        for _, kv_heads, w in s.parts():
            blocks = blocks_per_sequence(w, context, block)
            total += kv_heads * kv_head_bytes(head_dim(cfg), dtype_bytes) * blocks * block
    return int(total)


def blocks_per_sequence(window: int | None, context: int, block_size: int) -> int:
    """KV-cache blocks one ``context``-token sequence holds in one layer as vLLM allocates
    them: ``cdiv(context, block)``, or for a sliding window at most ``cdiv(W - 1, block) + 1``
    (the blocks wholly outside the window are freed; the one it starts in is kept)."""
    full = -(-context // block_size)
    return full if window is None else min(full, -(-(window - 1) // block_size) + 1)


def served_caches(shapes: list[LayerShape]) -> list[tuple[int, int | None]]:
    """(KV heads, window) of every KV cache vLLM registers: one per attention layer with its
    own cache, one per KV group of a layer windowed per group (the plugin's
    ``group_windows.py``); layers sharing another's cache register none."""
    out: list[tuple[int, int | None]] = []
    for s in shapes:
        if s.attention != "dense" or s.shares is not None:
            continue
        if s.whole_kv_heads and s.window is not None:
            out += [(1, None)] * s.whole_kv_heads
            out += [(1, s.window)] * (s.kv_heads - s.whole_kv_heads)
        else:
            out.append((s.kv_heads, s.window))
    return out


def served_kv_bytes_per_sequence(cfg: Any, shapes: list[LayerShape], context: int,
                                 block_size: int, dtype_bytes: int = 2) -> int | None:
    """KV-cache bytes one ``context``-token sequence takes in vLLM's hybrid KV-cache manager:
    whole blocks (``kv_bytes_per_sequence`` with ``block_size``) and, when caches of several
    kinds (KV heads, window) share the pool, vLLM's grouping: every page is the largest
    cache's page (a cache of fewer KV heads gets that many times more tokens per block), every
    group holds the same number of caches (the smallest kind's count, or the largest's if
    that is under 1.5x the smallest), and a kind whose count does not divide into groups gets
    padding caches that take blocks like real ones (``served_caches``: layers sharing
    another's cache are in no group). None where a page does not divide the largest (vLLM
    pads those pages; not modelled)."""
    caches = served_caches(shapes)
    if not caches:
        return 0
    widest = max(kv for kv, _ in caches)
    if any(widest % kv for kv, _ in caches):
        return None
    kinds: dict[tuple[int, int | None], int] = {}
    for cache in caches:
        kinds[cache] = kinds.get(cache, 0) + 1
    sizes = list(kinds.values())
    group = max(sizes) if max(sizes) < 1.5 * min(sizes) else min(sizes)
    page = widest * kv_head_bytes(head_dim(cfg), dtype_bytes) * block_size
    total = 0
    for (kv, window), count in kinds.items():
        blocks = blocks_per_sequence(window, context, block_size * (widest // kv))
        total += -(-count // group) * group * blocks * page
    return total


def native_window(cfg: Any, idx: int) -> int | None:
    """Layer ``idx``'s own sliding window in the dense model (Gemma 2/3, Mistral-style
    ``layer_types`` + ``sliding_window``), None for full attention."""
    types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if not types or not window or types[idx] != "sliding_attention":
        return None
    return int(window)


def dense_shape(cfg: Any, idx: int | None = None) -> LayerShape:
    """A dense layer's shape (layer ``idx``'s: with its own sliding window, if any)."""
    return LayerShape("dense", cfg.num_attention_heads, cfg.num_key_value_heads, None,
                      cfg.intermediate_size,
                      window=None if idx is None else native_window(cfg, idx))


def dense_shapes(cfg: Any) -> list[LayerShape]:
    """Every layer of the dense model (natively windowed layers keep their windows)."""
    return [dense_shape(cfg, i) for i in range(cfg.num_hidden_layers)]


def model_shapes(cfg: Any, spec: Any | None) -> list[LayerShape]:
    """Every layer's ``LayerShape`` for a dense config (``spec`` None) or a pruning spec."""
    out = []
    for i in range(cfg.num_hidden_layers):
        base = dense_shape(cfg, i)
        shape = None if spec is None else spec.layer_shape(i)
        if shape is not None:
            base = replace(base, q_heads=shape["num_attention_heads"],
                           kv_heads=shape["num_key_value_heads"],
                           intermediate=shape["intermediate_size"])
        if spec is not None and i in spec.added:
            base = replace(base, added_rank=spec.maps[i]["rank"])
        elif spec is not None and i in spec.maps:
            base = LayerShape("linear", rank=spec.maps[i]["rank"],
                              intermediate=base.intermediate)
        elif spec is not None and spec.layers.get(i) == 0.0:
            base = LayerShape("removed", intermediate=base.intermediate)
        elif spec is not None and i in spec.layers:  # HARP token-local: v and o folded
            base = LayerShape("linear", rank=base.kv_heads * head_dim(cfg),
                              intermediate=base.intermediate)
        if spec is not None and i in spec.kv_sharing:
            base = replace(base, shares=spec.kv_sharing[i])
        if spec is not None and i in spec.windows:
            native = base.window
            base = replace(base, window=spec.windows[i] if native is None
                           else min(native, spec.windows[i]))
        if spec is not None and i in spec.group_windows:
            g = spec.group_windows[i]
            base = replace(base, window=g["window"], whole_kv_heads=len(g["full_groups"]))
        out.append(base)
    return out


def model_macs(cfg: Any, shapes: list[LayerShape], context: int, phase: str = "prefill"
               ) -> float:
    """MACs per token of the whole model (LM head: once per sequence in prefill)."""
    head = cfg.hidden_size * cfg.vocab_size
    lm_head = head / context if phase == "prefill" else head
    return sum(layer_macs(cfg, s, context, phase) for s in shapes) + lm_head


def predicted_speedup(cfg: Any, shapes: list[LayerShape], context: int,
                      phase: str = "prefill") -> float:
    """Dense over pruned MACs per token at ``context``: the cost model's speed-up."""
    dense = dense_shapes(cfg)
    return model_macs(cfg, dense, context, phase) / model_macs(cfg, shapes, context, phase)


def summary(cfg: Any, shapes: list[LayerShape], contexts: tuple[int, ...] = (4096, 7168),
            dtype_bytes: int = 2, context: int | None = None) -> dict:
    """KV bytes per token (at ``context``, default the last of ``contexts``, when a layer is
    windowed), parameters and predicted prefill/decode speed-ups at ``contexts``. With windowed
    or sharing layers, also the bytes of a sequence at that context and the saving as vLLM
    allocates it (``kv_saving_served``); with sharing, ``kv_shared_layers``."""
    dense = dense_shapes(cfg)
    at = context or contexts[-1]
    kv_full = kv_bytes_per_token(cfg, shapes, dtype_bytes)  # no window binding
    kv = kv_bytes_per_token(cfg, shapes, dtype_bytes, at)
    # at the same context: a model's own windows (Gemma's local layers) count in the dense too
    kv_dense = kv_bytes_per_token(cfg, dense, dtype_bytes, at)
    windowed = any(s.window is not None for s in shapes)
    shared = sum(s.shares is not None for s in shapes)
    return {
        "kv_bytes_per_token": kv, "kv_bytes_per_token_dense": kv_dense,
        "kv_saving": round(1 - kv / kv_dense, 6),
        **({"kv_context": at, "kv_bytes_per_token_unwindowed": kv_full,
            "kv_bytes_per_sequence": kv_bytes_per_sequence(cfg, shapes, at, dtype_bytes),
            "kv_bytes_per_sequence_dense": kv_bytes_per_sequence(cfg, dense, at, dtype_bytes),
            **_served_saving(cfg, shapes, dense, at, dtype_bytes)}
           if windowed or shared else {}),
        **({"kv_shared_layers": shared} if shared else {}),
        "layer_params": sum(layer_params(cfg, s) for s in shapes),
        "layer_params_dense": sum(layer_params(cfg, s) for s in dense),
        "predicted_speedup": {
            f"{phase}@{n}": round(predicted_speedup(cfg, shapes, n, phase), 4)
            for n in contexts for phase in ("prefill", "decode")},
    }


SERVED_BLOCK = 128  # vLLM's KV-cache block size on the CPU backend


def _served_saving(cfg: Any, shapes: list[LayerShape], dense: list[LayerShape], context: int,
                   dtype_bytes: int) -> dict:
    """The KV saving at ``context`` as vLLM allocates it (whole blocks of ``SERVED_BLOCK``,
    its hybrid grouping); empty where that is not modelled."""
    served = served_kv_bytes_per_sequence(cfg, shapes, context, SERVED_BLOCK, dtype_bytes)
    base = served_kv_bytes_per_sequence(cfg, dense, context, SERVED_BLOCK, dtype_bytes)
    if not served or not base:
        return {}
    return {"kv_block_size": SERVED_BLOCK, "kv_saving_served": round(1 - served / base, 6)}


def request_speedup(cfg: Any, shapes: list[LayerShape], prompt: int, output: int) -> float:
    """Predicted dense / pruned time of one request: its prompt prefilled at ``prompt``
    tokens, then ``output`` tokens decoded at the growing context (the load test's
    total-tokens/s ratio)."""
    dense = dense_shapes(cfg)

    def work(s: list[LayerShape]) -> float:
        total = prompt * model_macs(cfg, s, prompt, "prefill")
        return total + output * model_macs(cfg, s, prompt + output // 2, "decode")

    return work(dense) / work(shapes)


def checkpoint_shapes(path: str | Any) -> tuple[Any, list[LayerShape]] | None:
    """(HF config, per-layer shapes) of a local checkpoint directory, None if not local."""
    from pathlib import Path

    if not (Path(str(path)) / "config.json").is_file():
        return None
    from transformers import AutoConfig

    from ..spec import PruningSpec

    cfg = AutoConfig.from_pretrained(str(path))
    return cfg, model_shapes(cfg, PruningSpec.from_config(cfg))
