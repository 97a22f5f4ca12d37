"""Damage of layouts: the calibration KL of a whole layout, and of every candidate alone in
its layer (filled into the statistics, which are loaded from the cache or fitted here)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..calibration.damage import DenseRecord, record_dense, suffix_kl
from ..reference import decoder_layers
from .choices import KEEP, Choice
from .layouts import installed
from .statistics import PlanStats, fit_statistics


def layout_kl(model, layout: dict[int, Choice], stats: PlanStats, rec: DenseRecord) -> float:
    """Calibration KL(dense || model with the whole ``layout``)."""
    if not layout:
        return 0.0
    with installed(model, layout, stats):
        return suffix_kl(model, rec, min(layout))


def score_candidates(model, stats: PlanStats, rec: DenseRecord, choices: list[Choice],
                     progress: bool = True) -> None:
    """Fill ``stats.damage``: each layer's KL with only that layer changed, per choice."""
    todo = [(j, c) for j in range(len(decoder_layers(model))) for c in choices
            if c != KEEP and c.name not in stats.damage.get(j, {})]
    for j, c in tqdm(todo, disable=not progress, desc="per-layer damage", unit="candidate"):
        stats.damage.setdefault(j, {})[c.name] = layout_kl(model, {j: c}, stats, rec)


def ensure_statistics(model, windows: torch.Tensor, settings: dict, choices: list[Choice],
                      ranks: list[int | None], ridge: float, cache: Path | None,
                      progress: bool = True, long_windows: torch.Tensor | None = None
                      ) -> tuple[PlanStats, DenseRecord]:
    """Load the cached statistics or compute them (maps, FLAP scores, per-layer damage).
    With ``long_windows`` every candidate's damage is measured there, not on the first
    damage windows: a sliding window shows its damage only on windows longer than itself,
    and the other candidates are priced on the same context, their long-range losses
    included. Returns the statistics and the damage record."""
    stats = PlanStats.load(cache, settings) if cache is not None else None
    damage_windows = windows[:settings["damage_windows"]]
    if stats is None:
        t0 = time.perf_counter()
        maps, order, means, fits = fit_statistics(model, windows, ranks, ridge,
                                                  progress=progress)
        stats = PlanStats(settings, maps, order, means, fits,
                          seconds={"fit": round(time.perf_counter() - t0, 2)})
    t0 = time.perf_counter()
    every = list(range(model.config.num_hidden_layers))
    if long_windows is not None:
        rec = record_dense(model, long_windows, every, batch=1,
                           positions=settings["long"]["positions"], seed=settings["seed"])
    else:
        rec = record_dense(model, damage_windows, every, positions=settings["positions"],
                           seed=settings["seed"])
    before = sum(len(v) for v in stats.damage.values())
    score_candidates(model, stats, rec, choices, progress)
    if sum(len(v) for v in stats.damage.values()) > before:
        stats.seconds["damage"] = round(stats.seconds.get("damage", 0.0)
                                        + time.perf_counter() - t0, 2)
        if cache is not None:
            stats.save(cache)
    return stats, rec
