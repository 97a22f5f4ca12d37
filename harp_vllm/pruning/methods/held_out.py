"""Ridge strengths (and reduced ranks) chosen by held-out error, in closed form.

The calibration windows are split into ``k`` folds (by window, so a fold's tokens never share
a window with its training tokens). Each fold keeps its own streamed moments
(:class:`~.linear.Moments`); a map fitted on the other folds' moments (their sum) is scored
on the fold's tokens without seeing them again, because its squared error is a quadratic form
of the fold's sums::

    sum_i ||t_i - x_i W - b||^2 = S_tt - 2 tr(W^T S_xt) - 2 b.S_t
                                  + tr(W^T S_xx W) + 2 (S_x W).b + n b.b

So every ridge of a grid, and every rank cut of each, is scored on every fold for the cost of
a few ``d x d`` solves and products (the fits are ``linear.solve``'s, ``affine_fit``). The
cross-validated error is the folds' held-out squared error over the target's total variation
(``1 - R^2`` out of sample); the ridge chosen is the grid's lowest, ties to the larger ridge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .linear import Moments, affine_fit, merged

RIDGE_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
FOLDS = 4


def ridge_fits(train: Moments, ridges: tuple[float, ...], rank: int | None
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(W, b) of ``linear.solve``'s fit (float64) for each ridge."""
    return [affine_fit(train, ridge, rank)[:2] for ridge in ridges]


def squared_error(test: Moments, w: torch.Tensor, b: torch.Tensor) -> float:
    """Sum over ``test``'s tokens of ``||t - x W - b||^2``, from its sums alone."""
    sxw = test.sx @ w
    return float(test.stt - 2 * (w * test.sxt).sum() - 2 * b @ test.st
                 + ((test.sxx @ w) * w).sum() + 2 * sxw @ b + test.n * b @ b)


@dataclass
class RidgeChoice:
    """One map's ridge chosen by cross-validation, with the curve it was chosen from."""

    ridge: float
    held_out: dict[float, float]  # ridge -> cross-validated relative error (1 - R^2)
    in_sample: float  # the chosen ridge's relative error on the tokens it was fitted on

    def report(self) -> dict:
        return {"ridge": self.ridge, "held_out": round(self.held_out[self.ridge], 5),
                "in_sample": round(self.in_sample, 5),
                "curve": {f"{r:g}": round(e, 5) for r, e in self.held_out.items()}}


def total_variation(m: Moments) -> float:
    """Sum over tokens of ``||t - mean(t)||^2``."""
    return float(m.stt - m.st @ m.st / m.n)


def choose_ridge(folds: list[Moments], rank: int | None = None,
                 grid: tuple[float, ...] = RIDGE_GRID) -> RidgeChoice:
    """The ridge of ``grid`` whose maps, each fitted without one fold, predict that fold
    best (summed over folds); ties go to the larger ridge."""
    if len(folds) < 2 or any(f.n == 0 for f in folds):
        raise ValueError("cross-validation needs at least two non-empty folds")
    total = merged(folds)
    errors = dict.fromkeys(grid, 0.0)
    for k, fold in enumerate(folds):
        train = merged([f for i, f in enumerate(folds) if i != k])
        for ridge, (w, b) in zip(grid, ridge_fits(train, grid, rank), strict=True):
            errors[ridge] += squared_error(fold, w, b)
    var = total_variation(total)
    held_out = {r: e / var for r, e in errors.items()}
    best = min(reversed(grid), key=lambda r: held_out[r])
    (w, b), = ridge_fits(total, (best,), rank)
    return RidgeChoice(best, held_out, squared_error(total, w, b) / var)
