"""What every layout is assembled and scored from, fitted once on the dense model and cached:
the linear maps (one per rank), FLAP's group order and compensation means, the group maps,
and the per-layer damage filled in by ``scoring.py``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ...errors import UserError
from ...families import head_dim
from ..heads import group_size
from ..methods.group_fit import GroupFit, HeadMoments, fit_groups
from ..methods.held_out import FOLDS, RidgeChoice, choose_ridge
from ..methods.linear import LinearMap, Moments, merged, solve
from ..methods.structured import LayerStats, group_scores
from ..reference import decoder_layers

STATS_VERSION = 2


@dataclass
class PlanStats:
    """Everything a layout is assembled and scored from (cached between runs)."""

    settings: dict
    maps: dict[str, dict[int, LinearMap]]  # rank key ("192", "full") -> layer -> map
    flap_order: dict[int, list[int]]  # layer -> KV groups, lowest FLAP score first
    attn_mean: dict[int, torch.Tensor]  # layer -> mean o_proj input (bias compensation)
    group_fits: dict[int, GroupFit]  # layer -> head predictor and groups to remove
    damage: dict[int, dict[str, float]] = field(default_factory=dict)  # layer -> choice -> KL
    seconds: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # e.g. cached dense perplexities

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"version": STATS_VERSION, "settings": self.settings,
                    "maps": {k: {j: vars(m) for j, m in v.items()} for k, v in self.maps.items()},
                    "flap_order": self.flap_order, "attn_mean": self.attn_mean,
                    "group_fits": {j: vars(f) for j, f in self.group_fits.items()},
                    "damage": self.damage, "seconds": self.seconds, "extra": self.extra}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, settings: dict) -> PlanStats | None:
        if not path.is_file():
            return None
        raw = torch.load(path, weights_only=False)
        if raw.get("version") != STATS_VERSION or raw.get("settings") != settings:
            return None
        maps = {k: {j: LinearMap(**m) for j, m in v.items()} for k, v in raw["maps"].items()}
        fits = {j: GroupFit(**f) for j, f in raw["group_fits"].items()}
        return cls(settings, maps, raw["flap_order"], raw["attn_mean"], fits, raw["damage"],
                   raw["seconds"], raw["extra"])


def rank_key(rank: int | None) -> str:
    return "full" if rank is None else str(rank)


def share_key(j: int, target: int) -> str:
    """The key of layer ``j``'s refit to ``target`` in ``PlanStats.extra["share_fits"]``."""
    return f"{j}:{target}"


SHARE_FIT_LOGITS = 2**22  # at most this many query-key pairs per head in a sharing refit


def fit_shares(model, stats: PlanStats, pairs: list[tuple[int, int]], windows: torch.Tensor,
               progress: bool = True) -> bool:
    """Refit the q/o of each (layer, target) pair of ``pairs`` to the target's keys and values
    (``share_fit.py``) on the first of ``windows`` (as many as keep the logits to
    ``SHARE_FIT_LOGITS`` pairs per head), into ``stats.extra["share_fits"]``. Returns whether
    any was fitted (the caller saves the cache)."""
    from ..methods.share_fit import fit_shared

    fits = stats.extra.setdefault("share_fits", {})
    todo = [(j, t) for j, t in pairs if share_key(j, t) not in fits]
    count = max(1, min(len(windows), SHARE_FIT_LOGITS // windows.shape[1] ** 2))
    for j, t in tqdm(todo, disable=not progress or len(todo) < 2, desc="sharing refits",
                     unit="pair"):
        f = fit_shared(model, j, t, windows[:count])
        fits[share_key(j, t)] = {"q_weight": f.q_weight, "o_weight": f.o_weight,
                                 "logit_error": f.logit_error, "output_error": f.output_error}
    return bool(todo)


def stats_path(cache_root: Path, settings: dict) -> Path:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root / "plan-stats" / f"{digest}.pt"


@dataclass
class Fitted:
    """What one dense pass fits: the linear maps (rank key -> layer -> map), FLAP's group
    order and compensation means, the group maps, and (``ridge=None``) each map's ridge
    chosen by held-out error (rank key -> layer -> choice)."""

    maps: dict[str, dict[int, LinearMap]]
    flap_order: dict[int, list[int]]
    attn_mean: dict[int, torch.Tensor]
    group_fits: dict[int, GroupFit]
    ridges: dict[str, dict[int, RidgeChoice]] = field(default_factory=dict)
    # ``hold > 0``: the maps and group maps fitted without the first ``hold`` windows
    damage_maps: dict[str, dict[int, LinearMap]] | None = None
    damage_group_fits: dict[int, GroupFit] | None = None

    def ridge_report(self) -> dict:
        """Per rank and layer: the chosen ridge, its held-out and in-sample error, the curve."""
        return {rk: {j: c.report() for j, c in by_layer.items()}
                for rk, by_layer in self.ridges.items()}


@torch.no_grad()
def fit_statistics(model, windows: torch.Tensor, ranks: list[int | None], ridge: float | None,
                   batch: int = 8, progress: bool = True, hold: int = 0) -> Fitted:
    """One dense pass over ``windows``: each layer's attention input/output moments (the
    linear maps, one per rank), its o_proj input statistics (FLAP's group scores and the
    compensation means) and their cross moments with the input (the group maps).

    ``ridge=None`` chooses every map's ridge by held-out error (``held_out.py``): the
    moments are kept per fold of windows (window ``i`` in fold ``i % FOLDS``), each rank's
    ridge is the one whose maps best predict the fold they were not fitted on, and the group
    maps take the full-rank map's ridge (they regress the same input on the heads' outputs,
    whose o_proj image is that map's target).

    ``hold > 0`` also fits every map without the first ``hold`` windows (the damage windows),
    with the same ridges, so a candidate's damage can be measured on tokens its map never
    saw (``Fitted.damage_maps``, ``damage_group_fits``)."""
    cfg = model.config
    d, hd, r = cfg.hidden_size, head_dim(cfg), group_size(cfg)
    layers: Any = decoder_layers(model)
    folds = FOLDS if ridge is None else 1
    if folds > len(windows):
        raise UserError(f"choosing the ridge by held-out error needs at least {folds} "
                        f"calibration windows, got {len(windows)}")
    if not 0 <= hold < len(windows):
        raise UserError(f"the damage windows ({hold}) must leave calibration windows to fit "
                        f"on (of {len(windows)})")
    # moments per (fold, held out of the damage maps), and the heads' per held-out flag
    held_flags = (False, True) if hold else (False,)
    groups = [(f, h) for f in range(folds) for h in held_flags]
    moments = [{g: Moments(d) for g in groups} for _ in layers]
    heads = [{h: HeadMoments(d, cfg.num_attention_heads * hd) for h in held_flags}
             for _ in layers]
    flap = [LayerStats() for _ in layers]
    o_inputs: dict[int, torch.Tensor] = {}
    # the running batch's rows per group (window i: fold i % folds, held out if i < hold)
    picks: dict[tuple[int, bool], list[int]] = {}
    handles = []
    for j, layer in enumerate(layers):
        def attn_hook(module, args, kw, out, j=j):  # runs after o_hook (inside the attention)
            x, t, z = kw["hidden_states"], out[0], o_inputs.pop(j)
            for g, rows in picks.items():
                moments[j][g].add(x[rows], t[rows])
            for h, hm in heads[j].items():
                rows = [k for g, part in picks.items() if g[1] == h for k in part]
                if rows:
                    hm.add(x[rows], z[rows])

        def o_hook(module, args, j=j):
            o_inputs[j] = args[0]
            flap[j].add_attn(args[0], module.weight, hd, contributions=False)

        handles.append(layer.self_attn.register_forward_hook(attn_hook, with_kwargs=True))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(o_hook))
    try:
        for i in tqdm(range(0, len(windows), batch), disable=not progress,
                      desc="plan statistics", unit="batch"):
            picks.clear()
            for k, w in enumerate(range(i, min(i + batch, len(windows)))):
                picks.setdefault((w % folds, w < hold), []).append(k)
            model.model(input_ids=windows[i:i + batch], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    whole = [merged(list(m.values())) for m in moments]
    all_heads = [merged(list(h.values())) for h in heads]
    choices: dict[str, dict[int, RidgeChoice]] = {}
    if ridge is None:
        keys = list(dict.fromkeys([*ranks, None]))
        by_fold = [[merged([m[g] for g in groups if g[0] == f]) for f in range(folds)]
                   for m in moments]
        for rk in tqdm(keys, disable=not progress, desc="ridges by held-out error",
                       unit="rank"):
            choices[rank_key(rk)] = {j: choose_ridge(m, rk) for j, m in enumerate(by_fold)}

    def ridge_of(rk: int | None, j: int) -> float:
        return ridge if ridge is not None else choices[rank_key(rk)][j].ridge

    def fit_maps(xs: list[Moments], hs: list[HeadMoments]
                 ) -> tuple[dict[str, dict[int, LinearMap]], dict[int, GroupFit]]:
        maps = {rank_key(rk): {j: solve(m, ridge_of(rk, j), rk, "normed")[0]
                               for j, m in enumerate(xs)} for rk in ranks}
        fits = {j: fit_groups(xs[j], hs[j], layers[j].self_attn.o_proj.weight.data, hd, r,
                              ridge_of(None, j)) for j in range(len(layers))}
        return maps, fits

    maps, fits = fit_maps(whole, all_heads)
    order = {j: torch.argsort(group_scores("flap", s, layers[j].self_attn.o_proj.weight.data,
                                           hd, r)).tolist() for j, s in enumerate(flap)}
    means = {j: s.attn_mean() for j, s in enumerate(flap)}
    fitted = Fitted(maps, order, means, fits, choices)
    if hold:
        rest = [merged([m[g] for g in groups if not g[1]]) for m in moments]
        fitted.damage_maps, fitted.damage_group_fits = fit_maps(rest, [h[False] for h in heads])
    return fitted


def statistics_settings(model_dir: Path, calib: dict, fit_shape: tuple[int, int],
                        damage_windows: int, positions: int, ranks: list[int | None],
                        ridge: float | None, seed: int) -> dict:
    """What the cached statistics depend on (the cache key)."""
    cfg_hash = hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()[:16]
    weights = sorted(Path(model_dir).glob("*.safetensors"))
    sizes = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in weights]
    return {"model_dir": str(Path(model_dir).resolve()), "config": cfg_hash, "weights": sizes,
            "calibration": calib, "fit_samples": fit_shape[0], "fit_seq_len": fit_shape[1],
            "damage_windows": damage_windows, "positions": positions,
            "ranks": [rank_key(r) for r in ranks],
            "ridge": "held-out" if ridge is None else ridge, "seed": seed}
