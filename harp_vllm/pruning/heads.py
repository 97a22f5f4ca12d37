"""Head- and MLP-channel surgery on Hugging Face decoder layers (Llama, Mistral, Qwen2,
Gemma 2/3).

Attention is cut by whole GQA groups: group g is KV head g and the ``r`` query heads
``g*r .. g*r+r-1`` that read it, so every kept layer keeps the model's group size and the KV
cache shrinks with each group removed. A model with a single KV head (Gemma 3 270M) has no
group to remove: its unit is one query head (q_proj rows, o_proj columns; the KV head, and
the per-head QK norms, stay), so its KV cache does not shrink. MLP layers are cut by
intermediate channels (rows of gate/up, columns of down). Biases of the cut rows go with them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..families import head_dim, model_types

# The config keys saying every layer's attention / MLP projections have biases: how a checkpoint
# with FLAP's compensation declares them, also for families whose HF code has none (Mistral);
# vLLM's Llama code reads the same two keys.
ATTENTION_BIAS, MLP_BIAS = "attention_bias", "mlp_bias"
# The input-side projections (o_proj and down_proj are the output side).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj")


def check_family(config) -> None:
    mt = getattr(config, "model_type", None)
    served = model_types(lambda f: f.heads)
    if mt not in served:
        raise UserError(f"head/MLP pruning supports model families {', '.join(served)}; "
                        f"got {mt!r}")


def group_size(config) -> int:
    return config.num_attention_heads // config.num_key_value_heads


def head_units(config) -> bool:
    """Whether attention is cut by single query heads (one KV head: no group to remove)."""
    return int(config.num_key_value_heads) == 1


def unit_size(config) -> int:
    """Query heads per unit of attention pruning: the group size, or 1 (``head_units``)."""
    return 1 if head_units(config) else group_size(config)


def unit_count(config) -> int:
    """Units of attention pruning per dense layer: KV groups, or query heads."""
    return int(config.num_attention_heads if head_units(config)
               else config.num_key_value_heads)


def unit_heads(config, units: list[int]) -> list[int]:
    """The query heads of ``units`` (of a dense layer)."""
    r = unit_size(config)
    return [u * r + j for u in units for j in range(r)]


def _linear(old: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
            bias: bool | None = None) -> nn.Linear:
    """A copy of ``old`` keeping output ``rows`` and input ``cols`` (None: all)."""
    w = old.weight.data
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    has_bias = old.bias is not None if bias is None else bias
    new = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if has_bias:
            b = old.bias.data if old.bias is not None else torch.zeros(old.out_features,
                                                                      dtype=w.dtype)
            new.bias.copy_(b if rows is None else b[rows])
    return new


def channels_of(units: list[int] | torch.Tensor, width: int) -> torch.Tensor:
    """Channel indices of ``units`` (heads or groups) that are ``width`` channels wide."""
    units = torch.as_tensor(units, dtype=torch.long)
    return (units[:, None] * width + torch.arange(width)).reshape(-1)


def keep_groups(attn: Any, config, groups: list[int]) -> None:
    """Keep only the GQA ``groups`` (sorted indices) of one attention module, in place."""
    d, r = head_dim(config), group_size(config)
    q_heads = [g * r + j for g in groups for j in range(r)]
    q_ch, kv_ch = channels_of(q_heads, d), channels_of(groups, d)
    attn.q_proj = _linear(attn.q_proj, rows=q_ch)
    attn.k_proj = _linear(attn.k_proj, rows=kv_ch)
    attn.v_proj = _linear(attn.v_proj, rows=kv_ch)
    attn.o_proj = _linear(attn.o_proj, cols=q_ch)


def keep_query_heads(attn: Any, config, heads: list[int]) -> None:
    """Keep only the query ``heads`` (sorted indices) of one single-KV-head attention module,
    in place (its k/v and QK norms stay; ``num_key_value_groups`` follows, for repeat_kv)."""
    ch = channels_of(heads, head_dim(config))
    attn.q_proj = _linear(attn.q_proj, rows=ch)
    attn.o_proj = _linear(attn.o_proj, cols=ch)
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = len(heads)


def keep_units(attn: Any, config, units: list[int]) -> None:
    """Keep only the pruning ``units`` (groups, or query heads: ``head_units``), in place."""
    if head_units(config):
        keep_query_heads(attn, config, units)
    else:
        keep_groups(attn, config, units)


def keep_channels(mlp: Any, channels: list[int]) -> None:
    """Keep only the intermediate ``channels`` (sorted indices) of one MLP, in place."""
    idx = torch.as_tensor(channels, dtype=torch.long)
    mlp.gate_proj = _linear(mlp.gate_proj, rows=idx)
    mlp.up_proj = _linear(mlp.up_proj, rows=idx)
    mlp.down_proj = _linear(mlp.down_proj, cols=idx)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(channels)


def resize_layer(layer: Any, config, num_attention_heads: int, num_key_value_heads: int,
                 intermediate_size: int) -> None:
    """Give one freshly built layer the shapes of a pruned checkpoint's layer (the weights
    are whatever the first groups/channels held until the checkpoint is loaded over them)."""
    heads, kv = num_attention_heads, num_key_value_heads
    if head_units(config) and kv != 1:
        raise UserError(f"a layer with {kv} KV heads in a model of one KV head")
    if not head_units(config) and heads // kv != group_size(config):
        raise UserError(f"a layer with {heads} heads and {kv} KV heads changes the model's "
                        f"group size {group_size(config)}")
    if getattr(config, ATTENTION_BIAS, False):
        add_biases(layer.self_attn, (*ATTENTION_PROJECTIONS, "o_proj"))
    if getattr(config, MLP_BIAS, False):
        add_biases(layer.mlp, (*MLP_PROJECTIONS, "down_proj"))
    keep_units(layer.self_attn, config, list(range(heads if head_units(config) else kv)))
    keep_channels(layer.mlp, list(range(intermediate_size)))


def declare_biases(config, attention: bool = False, mlp: bool = False) -> None:
    """Record in ``config`` that every layer's attention (q/k/v/o) and/or MLP projections
    have biases (FLAP's compensation; zero where the model had none)."""
    if attention:
        setattr(config, ATTENTION_BIAS, True)
    if mlp:
        setattr(config, MLP_BIAS, True)


def add_bias(module: nn.Linear, value: torch.Tensor | None = None) -> nn.Linear:
    """``module`` with a bias (zeros, or ``value`` added to an existing one)."""
    new = _linear(module, bias=True)
    if value is not None:
        with torch.no_grad():
            new.bias.add_(value.to(new.bias.dtype))
    return new


def add_biases(module: nn.Module, names: tuple[str, ...]) -> None:
    """Give ``module``'s linear layers ``names`` a bias (zeros where they had none)."""
    for name in names:
        setattr(module, name, add_bias(getattr(module, name)))


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
