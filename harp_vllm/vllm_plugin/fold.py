"""The V·O fold of a pruned (token-local) attention layer, per tensor-parallel rank.

A pruned layer computes ``alpha * o_proj(repeat_kv(v_proj(x)))``. ``repeat_kv`` feeds KV head
``g`` to the query heads ``g*r .. g*r+r-1`` (``r = n_q / n_kv``), so the ``r`` column blocks of
``W_O`` that read the same KV head can be summed once at load time::

    W_O [d, n_q*d_h] -> [d, n_kv, r, d_h] -> sum over r -> alpha * [d, n_kv*d_h]

and the layer becomes two matmuls ``d -> n_kv*d_h -> d`` with no ``repeat_kv``.

Tensor parallelism follows vLLM's attention split: rank ``k`` of ``tp`` owns the query heads
``k*n_q/tp ..`` and the KV heads those read (``n_kv/tp`` of them, or one replicated KV head when
``n_kv < tp``). Each rank folds only its own query heads into its own KV heads; the row-parallel
all-reduce of the output sums the ranks, which is exactly the sum over all query heads.

Pure torch (no vLLM import) so the arithmetic is unit-testable.
"""

from __future__ import annotations

import torch


def check_heads(n_q: int, n_kv: int, tp_size: int) -> None:
    """The head split vLLM's own attention accepts; ValueError otherwise."""
    if n_kv <= 0 or n_q % n_kv:
        raise ValueError(f"num_attention_heads ({n_q}) must be a multiple of "
                         f"num_key_value_heads ({n_kv})")
    if n_q % tp_size:
        raise ValueError(f"num_attention_heads ({n_q}) must be divisible by the tensor "
                         f"parallel size ({tp_size})")
    if (n_kv >= tp_size and n_kv % tp_size) or (n_kv < tp_size and tp_size % n_kv):
        raise ValueError(f"num_key_value_heads ({n_kv}) and the tensor parallel size "
                         f"({tp_size}) must divide one another")


def rank_heads(n_q: int, n_kv: int, tp_size: int = 1, tp_rank: int = 0
               ) -> tuple[list[int], list[int]]:
    """(KV heads, query heads) owned by ``tp_rank``, as global head indices."""
    check_heads(n_q, n_kv, tp_size)
    q_per_rank = n_q // tp_size
    q_heads = list(range(tp_rank * q_per_rank, (tp_rank + 1) * q_per_rank))
    r = n_q // n_kv
    kv_heads = sorted({q // r for q in q_heads})
    return kv_heads, q_heads


def fold_v(v_weight: torch.Tensor, head_dim: int, kv_heads: list[int]) -> torch.Tensor:
    """Rows of ``v_proj`` (weight ``[n_kv*d_h, d]`` or bias ``[n_kv*d_h]``) for ``kv_heads``."""
    return torch.cat([v_weight[g * head_dim:(g + 1) * head_dim] for g in kv_heads], dim=0)


def fold_o(o_weight: torch.Tensor, n_q: int, n_kv: int, head_dim: int, scale: float = 1.0,
           tp_size: int = 1, tp_rank: int = 0) -> torch.Tensor:
    """``scale`` times the folded ``o_proj`` weight of ``tp_rank``: ``[d, len(kv_heads)*d_h]``.

    ``o_weight`` is the full (unsharded) ``[d, n_q*d_h]`` checkpoint weight. Accumulates in
    float64 and returns ``o_weight``'s dtype.
    """
    d, width = o_weight.shape
    if width != n_q * head_dim:
        raise ValueError(f"o_proj weight has {width} input columns, expected "
                         f"num_attention_heads*head_dim = {n_q}*{head_dim}")
    kv_heads, q_heads = rank_heads(n_q, n_kv, tp_size, tp_rank)
    r = n_q // n_kv
    blocks = o_weight.double().reshape(d, n_q, head_dim)
    out = torch.zeros(d, len(kv_heads), head_dim, dtype=torch.float64)
    for q in q_heads:
        out[:, kv_heads.index(q // r)] += blocks[:, q]
    return (out * scale).reshape(d, -1).to(o_weight.dtype)
