"""Sliding-window attention on HF layers (the ``windows`` and ``group_windows`` of a pruned
checkpoint, and the planner's window candidates): the window's causal mask (per query head
when only some KV groups are windowed), narrowed by the model's own padding mask, given to an
HF attention module by a forward pre-hook."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ...errors import UserError
from .model_layers import check_layers, decoder_layers


def window_mask(window: int, q_len: int, k_len: int, dtype: torch.dtype,
                device: torch.device | None = None) -> torch.Tensor:
    """The additive mask ``[1, 1, q_len, k_len]`` of sliding-window causal attention: the
    ``q_len`` queries are the last positions of the ``k_len`` keys, and query ``i`` sees key
    ``j`` when ``0 <= i - j < window`` (vLLM's ``sliding_window`` convention)."""
    i = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    seen = (j <= i) & (i - j < window)
    mask = torch.zeros(q_len, k_len, dtype=dtype, device=device)
    return mask.masked_fill_(~seen, torch.finfo(dtype).min)[None, None]


def group_window_mask(window: int, full_groups: tuple[int, ...], heads: int, kv_heads: int,
                      q_len: int, k_len: int, dtype: torch.dtype,
                      device: torch.device | None = None) -> torch.Tensor:
    """The additive mask ``[1, heads, q_len, k_len]`` of a layer windowed per KV group: the
    query heads of the groups in ``full_groups`` (group ``g``: query heads ``g*r..g*r+r-1``,
    ``r = heads / kv_heads``, the ones that read KV head ``g``) see every earlier key, the
    others the last ``window`` keys (``window_mask``)."""
    per = heads // kv_heads
    mask = window_mask(window, q_len, k_len, dtype, device).expand(1, heads, q_len, k_len)
    mask = mask.clone()
    full = window_mask(k_len, q_len, k_len, dtype, device)[0]
    for g in full_groups:
        mask[:, g * per:(g + 1) * per] = full
    return mask


def narrowed(mask: torch.Tensor, given: torch.Tensor | None) -> torch.Tensor:
    """``mask`` (additive, ``[..., q_len, k_len]``) narrowed further by the model's own mask
    ``given`` (additive or boolean, padding), clamped to the finite range of ``mask``'s
    dtype."""
    lowest = torch.finfo(mask.dtype).min
    if given is not None:
        given = given[..., -mask.shape[-1]:]
        mask = mask + given if given.dtype != torch.bool else mask.masked_fill(~given, lowest)
    return mask.clamp(min=lowest)


def _window_hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if x.dim() != 3:
        raise UserError("windowed attention expects [batch, tokens, hidden] inputs")
    cache = kwargs.get("past_key_values")
    past = 0 if cache is None else int(cache.get_seq_length(module.layer_idx))
    q_len = x.shape[1]
    groups = getattr(module, "harp_full_groups", None)
    if groups:
        heads, kv_heads = module.harp_heads
        mask = group_window_mask(module.harp_window, groups, heads, kv_heads, q_len,
                                 past + q_len, x.dtype, x.device)
    else:
        mask = window_mask(module.harp_window, q_len, past + q_len, x.dtype, x.device)
    kwargs["attention_mask"] = narrowed(mask, kwargs.get("attention_mask"))
    return args, kwargs


def _applies_own_window(attn: Any) -> bool:
    """A module that reads ``harp_window`` in its own forward (a layer sharing another's KV
    cache) gets no hook."""
    return bool(getattr(attn, "applies_own_window", False))


def within_native(attn: Any, window: int) -> int:
    """``window``, or ``attn``'s own sliding window if that is narrower (a natively windowed
    layer, e.g. Gemma's local ones, never gets a wider window than its own)."""
    native = getattr(attn, "sliding_window", None)
    return min(window, int(native)) if isinstance(native, int) and native > 0 else window


def attach_window(attn: Any, window: int) -> None:
    """Make ``attn`` (an HF attention module) attend to the last ``window`` tokens only (never
    wider than its own window: ``within_native``)."""
    window = within_native(attn, window)
    if getattr(attn, "harp_window", None) is not None or _applies_own_window(attn):
        attn.harp_window = window
        return
    attn.harp_window = window
    attn.register_forward_pre_hook(_window_hook, with_kwargs=True)


def head_counts(attn: Any) -> tuple[int, int]:
    """(query heads, KV heads) of an HF attention module (from its q/k projections)."""
    d = int(attn.head_dim)
    return attn.q_proj.out_features // d, attn.k_proj.out_features // d


def attach_group_window(attn: Any, window: int, full_groups: list[int]) -> None:
    """Make ``attn`` (an HF attention module) attend to the last
    ``window`` tokens in every KV group but ``full_groups``, which keep every token."""
    attach_window(attn, window)
    attn.harp_full_groups = tuple(sorted(full_groups))
    attn.harp_heads = head_counts(attn)


class WindowedAttention(nn.Module):
    """``attn`` (an HF attention module, shared, not copied) over the last ``window`` tokens
    only (in every KV group but ``full_groups``, when given: those keep every token): the
    planner's stand-in for a windowed layer while it scores layouts."""

    def __init__(self, attn: nn.Module, window: int, full_groups: tuple[int, ...] = ()):
        super().__init__()
        self.attn, self.harp_window = attn, within_native(attn, window)
        self.layer_idx = getattr(attn, "layer_idx", None)
        self.harp_full_groups = tuple(full_groups)
        if full_groups:
            self.harp_heads = head_counts(attn)

    def forward(self, *args, **kwargs):
        args, kwargs = _window_hook(self, args, kwargs)
        return self.attn(*args, **kwargs)


@contextlib.contextmanager
def windowed(model, windows: Mapping[int, int]) -> Iterator[None]:
    """Temporarily give ``windows`` (layer index -> tokens) sliding-window attention."""
    check_layers(model, windows)
    handles = []
    try:
        for idx, w in windows.items():
            attn: Any = decoder_layers(model)[idx].self_attn
            attn.harp_window = within_native(attn, w)
            hook = None if _applies_own_window(attn) else \
                attn.register_forward_pre_hook(_window_hook, with_kwargs=True)
            handles.append((attn, hook))
        yield
    finally:
        for attn, h in handles:
            if h is not None:
                h.remove()
            attn.harp_window = None
