"""Fitted linear maps on HF layers: a layer's attention replaced by an affine map
(``LinearAttention``, ``--method linear`` and the planner's ``lin`` candidates), and the
removed KV groups' stand-in added to a narrowed attention's output (``GroupMap``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


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


def install_map(layer: nn.Module, module: LinearAttention, input_kind: str) -> None:
    """Replace ``layer``'s attention by ``module``; ``raw`` input also drops the input norm
    (the map then reads the residual stream itself)."""
    layer.self_attn = module
    if input_kind == "raw":
        layer.input_layernorm = nn.Identity()


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
