"""A layer windowed in some KV groups only (``group_windows``, DuoAttention's retrieval and
streaming heads per KV group): the family's attention with its one vLLM ``Attention``
replaced by one per KV group, each over that group's KV head and the query heads that read it,
with no window (the groups kept whole) or the layer's window. Each registers its own KV-cache
spec, so vLLM frees the windowed groups' blocks outside the window and keeps the others'.

One ``Attention`` per group (not one per kind) keeps every such cache at one KV head per
token: its page divides any other layer's, so vLLM's page unification only scales its block
size and never pads it. Served on one tensor-parallel rank only (refused at load otherwise).

Imported only by the model modules, i.e. inside vLLM processes (it imports vLLM).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.config import get_current_vllm_config
from vllm.model_executor.layers.attention import Attention


def with_group_windows(base: type, window: int, full_groups: list[int]) -> type:
    """An attention class for a layer of ``group_windows``: ``base`` (the family's attention:
    ``qkv_proj``, rotary, ``attn``, ``o_proj``) whose ``attn`` is replaced by ``attn_gG``, one
    vLLM ``Attention`` per KV group ``G``, windowed to ``window`` tokens but for the groups in
    ``full_groups``."""

    class AttentionWindowedPerGroup(base):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            prefix = kw["prefix"]
            old = self.attn
            # the parent's one Attention must not get a KV cache: unregister it
            del get_current_vllm_config().compilation_config.static_forward_context[
                f"{prefix}.attn"]
            del self.attn
            self.group_heads = self.num_heads // self.num_kv_heads
            self.group_names: list[str] = []
            for g in range(self.num_kv_heads):
                name = f"attn_g{g}"
                setattr(self, name, Attention(
                    self.group_heads, self.head_dim, self.scaling, num_kv_heads=1,
                    cache_config=kw.get("cache_config"), quant_config=kw.get("quant_config"),
                    per_layer_sliding_window=None if g in full_groups else window,
                    attn_type=old.attn_type, prefix=f"{prefix}.{name}"))
                self.group_names.append(name)

        def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor
                    ) -> torch.Tensor:
            qkv, _ = self.qkv_proj(hidden_states)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q, k = self.rotary_emb(positions, q, k)
            qw, kw = self.group_heads * self.head_dim, self.head_dim
            outs = [getattr(self, name)(q[..., g * qw:(g + 1) * qw].contiguous(),
                                        k[..., g * kw:(g + 1) * kw].contiguous(),
                                        v[..., g * kw:(g + 1) * kw].contiguous())
                    for g, name in enumerate(self.group_names)]
            out, _ = self.o_proj(torch.cat(outs, dim=-1))
            return out

    return AttentionWindowedPerGroup
