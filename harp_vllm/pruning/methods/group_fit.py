"""Removed KV groups predicted by a fitted linear map (the planner's ``drop1lin``, ...).

FLAP removes a layer's weakest KV groups and adds their calibration-mean output as a bias.
Here the removed heads' outputs ``z`` (their o_proj input channels) are instead predicted from
the attention's own normed input ``x`` by ridge least squares::

    z ~ x A + c,   A = (C_xx + lam I)^-1 C_xz,   c = E[z] - E[x] A

and fed through the o_proj columns they had: the layer keeps its other groups' attention and
adds ``W_O[:, gone] (x A_gone + c_gone)``. For a full-column-rank ``W_O[:, gone]`` the
least-squares fit of ``z`` is also the least-squares fit of the removed heads' contribution to
the attention output, so one regression of every head serves every subset of groups. The
groups removed are those the map predicts best: the least residual output energy
``tr(W_S R_SS W_S^T)`` (``R`` the residual covariance of ``z``, ``W_S`` the o_proj columns of
the subset ``S``) over every subset of each size, instead of FLAP's fluctuation score.

It generalises HARP's token-local path (which predicts a head's output by its value vector,
an attention matrix fixed to the identity) to the best linear prediction, and NBL's
closed-form replacement to part of a layer: the layer keeps its most context-dependent heads
and their KV cache. Cost: ``2*d*R`` MACs per token, ``R`` the removed heads' width.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..heads import channels_of
from .linear import Moments


class HeadMoments:
    """Streamed moments of one layer's o_proj input ``z`` and its cross moments with the
    attention input ``x`` (float64; ``x``'s own moments live in ``linear.Moments``)."""

    def __init__(self, d: int, width: int):
        self.n = 0
        self.sz = torch.zeros(width, dtype=torch.float64)
        self.szz = torch.zeros(width, width, dtype=torch.float64)
        self.sxz = torch.zeros(d, width, dtype=torch.float64)

    def add(self, x: torch.Tensor, z: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        z = z.reshape(-1, z.shape[-1]).double()
        self.n += z.shape[0]
        self.sz += z.sum(0)
        self.szz += z.T @ z
        self.sxz += x.T @ z


@dataclass
class GroupFit:
    """One layer's head predictor and the KV groups to remove for each count."""

    weight: torch.Tensor  # A [d, H*h]
    bias: torch.Tensor  # c [H*h]
    gone: dict[int, list[int]]  # k -> the k groups to remove (sorted)
    residual: dict[int, float]  # k -> their relative residual output energy

    def map_weights(self, w_o: torch.Tensor, k: int, head_dim: int, group: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(in_proj weight [R, d], in_proj bias [R], out_proj weight [d, R]) of the map that
        stands in for the ``k`` removed groups; ``w_o`` is the dense o_proj weight."""
        cols = _group_channels(self.gone[k], head_dim, group)
        return (self.weight[:, cols].T.contiguous().float(), self.bias[cols].float(),
                w_o[:, cols].contiguous().float())


def _group_channels(groups: list[int], head_dim: int, group: int) -> torch.Tensor:
    return channels_of([g * group + j for g in groups for j in range(group)], head_dim)


def fit_groups(mx: Moments, mz: HeadMoments, w_o: torch.Tensor, head_dim: int, group: int,
               ridge: float) -> GroupFit:
    """Regress every head's output on ``x`` and pick, for each count ``k`` of groups to
    remove (1 .. groups - 1), the subset whose contribution is predicted best."""
    n = mx.n
    mean_x, mean_z = mx.sx / n, mz.sz / n
    cxx = mx.sxx / n - torch.outer(mean_x, mean_x)
    cxz = mz.sxz / n - torch.outer(mean_x, mean_z)
    czz = mz.szz / n - torch.outer(mean_z, mean_z)
    d = cxx.shape[0]
    lam = ridge * torch.trace(cxx) / d
    a = torch.linalg.solve(cxx + lam * torch.eye(d, dtype=cxx.dtype), cxz)
    c = mean_z - mean_x @ a
    # Residual covariance of z - (x A + c): C_zz - A^T C_xz - C_zx A + A^T C_xx A.
    res = czz - a.T @ cxz - cxz.T @ a + a.T @ cxx @ a
    w = w_o.double()
    groups = w.shape[1] // (head_dim * group)
    gone: dict[int, list[int]] = {}
    residual: dict[int, float] = {}
    for k in range(1, groups):
        best = None
        for subset in itertools.combinations(range(groups), k):
            cols = _group_channels(list(subset), head_dim, group)
            ws = w[:, cols]
            err = float(torch.trace(ws @ res[cols][:, cols] @ ws.T))
            var = float(torch.trace(ws @ czz[cols][:, cols] @ ws.T))
            if best is None or err < best[0]:
                best = (err, list(subset), err / max(var, 1e-30))
        assert best is not None
        gone[k], residual[k] = best[1], best[2]
    return GroupFit(a.float(), c.float(), gone, residual)
