"""Cross-layer KV sharing on HF layers (``kv_sharing``): a layer's own queries over an
earlier layer's keys and values, and the save-and-restore of layers' attention modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ...families import check_served
from .model_layers import check_layers, decoder_layers
from .sliding_windows import narrowed, window_mask


def _stash_kv_input(module: Any, args: tuple, kwargs: dict) -> None:
    """Keep the KV target's attention input (and rotary cos/sin) for the layers sharing it."""
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    module.harp_kv_input = (x, kwargs.get("position_embeddings"))


class SharedKVAttention(nn.Module):
    """Layer ``i``'s attention over an earlier layer's keys and values (``kv_sharing``):
    ``o_proj(softmax(q K_j^T * scale + mask) V_j)`` with ``q`` from layer ``i``'s own
    ``q_proj`` (and QK-norm, Gemma 3's ``q_norm``) and rotary embedding, ``K_j``/``V_j`` as
    layer ``j`` computed them (its ``k_proj``/``v_proj`` on its own normed input, its
    ``k_norm`` if any, its rotary; with a KV cache, layer ``j``'s cache, which holds the past
    tokens too). Layer ``i`` keeps no ``k_proj``/``v_proj`` and no
    cache. ``harp_window``: the layer's sliding window (its target's), None for full
    attention, applied by this forward (no window hook). Eager attention in the input's dtype
    (the reference's fp32)."""

    applies_own_window = True

    def __init__(self, attn: Any, target: Any, target_idx: int):
        super().__init__()
        self.q_proj, self.o_proj = attn.q_proj, attn.o_proj
        self.q_norm = getattr(attn, "q_norm", None)  # Gemma 3: per-head RMSNorm of q and k
        self.softcap: float | None = getattr(attn, "attn_logit_softcapping", None)  # Gemma 2
        self.layer_idx, self.kv_layer_idx = getattr(attn, "layer_idx", None), target_idx
        self.head_dim, self.scaling = int(attn.head_dim), float(attn.scaling)
        self.harp_window: int | None = getattr(attn, "harp_window", None)
        self._target = (target,)  # a plain reference: the target's weights are its own
        if getattr(target, "harp_kv_stash", None) is None:
            target.harp_kv_stash = target.register_forward_pre_hook(_stash_kv_input,
                                                                     with_kwargs=True)

    def release(self) -> None:
        """Stop stashing the target's input (when this module is taken out of the model)."""
        target: Any = self._target[0]
        hook = getattr(target, "harp_kv_stash", None)
        if hook is not None:
            hook.remove()
            target.harp_kv_stash = target.harp_kv_input = None

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None,
                attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        target: Any = self._target[0]
        b, q_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, q_len, -1, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q = self.q_norm(q)
        cos, sin = position_embeddings
        if past_key_values is not None:  # layer j ran first and updated its cache
            cache = past_key_values.layers[self.kv_layer_idx]
            k, v = cache.keys, cache.values
        else:
            x, (cos_j, sin_j) = target.harp_kv_input
            k = target.k_proj(x).view(b, x.shape[1], -1, self.head_dim).transpose(1, 2)
            v = target.v_proj(x).view(b, x.shape[1], -1, self.head_dim).transpose(1, 2)
            if getattr(target, "k_norm", None) is not None:
                k = target.k_norm(k)
            _, k = apply_rotary_pos_emb(k, k, cos_j, sin_j)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        k_len = k.shape[-2]
        mask = window_mask(self.harp_window or k_len, q_len, k_len, q.dtype, q.device)
        scores = q @ k.transpose(2, 3) * self.scaling
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores + narrowed(mask, attention_mask)
        out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, -1)), None


def check_sharing_family(model) -> None:
    """UserError unless the model's family serves cross-layer KV sharing."""
    check_served(model.config, lambda f: f.kv_sharing, "cross-layer KV sharing is")


def share_kv(model, idx: int, target: int) -> SharedKVAttention:
    """Make layer ``idx`` attend over layer ``target``'s keys and values for good (its own
    ``k_proj``/``v_proj`` are dropped)."""
    layers: Any = decoder_layers(model)
    module = SharedKVAttention(layers[idx].self_attn, layers[target].self_attn, target)
    layers[idx].self_attn = module
    return module


@contextlib.contextmanager
def shared(model, sharing: Mapping[int, int]) -> Iterator[None]:
    """Temporarily make each layer ``i`` of ``sharing`` attend over layer ``sharing[i]``'s
    keys and values; the dense attention modules come back on exit."""
    check_sharing_family(model)
    check_layers(model, {**sharing, **{j: None for j in sharing.values()}})
    with attention_restored(model, sharing):
        for idx, target in sharing.items():
            share_kv(model, idx, target)
        yield


@contextlib.contextmanager
def attention_restored(model, indices: Iterable[int]) -> Iterator[None]:
    """Give layers ``indices`` their current attention modules back on exit, whatever the
    block swapped in (a sharing module swapped out is released from its target)."""
    layers: Any = decoder_layers(model)
    saved = {j: layers[j].self_attn for j in indices}
    try:
        yield
    finally:
        for j, attn in saved.items():
            if isinstance(layers[j].self_attn, SharedKVAttention):
                layers[j].self_attn.release()
            layers[j].self_attn = attn
