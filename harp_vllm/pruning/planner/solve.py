"""The layout search: a multiple-choice knapsack over the per-layer damage (exact MILP by
HiGHS) under a KV (and speed) budget, then the best layouts re-scored as whole models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ...errors import UserError
from .. import costs
from ..calibration.damage import DenseRecord, objective
from .choices import KEEP, Choice
from .layouts import layout_text
from .retrieval import RetrievalFloor
from .scoring import layout_kl, layout_kl_parts
from .statistics import PlanStats


@dataclass
class Budget:
    kv_saving: float
    speedup: float | None = None
    context: int = 7168
    # KV bytes as vLLM allocates them at ``context``: whole blocks of this many tokens and
    # its grouping of window sizes (padding layers); None: the cost model's ideal bytes
    served_block: int | None = None


def solve_layouts(cfg: Any, damage: dict[int, dict[str, float]], choices: list[Choice],
                  budget: Budget, count: int = 1,
                  forbidden: frozenset[tuple[int, str]] = frozenset(),
                  floor: RetrievalFloor | None = None
                  ) -> list[tuple[dict[int, Choice], float]]:
    """The ``count`` best layouts by summed damage under ``budget`` (multiple-choice knapsack,
    exact MILP by HiGHS; each next layout is excluded from the following solves by a no-good
    cut), each keeping at least ``floor``'s retrieval mass if given. A candidate another one of
    its layer beats on every budgeted cost, on damage (and on retrieval mass kept) is
    left out (a full-rank map that costs less damage than the rank-192 one, under a KV budget
    alone), so the next-best layouts differ in substance. Returns (layout without the kept
    layers, predicted damage)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_layers, n_c = cfg.num_hidden_layers, len(choices)
    # each layer's own shapes: a natively windowed layer (Gemma's local ones) keeps its window
    shapes = [c.shape(cfg, j) for j in range(n_layers) for c in choices]
    # KV bytes per token at the budget's context (a windowed layer keeps min(context, W);
    # served: in whole blocks)
    kv = np.array([_layer_kv(cfg, s, budget) for s in shapes], dtype=float)
    offered = np.array([(j, c.name) not in forbidden for j in range(n_layers)
                        for c in choices])
    # a pair not offered needs no damage (shareJ is scored only where offered)
    cost = np.array([0.0 if c == KEEP or (j, c.name) in forbidden else damage[j][c.name]
                     for j in range(n_layers) for c in choices])
    rows: list[Any] = [np.kron(np.eye(n_layers), np.ones(n_c))]
    lo: list[Any] = [np.ones(n_layers)]
    hi: list[Any] = [np.ones(n_layers)]
    kv_limit = (1 - budget.kv_saving) * sum(_layer_kv(cfg, d, budget)
                                            for d in costs.dense_shapes(cfg))
    rows.append(kv[None])
    lo.append([-np.inf])
    hi.append([kv_limit + 1e-6])
    if budget.speedup is not None:
        macs = np.array([costs.layer_macs(cfg, s, budget.context) for s in shapes])
        head = cfg.hidden_size * cfg.vocab_size / budget.context
        limit = costs.model_macs(cfg, costs.dense_shapes(cfg), budget.context) / budget.speedup
        rows.append(macs[None])
        lo.append([-np.inf])
        hi.append([limit - head])
    budgeted = [kv] + ([macs] if budget.speedup is not None else [])
    if floor is not None:  # the layout keeps enough retrieval mass (retrieval.py)
        kept = np.array([floor.kept[j][c.name] for j in range(n_layers) for c in choices])
        rows.append(kept[None])
        lo.append([floor.minimum - 1e-9])
        hi.append([np.inf])
        budgeted.append(-kept)  # more kept is better
    # a sharing layer's target keeps its attention whole: x[i, shareT] <= x[T, keep] (so
    # no chain either: a target that shares is not kept)
    keep_at = choices.index(KEEP)
    for i in np.flatnonzero(offered):
        c = choices[i % n_c]
        if c.kind == "share" and c.target is not None:
            row = np.zeros(len(cost))
            row[i], row[c.target * n_c + keep_at] = 1, -1
            rows.append(row[None])
            lo.append([-np.inf])
            hi.append([0])
    # a constrained choice (shareJ) may not rule out another (its target may not be kept)
    free = np.array([c.kind != "share" for c in choices] * n_layers)
    upper = (_undominated(cost, budgeted, n_c, offered & free) & offered).astype(float)
    out: list[tuple[dict[int, Choice], float]] = []
    for _ in range(count):
        res = milp(cost, integrality=np.ones_like(cost), bounds=Bounds(0, upper),
                   constraints=LinearConstraint(np.vstack(rows), np.concatenate(lo),
                                                np.concatenate(hi)))
        if res.x is None:
            if not out:
                raise UserError(f"no layout meets the budget ({_budget_text(budget)}) with "
                                f"the candidates {', '.join(c.name for c in choices)}"
                                + ("" if floor is None else f" and keeps {floor.fraction:g} "
                                   "of the retrieval mass"))
            break
        x = np.round(res.x).astype(int)
        picked = np.flatnonzero(x)
        layout = {int(i) // n_c: choices[int(i) % n_c] for i in picked}
        out.append(({j: c for j, c in sorted(layout.items()) if c != KEEP}, float(res.fun)))
        cut = np.zeros_like(cost)
        cut[picked] = 1
        rows.append(cut[None])
        lo.append([-np.inf])
        hi.append([n_layers - 1])
    return out


def served_block(cfg: Any, choices: list[Choice]) -> int | None:
    """The block size a KV budget is counted in: vLLM's (``costs.SERVED_BLOCK``) whenever a
    layer can be windowed, natively (Gemma 3's local layers) or by a window candidate: vLLM
    then holds a window in whole blocks and groups the layer kinds with padding layers, so
    the cost model's ideal bytes overstate the saving (Gemma 3's ``17:linearfull``: 0.309
    ideal, 0.298 served at 32k). None (ideal bytes) when no layer has or is offered a window:
    every layer then holds the same blocks, and the ideal saving is vLLM's up to each
    layer's last, partly filled block."""
    native = any(costs.native_window(cfg, j) is not None for j in range(cfg.num_hidden_layers))
    windowed = native or any(c.kind == "window" for c in choices)
    return costs.SERVED_BLOCK if windowed else None


def _layer_kv(cfg: Any, shape: costs.LayerShape, budget: Budget) -> float:
    if budget.served_block is None:
        return costs.kv_bytes(cfg, shape, context=budget.context)
    return costs.kv_bytes_per_sequence(cfg, [shape], budget.context,
                                       block_size=budget.served_block) / budget.context


def served_saving(cfg: Any, layout: dict[int, Choice], budget: Budget) -> float:
    """The KV saving of ``layout`` at the budget's context as vLLM allocates it (blocks and
    the grouping's padding layers; blocks alone where the grouping is not modelled)."""
    assert budget.served_block is not None
    shapes = [layout.get(j, KEEP).shape(cfg, j) for j in range(cfg.num_hidden_layers)]
    dense = costs.dense_shapes(cfg)
    n, block = budget.context, budget.served_block
    got = costs.served_kv_bytes_per_sequence(cfg, shapes, n, block)
    if got is None:
        got = costs.kv_bytes_per_sequence(cfg, shapes, n, block_size=block)
    base = costs.kv_bytes_per_sequence(cfg, dense, n, block_size=block)
    return 1 - got / base


def solve_served(cfg: Any, damage: dict[int, dict[str, float]], choices: list[Choice],
                 budget: Budget, count: int = 1,
                 forbidden: frozenset[tuple[int, str]] = frozenset(),
                 floor: RetrievalFloor | None = None, attempts: int = 6
                 ) -> list[tuple[dict[int, Choice], float]]:
    """``solve_layouts`` under a served budget: the MILP counts whole blocks per layer
    (linear), the grouping's padding layers are not linear, so layouts short of the budget
    once padded are dropped and the solve's target raised by the shortfall until some meet
    it."""
    target = budget.kv_saving
    for _ in range(attempts):
        found = solve_layouts(cfg, damage, choices, Budget(
            target, budget.speedup, budget.context, budget.served_block), count, forbidden,
            floor)
        savings = [served_saving(cfg, layout, budget) for layout, _ in found]
        ok = [f for f, sv in zip(found, savings, strict=True) if sv >= budget.kv_saving - 1e-9]
        if ok:
            return ok
        target = min(target + budget.kv_saving - max(savings) + 0.002, 0.999)
    raise UserError(f"no layout meets the budget ({_budget_text(budget)}) as vLLM allocates "
                    f"the KV cache (blocks of {budget.served_block}, padding layers)")


def _undominated(cost: np.ndarray, budgeted: list[np.ndarray], n_c: int,
                 offered: np.ndarray) -> np.ndarray:
    """Per variable: False if another choice of the same layer in ``offered`` is no worse on
    damage and every budgeted cost and better on one (ties: the first listed stays)."""
    keep = np.ones_like(cost, dtype=bool)
    for base in range(0, len(cost), n_c):
        for a in range(base, base + n_c):
            for b in range(base, base + n_c):
                if a == b or not offered[b]:
                    continue
                vals_a = [cost[a], *(c[a] for c in budgeted)]
                vals_b = [cost[b], *(c[b] for c in budgeted)]
                if all(vb <= va for va, vb in zip(vals_a, vals_b, strict=True)) and (
                        vals_a != vals_b or b < a):
                    keep[a] = False
                    break
    return keep


def _budget_text(b: Budget) -> str:
    speed = f", prefill speed-up >= {b.speedup} at {b.context} tokens" if b.speedup else ""
    served = f" at {b.context} tokens as served" if b.served_block else ""
    return f"KV saving >= {b.kv_saving:.3f}{served}{speed}"


def solver(budget: Budget) -> Any:
    """``solve_layouts``, or ``solve_served`` for a budget counted as vLLM serves it."""
    return solve_layouts if budget.served_block is None else solve_served


@dataclass
class Planned:
    layout: dict[int, Choice]
    measured_kl: float
    tried: list[dict]


def plan_layout(model, stats: PlanStats, rec: DenseRecord, choices: list[Choice],
                budget: Budget, top_k: int = 8, rounds: int = 1, progress: bool = True,
                forbidden: frozenset[tuple[int, str]] = frozenset(),
                damage: dict[int, dict[str, float]] | None = None,
                floor: RetrievalFloor | None = None) -> Planned:
    """Solve, then re-score the ``top_k`` best layouts as whole models on ``rec`` (held-out
    calibration windows, so the pick is not fitted to the damage windows' noise). Each further
    round corrects the estimates of the best layout's changed layers to their in-context marginal
    damage (the layout's KL minus its KL with that layer restored) and solves again. The best
    measured layout of all rounds wins. ``damage``: the per-layer prices (default
    ``stats.damage``; ``probe_prices.py`` adds the recall probe's); ``floor``: the retrieval
    mass every layout keeps (``retrieval.py``)."""
    cfg = model.config
    damage = {j: dict(v) for j, v in (stats.damage if damage is None else damage).items()}
    tried: list[dict] = []
    seen: dict[str, tuple[dict[int, Choice], float]] = {}
    solve = solver(budget)
    for r in range(rounds):
        found = solve(cfg, damage, choices, budget, top_k, forbidden, floor)
        for layout, predicted in tqdm(found, disable=not progress, unit="layout",
                                      desc=f"re-score layouts (round {r + 1}/{rounds})"):
            key = layout_text(layout)
            if key not in seen:
                parts = layout_kl_parts(model, layout, stats, rec)
                kl = objective(rec, parts)
                seen[key] = (layout, kl)
                tried.append({"round": r + 1, "layout": key,
                              "predicted_kl": round(predicted, 5), "measured_kl": round(kl, 5),
                              **({"kl_parts": {g: round(v, 5) for g, v in parts.items()}}
                                 if len(parts) > 1 else {})})
        best_layout, best_kl = min(seen.values(), key=lambda t: t[1])
        if r + 1 < rounds:  # in-context marginals of the best layout's changes
            for j, c in tqdm(best_layout.items(), disable=not progress, unit="layer",
                             desc="in-context damage"):
                rest = {k: v for k, v in best_layout.items() if k != j}
                damage[j][c.name] = max(best_kl - layout_kl(model, rest, stats, rec), 0.0)
    return Planned(best_layout, best_kl, tried)
