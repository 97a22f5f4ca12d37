"""HARP's pruned attention on HF layers: the token-local path
``alpha * o_proj(repeat_kv(v_proj(x)))`` (no q/k, no RoPE, no softmax, no KV cache), alpha
applied to that output or, in a post-norm family (Gemma), after the post-attention norm;
alpha = 0 removes the attention sublayer (no v/o either)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ...families import head_dim
from ...families import post_norm as family_post_norm
from .model_layers import check_layers, decoder_layers


class TokenLocalAttention(nn.Module):
    """Attention with the attention matrix fixed to the identity: ``scale * o(repeat_kv(v(x)))``.

    ``v_proj``/``o_proj`` are None when the sublayer is removed (alpha = 0): the output is 0.
    """

    def __init__(self, v_proj: nn.Linear | None, o_proj: nn.Linear | None, n_rep: int,
                 head_dim: int, scale: float | torch.Tensor):
        super().__init__()
        self.v_proj, self.o_proj = v_proj, o_proj
        self.n_rep, self.head_dim, self.scale = n_rep, head_dim, scale

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.v_proj is None or (isinstance(self.scale, float) and self.scale == 0.0):
            return torch.zeros_like(hidden_states), None
        v = self.v_proj(hidden_states)
        if self.n_rep > 1:  # repeat_kv: KV head g feeds query heads g*r .. g*r+r-1
            *lead, width = v.shape
            v = v.view(*lead, width // self.head_dim, self.head_dim)
            v = v.repeat_interleave(self.n_rep, dim=-2).reshape(*lead, -1)
        assert self.o_proj is not None  # v_proj and o_proj are removed together
        out = self.o_proj(v)
        unscaled = isinstance(self.scale, float) and self.scale == 1.0
        return (out if unscaled else out * self.scale), None


def _token_local(model, idx: int, alpha: float | torch.Tensor,
                 keep_weights: bool) -> TokenLocalAttention:
    cfg = model.config
    attn: Any = decoder_layers(model)[idx].self_attn
    v, o = attn.v_proj, attn.o_proj
    n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
    post_norm = family_post_norm(cfg)
    keep = keep_weights or not (isinstance(alpha, float) and alpha == 0.0)
    return TokenLocalAttention(v if keep else None, o if keep else None, n_rep, head_dim(cfg),
                               1.0 if post_norm else alpha)


def _scale_hook(alpha: float | torch.Tensor):
    def hook(module, args, output):
        return output * alpha
    return hook


@contextlib.contextmanager
def pruned(model, layers: Mapping[int, float | torch.Tensor]) -> Iterator[None]:
    """Temporarily prune ``layers`` (index -> alpha); the dense modules come back on exit.

    An alpha may be a tensor broadcasting over the batch (``[b, 1, 1]``): the search uses it
    to evaluate several alpha candidates in one batch.
    """
    post_norm = family_post_norm(model.config)
    check_layers(model, layers)
    saved, hooks = {}, []
    try:
        for idx, alpha in layers.items():
            layer: Any = decoder_layers(model)[idx]
            saved[idx] = layer.self_attn
            layer.self_attn = _token_local(model, idx, alpha, keep_weights=True)
            if post_norm:
                hooks.append(layer.post_attention_layernorm.register_forward_hook(
                    _scale_hook(alpha)))
        yield
    finally:
        for h in hooks:
            h.remove()
        for idx, attn in saved.items():
            decoder_layers(model)[idx].self_attn = attn


def prune_layers(model, layers: Mapping[int, float]) -> None:
    """Prune ``layers`` (index -> alpha) for good: q/k (and v/o where alpha = 0) are gone."""
    post_norm = family_post_norm(model.config)
    check_layers(model, layers)
    for idx, alpha in layers.items():
        layer: Any = decoder_layers(model)[idx]
        layer.self_attn = _token_local(model, idx, alpha, keep_weights=False)
        if post_norm:
            layer.post_attention_layernorm.register_forward_hook(_scale_hook(alpha))
