"""The attention modules of changed layers: ``RemovedAttention`` (alpha = 0: none),
``TokenLocalLinear`` (a fitted linear map in place of attention, and the group map added to a
narrowed attention) and ``FoldedTokenLocalAttention`` (HARP's v/o path, folded at load time).
None of them builds an ``Attention`` module, so vLLM allocates no KV cache for them.

Imported only by the model modules, i.e. inside vLLM processes (it imports vLLM).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.utils import extract_layer_index

from ..spec import CONFIG_KEY
from .checkpoint_spec import HarpCheckpointError
from .fold import check_heads, fold_o, fold_v, rank_heads


def _shard_name(name: str, weight: torch.Tensor) -> str:
    """Undo vLLM's stacking rename: ``qkv_proj.weight`` + shard "v" -> ``v_proj.weight``."""
    shard = getattr(weight, "shard_id", None)
    if name.startswith("qkv_proj.") and shard in ("q", "k", "v"):
        return f"{shard}_proj.{name.split('.', 1)[1]}"
    return name


class RemovedAttention(nn.Module):
    """The attention sublayer of an alpha = 0 layer: no weights, never called."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def forward(self, *args, **kwargs):  # the decoder layer skips the branch
        raise RuntimeError(f"{self.prefix} is removed (alpha = 0) and must not be called")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        for name, w in weights:
            raise HarpCheckpointError(
                f"unexpected weight {self.prefix}.{_shard_name(name, w)}: layer "
                f"{extract_layer_index(self.prefix)} is pruned with alpha = 0 in "
                f"'{CONFIG_KEY}', so its attention has no weights")
        return set()


class TokenLocalLinear(nn.Module):
    """A token-local attention replacement: ``x -> out_proj(in_proj(x))``, or ``out_proj(x)``
    with no ``in_proj`` (a full-rank map). No ``Attention`` module is built, so vLLM allocates
    no KV cache for the layer.

    ``in_proj`` is column-parallel and ``out_proj`` row-parallel (its all-reduce sums the
    ranks); a full-rank ``out_proj`` splits its input across ranks. This class loads a fitted
    linear map (``--method linear``: ``in_proj``/``out_proj`` in the checkpoint);
    ``FoldedTokenLocalAttention`` fills the same two linears from HARP's v/o weights.
    """

    kind = "linear map"

    def __init__(self, *, hidden_size: int, width: int | None, in_bias: bool, out_bias: bool,
                 prefix: str, quant_config=None):
        super().__init__()
        if quant_config is not None:
            raise HarpCheckpointError(f"{prefix}: quantized HARP checkpoints are not supported "
                                      f"(the token-local layers need unquantized weights)")
        self.prefix = prefix
        self.layer_idx = extract_layer_index(prefix)
        self.tp_size = get_tensor_model_parallel_world_size()
        self.tp_rank = get_tensor_model_parallel_rank()
        if width is None:
            self.in_proj = None
            self.out_proj = RowParallelLinear(hidden_size, hidden_size, bias=out_bias,
                                              input_is_parallel=False, reduce_results=True,
                                              prefix=f"{prefix}.out_proj")
        else:
            self.in_proj = ColumnParallelLinear(hidden_size, width, bias=in_bias,
                                                gather_output=False, prefix=f"{prefix}.in_proj")
            self.out_proj = RowParallelLinear(width, hidden_size, bias=out_bias,
                                              input_is_parallel=True, reduce_results=True,
                                              prefix=f"{prefix}.out_proj")
        self.expected = {"out_proj.weight"} | ({"out_proj.bias"} if out_bias else set())
        if width is not None:
            self.expected |= {"in_proj.weight"} | ({"in_proj.bias"} if in_bias else set())
        self.loaded: set[str] = set()

    def forward(self, positions: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        x = hidden_states
        if self.in_proj is not None:
            x, _ = self.in_proj(x)
        out, _ = self.out_proj(x)
        return out

    def _unexpected(self, name: str) -> HarpCheckpointError:
        return HarpCheckpointError(
            f"unexpected weight {self.prefix}.{name}: layer {self.layer_idx} is replaced by a "
            f"{self.kind} and keeps only {', '.join(sorted(self.expected))}")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        for raw_name, w in weights:
            name = _shard_name(raw_name, w)
            if name not in self.expected:
                raise self._unexpected(name)
            param = params[name]
            full = _full_shape(param, name, self.tp_size)
            if tuple(w.shape) != full:
                raise HarpCheckpointError(
                    f"{self.prefix}.{name}: checkpoint shape {tuple(w.shape)}, expected {full} "
                    f"(from '{CONFIG_KEY}.maps[{self.layer_idx}]' and the hidden size)")
            param.weight_loader(param, w)  # type: ignore[attr-defined]  # set by vLLM
            self.loaded.add(name)
        return set(self.loaded)

    def missing(self) -> list[str]:
        return [f"{self.prefix}.{n}" for n in sorted(self.expected - self.loaded)]


def _full_shape(param: torch.Tensor, name: str, tp_size: int) -> tuple[int, ...]:
    """The unsharded checkpoint shape of a column- (in_proj) or row-parallel (out_proj) param."""
    shape = list(param.shape)
    if name == "in_proj.weight" or name == "in_proj.bias":
        shape[0] *= tp_size
    elif name == "out_proj.weight":
        shape[1] *= tp_size
    return tuple(shape)


class FoldedTokenLocalAttention(TokenLocalLinear):
    """HARP pruned attention, folded into ``TokenLocalLinear``: ``in_proj`` = this rank's
    ``v_proj`` rows, ``out_proj`` = ``scale * W_O`` with the query-head blocks that read the
    same KV head summed (see ``fold.py``). ``scale`` is alpha for Llama-like families and 1
    for Gemma (which scales after its post-attention norm).
    """

    kind = "HARP token-local path"

    def __init__(self, *, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 alpha: float, post_norm: bool, v_bias: bool, o_bias: bool, prefix: str,
                 quant_config=None):
        tp_size = get_tensor_model_parallel_world_size()
        try:
            check_heads(num_heads, num_kv_heads, tp_size)
        except ValueError as e:
            raise HarpCheckpointError(f"{prefix}: {e}") from None
        kv_heads, _ = rank_heads(num_heads, num_kv_heads, tp_size,
                                 get_tensor_model_parallel_rank())
        # Sized so each rank's partition is exactly its own KV heads (also when replicated).
        super().__init__(hidden_size=hidden_size, width=len(kv_heads) * head_dim * tp_size,
                         in_bias=v_bias, out_bias=o_bias, prefix=prefix,
                         quant_config=quant_config)
        self.alpha = float(alpha)
        self.scale = 1.0 if post_norm else self.alpha
        self.n_q, self.n_kv, self.head_dim, self.kv_heads = (num_heads, num_kv_heads, head_dim,
                                                             kv_heads)
        self.expected = {"v_proj.weight", "o_proj.weight"}
        if v_bias:
            self.expected.add("v_proj.bias")
        if o_bias:
            self.expected.add("o_proj.bias")

    def _unexpected(self, name: str) -> HarpCheckpointError:
        return HarpCheckpointError(
            f"unexpected weight {self.prefix}.{name}: layer {self.layer_idx} is pruned "
            f"(alpha = {self.alpha}) and keeps only {', '.join(sorted(self.expected))}")

    def _copy(self, param: Any, value: torch.Tensor, name: str) -> None:
        if tuple(param.shape) != tuple(value.shape):
            raise HarpCheckpointError(f"{self.prefix}.{name}: shape {tuple(value.shape)} after "
                                      f"folding does not fit {tuple(param.shape)}")
        with torch.no_grad():
            param.data.copy_(value.to(param.dtype))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        assert self.in_proj is not None
        for raw_name, w in weights:
            name = _shard_name(raw_name, w)
            if name not in self.expected:
                raise self._unexpected(name)
            if name == "v_proj.weight":
                self._copy(self.in_proj.weight, fold_v(w, self.head_dim, self.kv_heads), name)
            elif name == "v_proj.bias":
                self._copy(self.in_proj.bias, fold_v(w, self.head_dim, self.kv_heads), name)
            elif name == "o_proj.weight":
                try:
                    folded = fold_o(w, self.n_q, self.n_kv, self.head_dim, self.scale,
                                    self.tp_size, self.tp_rank)
                except ValueError as e:
                    raise HarpCheckpointError(f"{self.prefix}.o_proj.weight: {e}") from None
                self._copy(self.out_proj.weight, folded, name)
            else:  # o_proj.bias: the full output bias (the row-parallel layer adds it once)
                self._copy(self.out_proj.bias, w * self.scale, name)
            self.loaded.add(name)
        return set(self.loaded)
