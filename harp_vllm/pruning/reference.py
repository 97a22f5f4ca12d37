"""Reference HARP implementation on Hugging Face transformers models.

A pruned layer keeps its input norm, MLP and residuals; its attention becomes the token-local
path ``alpha * o_proj(repeat_kv(v_proj(x)))`` (no q/k, no RoPE, no softmax, no KV cache).
Llama/Mistral/Qwen2 apply alpha to that output; Gemma2/Gemma3 apply it after the
post-attention norm. alpha = 0 removes the attention sublayer (no v/o either).

This module is the ground truth the alpha search, evaluation and the vLLM plugin are checked
against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..families import family_of, head_dim
from ..families import post_norm as family_post_norm
from ..spec import PruningSpec


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


class LinearAttention(nn.Module):
    """An attention sublayer replaced by a fitted affine map: ``out_proj(in_proj(x))`` + bias
    (low rank), or ``out_proj(x)`` + bias (full rank, ``in_proj`` None). Token-local."""

    def __init__(self, hidden_size: int, rank: int | None):
        super().__init__()
        self.in_proj = None if rank is None else nn.Linear(hidden_size, rank, bias=False)
        self.out_proj = nn.Linear(hidden_size if rank is None else rank, hidden_size)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        x = hidden_states if self.in_proj is None else self.in_proj(hidden_states)
        return self.out_proj(x), None


class GroupMap(nn.Module):
    """The removed KV groups' stand-in, added to a narrowed attention's output:
    ``out_proj(in_proj(x))`` with the bias on ``in_proj`` (``out_proj`` holds the removed
    heads' o_proj columns). See ``group_fit.py``."""

    def __init__(self, hidden_size: int, rank: int):
        super().__init__()
        self.in_proj = nn.Linear(hidden_size, rank, bias=True)
        self.out_proj = nn.Linear(rank, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.in_proj(x))


def _add_group_map(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    return (output[0] + module.group_map(x), *output[1:])


def attach_group_map(attn: nn.Module, group_map: GroupMap) -> None:
    """Give the (narrowed) attention ``attn`` a ``group_map`` added to its output."""
    attn.group_map = group_map
    attn.register_forward_hook(_add_group_map, with_kwargs=True)


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


def _window_hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if x.dim() != 3:
        raise UserError("windowed attention expects [batch, tokens, hidden] inputs")
    cache = kwargs.get("past_key_values")
    past = 0 if cache is None else int(cache.get_seq_length(module.layer_idx))
    q_len = x.shape[1]
    mask = window_mask(module.harp_window, q_len, past + q_len, x.dtype, x.device)
    given = kwargs.get("attention_mask")
    if given is not None:  # padding: the window narrows what the model's own mask allows
        given = given[..., -mask.shape[-1]:]
        mask = (mask + given if given.dtype != torch.bool
                else mask.masked_fill(~given, torch.finfo(x.dtype).min))
    kwargs["attention_mask"] = mask.clamp(min=torch.finfo(x.dtype).min)
    return args, kwargs


def attach_window(attn: Any, window: int) -> None:
    """Make ``attn`` (an HF attention module) attend to the last ``window`` tokens only (a
    natively windowed layer, e.g. Gemma's, never gets a wider window than its own)."""
    native = getattr(attn, "sliding_window", None)
    window = min(window, int(native)) if isinstance(native, int) and native > 0 else window
    if getattr(attn, "harp_window", None) is not None or isinstance(attn, SharedKVAttention):
        attn.harp_window = window
        return
    attn.harp_window = window
    attn.register_forward_pre_hook(_window_hook, with_kwargs=True)


class WindowedAttention(nn.Module):
    """``attn`` (an HF attention module, shared, not copied) over the last ``window`` tokens
    only: the planner's stand-in for a windowed layer while it scores layouts."""

    def __init__(self, attn: nn.Module, window: int):
        super().__init__()
        self.attn, self.harp_window = attn, window
        self.layer_idx = getattr(attn, "layer_idx", None)

    def forward(self, *args, **kwargs):
        args, kwargs = _window_hook(self, args, kwargs)
        return self.attn(*args, **kwargs)


@contextlib.contextmanager
def windowed(model, windows: Mapping[int, int]) -> Iterator[None]:
    """Temporarily give ``windows`` (layer index -> tokens) sliding-window attention."""
    _check_layers(model, windows)
    handles = []
    try:
        for idx, w in windows.items():
            attn: Any = decoder_layers(model)[idx].self_attn
            attn.harp_window = w
            # a layer sharing another's KV cache applies its window itself
            hook = None if isinstance(attn, SharedKVAttention) else \
                attn.register_forward_pre_hook(_window_hook, with_kwargs=True)
            handles.append((attn, hook))
        yield
    finally:
        for attn, h in handles:
            if h is not None:
                h.remove()
            attn.harp_window = None


def _stash_kv_input(module: Any, args: tuple, kwargs: dict) -> None:
    """Keep the KV target's attention input (and rotary cos/sin) for the layers sharing it."""
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    module.harp_kv_input = (x, kwargs.get("position_embeddings"))


class SharedKVAttention(nn.Module):
    """Layer ``i``'s attention over an earlier layer's keys and values (``kv_sharing``):
    ``o_proj(softmax(q K_j^T * scale + mask) V_j)`` with ``q`` from layer ``i``'s own
    ``q_proj`` and rotary embedding, ``K_j``/``V_j`` as layer ``j`` computed them (its
    ``k_proj``/``v_proj`` on its own normed input, its rotary; with a KV cache, layer ``j``'s
    cache, which holds the past tokens too). Layer ``i`` keeps no ``k_proj``/``v_proj`` and no
    cache. ``harp_window``: the layer's sliding window (its target's), None for full
    attention. Eager attention in the input's dtype (the reference's fp32)."""

    def __init__(self, attn: Any, target: Any, target_idx: int):
        super().__init__()
        self.q_proj, self.o_proj = attn.q_proj, attn.o_proj
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
        cos, sin = position_embeddings
        if past_key_values is not None:  # layer j ran first and updated its cache
            cache = past_key_values.layers[self.kv_layer_idx]
            k, v = cache.keys, cache.values
        else:
            x, (cos_j, sin_j) = target.harp_kv_input
            k = target.k_proj(x).view(b, x.shape[1], -1, self.head_dim).transpose(1, 2)
            v = target.v_proj(x).view(b, x.shape[1], -1, self.head_dim).transpose(1, 2)
            _, k = apply_rotary_pos_emb(k, k, cos_j, sin_j)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        k_len = k.shape[-2]
        mask = window_mask(self.harp_window or k_len, q_len, k_len, q.dtype, q.device)
        if attention_mask is not None:  # padding: narrows what the causal mask allows
            given = attention_mask[..., -k_len:]
            mask = (mask + given if given.dtype != torch.bool
                    else mask.masked_fill(~given, torch.finfo(q.dtype).min))
        scores = q @ k.transpose(2, 3) * self.scaling + mask.clamp(min=torch.finfo(q.dtype).min)
        out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, -1)), None


def _check_sharing_family(model) -> None:
    if not family_of(model.config).kv_sharing:
        raise UserError(f"cross-layer KV sharing is built for Llama-like families only, not "
                        f"{model.config.model_type!r}")


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
    _check_sharing_family(model)
    _check_layers(model, {**sharing, **{j: None for j in sharing.values()}})
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


def install_map(layer: nn.Module, module: LinearAttention, input_kind: str) -> None:
    """Replace ``layer``'s attention by ``module``; ``raw`` input also drops the input norm
    (the map then reads the residual stream itself)."""
    layer.self_attn = module
    if input_kind == "raw":
        layer.input_layernorm = nn.Identity()


def decoder_layers(model) -> nn.ModuleList:
    return model.model.layers


def _check_layers(model, layers: Mapping) -> None:
    n = len(decoder_layers(model))
    bad = sorted(i for i in layers if not 0 <= i < n)
    if bad:
        raise UserError(f"layer index {bad[0]} out of range (the model has {n} layers: "
                        f"0..{n - 1})")


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
    _check_layers(model, layers)
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


def apply_pruning(model, spec: PruningSpec):
    """Prune ``model`` in place for good: q/k (and v/o where alpha = 0) are gone."""
    post_norm = family_post_norm(model.config)
    _check_layers(model, spec.layers)
    for idx, alpha in spec.layers.items():
        layer: Any = decoder_layers(model)[idx]
        layer.self_attn = _token_local(model, idx, alpha, keep_weights=False)
        if post_norm:
            layer.post_attention_layernorm.register_forward_hook(_scale_hook(alpha))
    if spec.maps and post_norm:
        raise UserError(f"linear maps replace attention in Llama-like families only, not "
                        f"{model.config.model_type!r}")
    _check_layers(model, spec.maps)
    for idx, m in spec.replaced.items():  # a fitted map already in place is kept
        layer = decoder_layers(model)[idx]
        if not isinstance(layer.self_attn, LinearAttention):
            install_map(layer, LinearAttention(model.config.hidden_size, m["rank"]), m["input"])
    for idx, m in spec.added.items():
        attn: Any = decoder_layers(model)[idx].self_attn
        if not hasattr(attn, "group_map"):
            attach_group_map(attn, GroupMap(model.config.hidden_size, m["rank"]))
    if spec.kv_sharing:
        _check_sharing_family(model)
    _check_layers(model, spec.kv_sharing)
    for idx, target in spec.kv_sharing.items():  # a sharing layer already in place is kept
        if not isinstance(decoder_layers(model)[idx].self_attn, SharedKVAttention):
            share_kv(model, idx, target)
    _check_layers(model, spec.windows)
    for idx, w in spec.windows.items():
        windowed_layer: Any = decoder_layers(model)[idx]
        attach_window(windowed_layer.self_attn, w)
    model.config.harp_pruning = spec.to_dict()
    return model


def load_model(path: Path):
    """The fp32 causal LM at ``path``; a pruned checkpoint is built with its pruning applied."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    pruning = PruningSpec.from_config(config)
    if pruning is not None:
        return load_pruned(path, config, pruning)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    return model.eval()


def load_pruned(path: Path, config, spec: PruningSpec):
    """Build the pruned model described by ``config`` and load its safetensors strictly."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    family_post_norm(config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                             attn_implementation="sdpa")
    if spec.shapes is not None:  # head/MLP-level pruning: every layer gets its own shapes
        from .heads import check_family, resize_layer

        check_family(config)
        for idx, layer in enumerate(decoder_layers(model)):
            shape = spec.layer_shape(idx)
            assert shape is not None  # spec.shapes is set
            resize_layer(layer, config, **shape)
    apply_pruning(model, spec)
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise UserError(f"no .safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    expected = set(model.state_dict())
    tied = getattr(config, "tie_word_embeddings", False)
    missing = sorted(k for k in expected - set(state) if not (tied and k == "lm_head.weight"))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
        raise UserError(f"checkpoint weights do not match its pruning section: "
                        f"{'; '.join(parts)} ({path})")
    model.load_state_dict(state, strict=False)
    if tied:
        model.tie_weights()
    return model.eval()
