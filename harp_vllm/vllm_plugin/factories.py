"""Attention "classes" for a family's decoder layer to build in place of its own attention:
HARP's token-local path (or none), a fitted linear map, the family's attention with a group
map added, or with sink logits (a windowed layer in ``sinks``). Each takes the family
attention's keyword arguments. ``layer_attention`` picks a layer's from its pruning status.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..families import Family, family_of, head_dim
from .attention import FoldedTokenLocalAttention, RemovedAttention, TokenLocalLinear
from .checkpoint_spec import (
    layer_alpha,
    layer_group_window,
    layer_map,
    layer_sharing,
    layer_sinks,
)
from .group_windows import with_group_windows
from .sharing import shared_kv_factory


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


def with_sinks(base: type) -> type:
    """An attention class for a windowed layer with sink logits (``sinks``): the family's
    attention ``base`` (its window from ``layer_config``) whose vLLM attention adds the
    parameter ``self_attn.sinks`` (one per query head; tensor parallelism is refused for
    such checkpoints) to every softmax as a key with no value (vLLM's ``sinks``, which its
    CPU attention applies natively)."""

    class AttentionWithSinks(base):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.sinks = nn.Parameter(torch.zeros(self.num_heads, dtype=torch.float32),
                                      requires_grad=False)
            self.attn.impl.sinks = self.sinks  # read at every forward, after loading
            self.attn.has_sink = True

    return AttentionWithSinks


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


def layer_attention(config: Any, prefix: str, base: type, shared_cls: type | None = None):
    """The attention "class" the decoder layer ``prefix`` builds under ``config``'s pruning
    section: ``shared_cls`` over its target's KV cache (``kv_sharing``), HARP's token-local
    path (``layers``), ``base`` with a group map added or a linear map (``maps``), ``base``
    with sink logits (``sinks``), ``base`` split into a vLLM attention per KV group
    (``group_windows``), else ``base`` itself (``base``: the family's attention
    class; ``shared_cls``: its sharing attention, None where the family serves no sharing:
    refused at load before this)."""
    target = layer_sharing(config, prefix)
    alpha = layer_alpha(config, prefix)
    linear_map = layer_map(config, prefix)
    if target is not None:  # "model.layers.5" -> "model.layers.2.self_attn.attn"
        assert shared_cls is not None, "kv_sharing is refused for this family at load"
        return shared_kv_factory(f"{prefix.rsplit('.', 1)[0]}.{target}.self_attn.attn",
                                 shared_cls)
    if alpha is not None:
        return token_local_factory(alpha, family_of(config))
    if linear_map is not None and linear_map.get("add"):  # KV groups cut, a map added
        return with_group_map(base, linear_map["rank"])
    if linear_map is not None:
        return linear_map_factory(linear_map["rank"])
    if layer_sinks(config, prefix):
        return with_sinks(base)
    group_window = layer_group_window(config, prefix)
    if group_window is not None:
        return with_group_windows(base, group_window["window"], group_window["full_groups"])
    return base
