"""Attention "classes" for a family's decoder layer to build in place of its own attention:
HARP's token-local path (or none), a fitted linear map, or the family's attention with a
group map added. Each takes the family attention's keyword arguments.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..families import Family, head_dim
from .attention import FoldedTokenLocalAttention, RemovedAttention, TokenLocalLinear


def linear_map_factory(rank: int | None):
    """An attention "class" for a layer replaced by a fitted linear map (``maps`` entry)."""

    def make(**kw: Any) -> nn.Module:
        return TokenLocalLinear(hidden_size=kw["hidden_size"], width=rank, in_bias=False,
                                out_bias=True, prefix=kw["prefix"],
                                quant_config=kw.get("quant_config"))

    return make


def with_group_map(base: type, rank: int) -> type:
    """An attention class for a layer with a map added (``"add": true``): the family's
    attention ``base`` (narrowed to the layer's own heads by ``layer_config``) plus
    ``group_map``, the removed KV groups' fitted stand-in (``pruning/methods/group_fit.py``),
    added to its output. The map owns no KV cache; vLLM sizes the attention's own."""

    class AttentionWithGroupMap(base):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.group_map = TokenLocalLinear(hidden_size=kw["hidden_size"], width=rank,
                                              in_bias=True, out_bias=False,
                                              prefix=f"{kw['prefix']}.group_map",
                                              quant_config=kw.get("quant_config"))

        def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor
                    ) -> torch.Tensor:
            out = super().forward(positions, hidden_states)
            return out + self.group_map(hidden_states=hidden_states)

    return AttentionWithGroupMap


def token_local_factory(alpha: float, family: Family):
    """An attention "class" for a pruned layer of ``family``; takes the family attention's
    keyword args (``family.biases(kwargs)`` gives v_bias, o_bias from them)."""

    def make(**kw: Any) -> nn.Module:
        prefix = kw["prefix"]
        if alpha == 0.0:
            return RemovedAttention(prefix)
        hidden, n_q = kw["hidden_size"], kw["num_heads"]
        d = kw.get("head_dim") or head_dim(kw.get("config"), hidden, n_q)
        v_bias, o_bias = family.biases(kw)
        return FoldedTokenLocalAttention(hidden_size=hidden, num_heads=n_q,
                                         num_kv_heads=kw["num_kv_heads"], head_dim=d,
                                         alpha=alpha, post_norm=family.post_norm,
                                         v_bias=v_bias, o_bias=o_bias, prefix=prefix,
                                         quant_config=kw.get("quant_config"))

    return make
