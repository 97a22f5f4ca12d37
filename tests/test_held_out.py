"""Ridges chosen by held-out error in closed form (``methods/held_out.py``); the planner's
``--ridge held-out`` is tested in test_plan.py."""

from __future__ import annotations

import pytest
import torch

from harp_vllm.pruning.methods.held_out import RIDGE_GRID, choose_ridge, squared_error
from harp_vllm.pruning.methods.linear import Moments, merged, solve


def _moments(x: torch.Tensor, t: torch.Tensor) -> Moments:
    m = Moments(x.shape[1])
    m.add(x, t)
    return m


def _brute_ridge(x: torch.Tensor, t: torch.Tensor, ridge: float) -> tuple[torch.Tensor, ...]:
    """Ridge regression on the centred activations, the ridge scaled as ``solve`` does."""
    mx, mt = x.mean(0), t.mean(0)
    xc, tc = x - mx, t - mt
    cxx = xc.T @ xc / len(x)
    lam = ridge * torch.trace(cxx) / x.shape[1]
    w = torch.linalg.solve(cxx + lam * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ tc / len(x))
    return w, mt - mx @ w


def _data(n: int, d: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, d)
    w = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5
    return x, x @ w + 0.5 + noise * torch.randn(n, d, generator=g, dtype=torch.float64)


def test_held_out_error_in_closed_form_equals_k_fold_on_the_activations():
    """Each fold's error, from its sums alone, is the squared error of the map fitted on the
    other folds' activations, evaluated on the fold's own activations."""
    x, t = _data(96, 12, noise=1.0)
    parts = [(x[i::4], t[i::4]) for i in range(4)]
    folds = [_moments(a, b) for a, b in parts]
    choice = choose_ridge(folds)
    var = float(((t - t.mean(0)) ** 2).sum())
    for ridge in (1e-4, 1e-2, 1.0):
        err = 0.0
        for k, (xk, tk) in enumerate(parts):
            xs = torch.cat([a for i, (a, _) in enumerate(parts) if i != k])
            ts = torch.cat([b for i, (_, b) in enumerate(parts) if i != k])
            w, b = _brute_ridge(xs, ts, ridge)
            err += float(((tk - xk @ w - b) ** 2).sum())
            assert squared_error(folds[k], w, b) == pytest.approx(
                float(((tk - xk @ w - b) ** 2).sum()), rel=1e-9)
        assert choice.held_out[ridge] == pytest.approx(err / var, rel=1e-9)
    # the chosen ridge is the curve's minimum, and its in-sample error is the whole fit's
    assert choice.held_out[choice.ridge] == min(choice.held_out.values())
    lm, stats = solve(merged(folds), choice.ridge, None, "normed")
    assert choice.in_sample == pytest.approx(stats["unexplained"], rel=1e-6)


def test_held_out_ridge_is_large_when_the_fit_overfits_and_small_when_it_does_not():
    """Few noisy tokens per input dimension: in-sample error keeps falling as the ridge
    shrinks, held-out error does not, and a strong ridge is chosen. Many clean tokens: the
    weakest ridge of the grid. A rank cut is scored the same way (one choice per rank)."""
    x, t = _data(64, 24, noise=3.0, seed=1)
    noisy = choose_ridge([_moments(x[i::4], t[i::4]) for i in range(4)])
    assert noisy.ridge >= 0.1
    assert noisy.held_out[noisy.ridge] < noisy.held_out[RIDGE_GRID[0]] - 0.05
    x, t = _data(4000, 24, noise=0.01, seed=2)
    clean = [_moments(x[i::4], t[i::4]) for i in range(4)]
    assert choose_ridge(clean).ridge == RIDGE_GRID[0]
    low = choose_ridge(clean, rank=4)
    assert low.held_out[low.ridge] > choose_ridge(clean).held_out[RIDGE_GRID[0]] + 0.05
    with pytest.raises(ValueError, match="two non-empty folds"):
        choose_ridge(clean[:1])
