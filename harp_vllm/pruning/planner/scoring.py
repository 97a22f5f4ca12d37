"""Damage of layouts: the calibration KL of a whole layout, and of every candidate alone in
its layer (filled into the statistics, which are loaded from the cache or fitted here)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..calibration.damage import DenseRecord, objective, record_dense, suffix_kl_parts
from ..reference import decoder_layers
from .choices import KEEP, Choice
from .layouts import installed
from .statistics import PlanStats, fit_shares, fit_statistics


def layout_kl(model, layout: dict[int, Choice], stats: PlanStats, rec: DenseRecord) -> float:
    """Calibration KL(dense || model with the whole ``layout``): the record's objective over
    :func:`layout_kl_parts`."""
    return objective(rec, layout_kl_parts(model, layout, stats, rec))


def layout_kl_parts(model, layout: dict[int, Choice], stats: PlanStats, rec: DenseRecord
                    ) -> dict[str, float]:
    """KL per token of each part of the record (``text``, and ``probe`` when a recall probe
    is merged in), unweighted, with the whole ``layout`` installed (run from its first changed
    layer, or from an earlier layer a ``shareJ`` layer reads the keys and values of)."""
    if not layout:
        return {g: 0.0 for g in dict.fromkeys(rec.batch_groups())}
    start = min([*layout, *(c.target for c in layout.values() if c.target is not None)])
    with installed(model, layout, stats):
        return suffix_kl_parts(model, rec, start)


def score_candidates(model, stats: PlanStats, rec: DenseRecord, choices: list[Choice],
                     progress: bool = True, damage: dict | None = None,
                     skip: frozenset[tuple[int, str]] = frozenset()) -> None:
    """Fill ``damage`` (default ``stats.damage``): each layer's KL with only that layer
    changed, per choice (but the (layer, choice name) pairs in ``skip``, never offered)."""
    damage = stats.damage if damage is None else damage
    todo = [(j, c) for j in range(len(decoder_layers(model))) for c in choices
            if c != KEEP and c.name not in damage.get(j, {}) and (j, c.name) not in skip]
    for j, c in tqdm(todo, disable=not progress, desc="per-layer damage", unit="candidate"):
        damage.setdefault(j, {})[c.name] = layout_kl(model, {j: c}, stats, rec)


def long_key(long: dict) -> str:
    return json.dumps(long, sort_keys=True)


def window_damage_path(cache: Path | None, settings: dict, long: dict) -> Path | None:
    """Where the windows' damage is kept apart from the statistics: a window changes no map,
    so its damage does not depend on the maps' settings (ridge, ranks) and is reused when
    only those change."""
    if cache is None:
        return None
    key = {k: v for k, v in settings.items() if k not in ("ridge", "ranks", "damage_maps")}
    digest = hashlib.sha256(json.dumps([key, long], sort_keys=True).encode()).hexdigest()[:16]
    return cache.with_name(f"windows-{digest}.pt")


def save_window_damage(path: Path, store: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(store, tmp)
    tmp.replace(path)


def ensure_statistics(model, windows: torch.Tensor, settings: dict, choices: list[Choice],
                      ranks: list[int | None], ridge: float | None, cache: Path | None,
                      progress: bool = True, long_windows: torch.Tensor | None = None,
                      long: dict | None = None, held_out_damage: bool = False,
                      skip: frozenset[tuple[int, str]] = frozenset(),
                      shares: list[tuple[int, int]] | None = None
                      ) -> tuple[PlanStats, DenseRecord]:
    """Load the cached statistics or compute them (maps, FLAP scores, per-layer damage).
    The sliding-window candidates' damage is measured on ``long_windows`` (settings
    ``long``): a window shows its damage only on text longer than itself. It is cached beside
    the rest (``extra["long_damage"]``) and merged into ``stats.damage``. With
    ``held_out_damage`` the maps' damage is measured with maps fitted without the damage
    windows (``extra["damage_fits"]``), so it is not flattered by the fit. The sharing
    refits of ``shares`` (layer, target) and of every ``shareJ`` candidate a layer is offered
    (not in ``skip``) come first (``fit_shares``; with ``held_out_damage`` on windows past
    the damage windows). Returns the statistics and the damage record."""
    stats = PlanStats.load(cache, settings) if cache is not None else None
    damage_windows = windows[:settings["damage_windows"]]
    if stats is None:
        t0 = time.perf_counter()
        hold = settings["damage_windows"] if held_out_damage else 0
        fitted = fit_statistics(model, windows, ranks, ridge, progress=progress, hold=hold)
        stats = PlanStats(settings, fitted.maps, fitted.flap_order, fitted.attn_mean,
                          fitted.group_fits, seconds={"fit": round(time.perf_counter() - t0, 2)},
                          extra={"ridges": fitted.ridge_report()} if fitted.ridges else {})
        if fitted.damage_maps is not None:
            stats.extra["damage_fits"] = {"maps": fitted.damage_maps,
                                          "group_fits": fitted.damage_group_fits}
    every = list(range(model.config.num_hidden_layers))
    pairs = list(shares or []) + [(j, c.target) for c in choices for j in every
                                  if c.kind == "share" and c.target is not None
                                  and (j, c.name) not in skip]
    hold = settings["damage_windows"] if held_out_damage else 0
    if fit_shares(model, stats, pairs, windows[hold:], progress) and cache is not None:
        stats.save(cache)
    t0 = time.perf_counter()
    rec = record_dense(model, damage_windows, every, positions=settings["positions"],
                       seed=settings["seed"])
    before = sum(len(v) for v in stats.damage.values())
    long_scored = False
    short = [c for c in choices if c.kind != "window"]
    fits = stats.extra.get("damage_fits")
    scorer = stats if fits is None else replace(stats, maps=fits["maps"],
                                                group_fits=fits["group_fits"])
    score_candidates(model, scorer, rec, short, progress, stats.damage, skip)
    if cache is not None and sum(len(v) for v in stats.damage.values()) > before:
        stats.save(cache)  # kept if the long windows' scoring is stopped
    windowed = [c for c in choices if c.kind == "window"]
    if windowed and long_windows is not None and long is not None:
        store = stats.extra.setdefault("long_damage", {}).setdefault(long_key(long), {})
        side = window_damage_path(cache, settings, long)
        if side is not None and side.is_file():  # measured under other maps' settings
            for j, by_name in torch.load(side, weights_only=False).items():
                store.setdefault(j, {}).update(by_name)
        missing = any(c.name not in store.get(j, {}) for j in range(len(decoder_layers(model)))
                      for c in windowed)
        if missing:
            long_rec = record_dense(model, long_windows, every, batch=1,
                                    positions=long["positions"], seed=settings["seed"])
            score_candidates(model, stats, long_rec, [KEEP, *windowed], progress, store)
            long_scored = True
        if side is not None and (missing or not side.is_file()):
            save_window_damage(side, store)
        for j, by_name in store.items():
            stats.damage.setdefault(j, {}).update(by_name)
    if long_scored or sum(len(v) for v in stats.damage.values()) > before:
        stats.seconds["damage"] = round(stats.seconds.get("damage", 0.0)
                                        + time.perf_counter() - t0, 2)
        if cache is not None:
            stats.save(cache)
    return stats, rec
