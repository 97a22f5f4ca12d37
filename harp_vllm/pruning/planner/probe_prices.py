"""The recall probe in the per-layer price (``--probe-prices``): each candidate costs its text
damage plus the probe's weight times its probe damage (KL at the recalled codes' digits, the
candidate alone in its layer), so the solver sees what a change costs retrieval, not only text.

Measuring every candidate on the probe's long windows costs about half a minute each on
SmolLM2 at 7,168 tokens (300+ candidates: hours). The prices are therefore measured lazily:
solve with the probe damage known so far (unknown = 0, a lower bound: KL is never negative),
measure the probe damage of the best layout's unpriced choices, solve again, until the best
layout's choices are all priced. That layout is then optimal under the full prices, as if
every candidate had been measured (every other layout's price is at least its lower bound,
which is at least the best's). The measured prices are cached with the statistics."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..calibration.damage import DenseRecord
from .choices import Choice
from .scoring import layout_kl_parts
from .statistics import PlanStats

MAX_ROUNDS = 30  # lazy pricing rounds before the solver's layout is taken as it stands


@dataclass
class ProbePricing:
    """What the lazy pricing did: the rounds, the (layer, choice) probe prices it measured
    this run and in all, and whether the last layout was priced throughout."""

    weight: float
    rounds: int = 0
    measured: dict[str, float] = field(default_factory=dict)  # "layer:choice" -> probe KL
    converged: bool = False
    cached: int = 0  # prices read from the cache

    def report(self) -> dict:
        return {"weight": self.weight, "rounds": self.rounds, "converged": self.converged,
                "measured_now": len(self.measured), "from_cache": self.cached,
                "probe_kl": {k: round(v, 5) for k, v in sorted(
                    self.measured.items(), key=lambda kv: (int(kv[0].split(":")[0]), kv[0]))}}


def probe_key(settings: dict) -> str:
    """The cache key of one probe's prices (its windows' length, count, period and seed)."""
    return json.dumps(settings, sort_keys=True)


def priced(damage: dict[int, dict[str, float]], probe: dict[int, dict[str, float]],
           weight: float) -> dict[int, dict[str, float]]:
    """Text damage plus ``weight`` times the probe damage where it is known."""
    return {j: {n: v + weight * probe.get(j, {}).get(n, 0.0) for n, v in by.items()}
            for j, by in damage.items()}


def price_lazily(model, stats: PlanStats, probe_rec: DenseRecord, weight: float,
                 store: dict[int, dict[str, float]],
                 solve_best: Callable[[dict[int, dict[str, float]]], dict[int, Choice]],
                 save: Callable[[], None] | None = None, progress: bool = True,
                 max_rounds: int = MAX_ROUNDS) -> tuple[dict[int, dict[str, float]], Any]:
    """Lazy probe prices (module docstring): ``solve_best(prices)`` returns the solver's best
    layout under ``prices``; the probe damage of each of its unpriced choices is measured on
    ``probe_rec`` into ``store`` (layer -> choice name -> KL; ``save`` after each round).
    Returns the final prices and the ``ProbePricing`` record."""
    record = ProbePricing(weight, cached=sum(len(v) for v in store.values()))
    for _ in range(max_rounds):
        layout = solve_best(priced(stats.damage, store, weight))
        todo = [(j, c) for j, c in sorted(layout.items()) if c.name not in store.get(j, {})]
        record.rounds += 1
        if not todo:
            record.converged = True
            break
        for j, c in tqdm(todo, disable=not progress, unit="candidate",
                         desc=f"probe prices (round {record.rounds})"):
            kl = layout_kl_parts(model, {j: c}, stats, probe_rec)["probe"]
            store.setdefault(j, {})[c.name] = kl
            record.measured[f"{j}:{c.name}"] = kl
        if save is not None:
            save()
    return priced(stats.damage, store, weight), record
