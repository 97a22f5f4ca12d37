"""``harp-vllm plan``: choose every layer's attention under a KV (and speed) budget.

Per layer the candidates are: keep the attention; remove ``k`` of its KV groups by FLAP's
score with bias compensation (``drop1``, ``drop2``, ...); remove ``k`` groups and predict their
heads' outputs by a fitted linear map added to the rest (``drop1lin``, ...: ``group_fit.py``);
replace it by the fitted linear map of ``linear.py`` (``linear192``, ``linearfull``: one per
rank); remove it (``remove``). Each
has exact costs from ``costs.py`` and a quality estimate: the calibration KL(dense || model
with only that layer changed) (``damage.py``). A multiple-choice knapsack picks one candidate
per layer minimising the summed estimates under ``KV bytes <= (1 - saving) * dense`` (and,
with a speed budget, ``MACs <= dense / speedup``), solved exactly as a MILP by SciPy's HiGHS.
Per-layer damage is not additive, so the ``top_k`` best layouts (no-good cuts) are assembled
and re-scored on the calibration windows as whole models; the best measured one wins.

Everything is fitted on the dense model (FLAP's statistics and group scores, the maps'
moments), so a layout is assembled by swapping modules and the statistics are computed once
per model and settings and cached (``$HARP_VLLM_CACHE/plan-stats``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from ..families import head_dim
from . import costs
from .damage import DenseRecord, record_dense, suffix_kl
from .group_fit import GroupFit, HeadMoments, fit_groups
from .heads import ATTENTION_PROJECTIONS, add_biases, group_size, keep_groups
from .linear import LinearMap, Moments, solve
from .reference import (
    GroupMap,
    TokenLocalAttention,
    attach_group_map,
    decoder_layers,
    install_map,
)
from .structured import LayerStats, compensate_attention, group_scores

STATS_VERSION = 2
KINDS = ("drop", "droplin", "linear", "remove")  # what --candidates may list


@dataclass(frozen=True)
class Choice:
    """One layer's candidate: ``keep``, ``drop`` (``groups`` KV groups, FLAP's bias),
    ``droplin`` (``groups`` KV groups, a fitted map in their place), ``linear`` (``rank``,
    None = full) or ``remove``."""

    kind: str
    groups: int = 0
    rank: int | None = None

    @property
    def name(self) -> str:
        if self.kind == "drop":
            return f"drop{self.groups}"
        if self.kind == "droplin":
            return f"drop{self.groups}lin"
        if self.kind == "linear":
            return f"linear{'full' if self.rank is None else self.rank}"
        return self.kind

    def shape(self, cfg: Any) -> costs.LayerShape:
        """The layer's ``LayerShape`` under this choice (MLP untouched)."""
        inter, r = cfg.intermediate_size, group_size(cfg)
        if self.kind == "linear":
            return costs.LayerShape("linear", rank=self.rank, intermediate=inter)
        if self.kind == "remove":
            return costs.LayerShape("removed", intermediate=inter)
        kv = cfg.num_key_value_heads - self.groups
        added = self.groups * r * head_dim(cfg) if self.kind == "droplin" else 0
        return costs.LayerShape("dense", kv * r, kv, None, inter, added_rank=added)


KEEP = Choice("keep")


def parse_choice(text: str, cfg: Any) -> Choice:
    """``keep``, ``dropK``, ``dropKlin``, ``linearR`` / ``linearfull``, ``remove`` ->
    ``Choice``."""
    t = text.strip().lower()
    if t in ("keep", "remove"):
        return Choice(t)
    lin = t.endswith("lin")
    count = t[4:-3] if lin else t[4:]
    if t.startswith("drop") and count.isdigit():
        k = int(count)
        if not 1 <= k < cfg.num_key_value_heads:
            raise UserError(f"{text!r}: a layer has {cfg.num_key_value_heads} KV groups; drop "
                            f"1..{cfg.num_key_value_heads - 1} (use remove for all)")
        return Choice("droplin" if lin else "drop", groups=k)
    if t.startswith("linear"):
        rest = t[6:]
        if rest == "full":
            return Choice("linear", rank=None)
        if rest.isdigit() and 1 <= int(rest) <= cfg.hidden_size:
            return Choice("linear", rank=None if int(rest) == cfg.hidden_size else int(rest))
    raise UserError(f"unknown layer choice {text!r}: use keep, drop1..drop"
                    f"{cfg.num_key_value_heads - 1}, drop1lin..drop"
                    f"{cfg.num_key_value_heads - 1}lin, linearR (R in 1..{cfg.hidden_size}), "
                    f"linearfull or remove")


def parse_layout(text: str, cfg: Any) -> dict[int, Choice]:
    """``"7:linear192,28-29:remove,3:drop1"`` -> ``{7: ..., 28: ..., 29: ..., 3: ...}``."""
    from .prune import parse_layer_list

    layout: dict[int, Choice] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        if ":" not in item:
            raise UserError(f"bad --layout item {item!r} (use LAYERS:CHOICE, e.g. 28:remove)")
        where, what = item.split(":", 1)
        choice = parse_choice(what, cfg)
        for j in parse_layer_list(where):
            if not 0 <= j < cfg.num_hidden_layers:
                raise UserError(f"--layout: layer {j} out of range (the model has "
                                f"{cfg.num_hidden_layers} layers: 0..{cfg.num_hidden_layers - 1})")
            if j in layout:
                raise UserError(f"--layout: layer {j} is given twice")
            layout[j] = choice
    return {j: c for j, c in layout.items() if c != KEEP}


def candidates(cfg: Any, ranks: list[int | None], kinds: tuple[str, ...] = KINDS
               ) -> list[Choice]:
    """Every layer's candidate list (the same for all layers) of the given ``kinds``: keep
    first."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UserError(f"unknown candidate kind {unknown[0]!r}: use {', '.join(KINDS)}")
    out = [KEEP]
    for kind in ("drop", "droplin"):
        if kind in kinds:
            out += [Choice(kind, groups=k) for k in range(1, cfg.num_key_value_heads)]
    if "linear" in kinds:
        out += [Choice("linear", rank=r) for r in ranks]
    if "remove" in kinds:
        out.append(Choice("remove"))
    return out


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


def stats_path(cache_root: Path, settings: dict) -> Path:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root / "plan-stats" / f"{digest}.pt"


@torch.no_grad()
def fit_statistics(model, windows: torch.Tensor, ranks: list[int | None], ridge: float,
                   batch: int = 8, progress: bool = True
                   ) -> tuple[dict[str, dict[int, LinearMap]], dict[int, list[int]],
                              dict[int, torch.Tensor], dict[int, GroupFit]]:
    """One dense pass over ``windows``: each layer's attention input/output moments (the
    linear maps, one per rank), its o_proj input statistics (FLAP's group scores and the
    compensation means) and their cross moments with the input (the group maps)."""
    cfg = model.config
    d, hd, r = cfg.hidden_size, head_dim(cfg), group_size(cfg)
    layers: Any = decoder_layers(model)
    moments = [Moments(d) for _ in layers]
    heads = [HeadMoments(d, cfg.num_attention_heads * hd) for _ in layers]
    flap = [LayerStats() for _ in layers]
    o_inputs: dict[int, torch.Tensor] = {}
    handles = []
    for j, layer in enumerate(layers):
        def attn_hook(module, args, kw, out, j=j):  # runs after o_hook (inside the attention)
            moments[j].add(kw["hidden_states"], out[0])
            heads[j].add(kw["hidden_states"], o_inputs.pop(j))

        def o_hook(module, args, j=j):
            o_inputs[j] = args[0]
            flap[j].add_attn(args[0], module.weight, hd, contributions=False)

        handles.append(layer.self_attn.register_forward_hook(attn_hook, with_kwargs=True))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(o_hook))
    try:
        for i in tqdm(range(0, len(windows), batch), disable=not progress,
                      desc="plan statistics", unit="batch"):
            model.model(input_ids=windows[i:i + batch], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    maps = {rank_key(rk): {j: solve(m, ridge, rk, "normed")[0] for j, m in enumerate(moments)}
            for rk in ranks}
    order = {j: torch.argsort(group_scores("flap", s, layers[j].self_attn.o_proj.weight.data,
                                           hd, r)).tolist() for j, s in enumerate(flap)}
    means = {j: s.attn_mean() for j, s in enumerate(flap)}
    fits = {j: fit_groups(moments[j], heads[j], layers[j].self_attn.o_proj.weight.data, hd, r,
                          ridge) for j in range(len(layers))}
    return maps, order, means, fits


def choice_module(model, j: int, choice: Choice, stats: PlanStats) -> nn.Module:
    """Layer ``j``'s attention under ``choice`` (a new module; the model is not changed)."""
    cfg = model.config
    dense: Any = decoder_layers(model)[j].self_attn
    if choice.kind == "linear":
        return stats.maps[rank_key(choice.rank)][j].module()
    if choice.kind == "remove":
        return TokenLocalAttention(None, None, 1, head_dim(cfg), 0.0)
    if choice.kind == "drop":
        attn = copy.deepcopy(dense)
        kept = sorted(stats.flap_order[j][choice.groups:])
        compensate_attention(attn, cfg, kept, stats.attn_mean[j])
        keep_groups(attn, cfg, kept)
        return attn
    if choice.kind == "droplin":
        fit = stats.group_fits[j]
        attn = copy.deepcopy(dense)
        gone = fit.gone[choice.groups]
        in_w, in_b, out_w = fit.map_weights(dense.o_proj.weight.data, choice.groups,
                                            head_dim(cfg), group_size(cfg))
        keep_groups(attn, cfg, [g for g in range(cfg.num_key_value_heads) if g not in gone])
        gmap = GroupMap(cfg.hidden_size, in_w.shape[0])
        with torch.no_grad():
            gmap.in_proj.weight.copy_(in_w)
            gmap.in_proj.bias.copy_(in_b)
            gmap.out_proj.weight.copy_(out_w)
        attach_group_map(attn, gmap)
        return attn
    return dense


@contextlib.contextmanager
def installed(model, layout: dict[int, Choice], stats: PlanStats) -> Iterator[None]:
    """Temporarily give the model ``layout``'s attention modules."""
    layers: Any = decoder_layers(model)
    saved = {j: layers[j].self_attn for j in layout}
    try:
        for j, c in layout.items():
            layers[j].self_attn = choice_module(model, j, c, stats)
        yield
    finally:
        for j, attn in saved.items():
            layers[j].self_attn = attn


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


@dataclass
class Budget:
    kv_saving: float
    speedup: float | None = None
    context: int = 7168


def solve_layouts(cfg: Any, damage: dict[int, dict[str, float]], choices: list[Choice],
                  budget: Budget, count: int = 1) -> list[tuple[dict[int, Choice], float]]:
    """The ``count`` best layouts by summed damage under ``budget`` (multiple-choice knapsack,
    exact MILP by HiGHS; each next layout is excluded from the following solves by a no-good
    cut). A candidate another one of its layer beats on every budgeted cost and on damage is
    left out (a full-rank map that costs less damage than the rank-192 one, under a KV budget
    alone), so the next-best layouts differ in substance. Returns (layout without the kept
    layers, predicted damage)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_layers, n_c = cfg.num_hidden_layers, len(choices)
    dense = costs.dense_shape(cfg)
    shapes = [c.shape(cfg) for c in choices]
    kv = np.array([costs.kv_bytes(cfg, s) for s in shapes] * n_layers, dtype=float)
    cost = np.array([0.0 if c == KEEP else damage[j][c.name]
                     for j in range(n_layers) for c in choices])
    rows: list[Any] = [np.kron(np.eye(n_layers), np.ones(n_c))]
    lo: list[Any] = [np.ones(n_layers)]
    hi: list[Any] = [np.ones(n_layers)]
    kv_limit = (1 - budget.kv_saving) * costs.kv_bytes(cfg, dense) * n_layers
    rows.append(kv[None])
    lo.append([-np.inf])
    hi.append([kv_limit + 1e-6])
    if budget.speedup is not None:
        macs = np.array([costs.layer_macs(cfg, s, budget.context) for s in shapes] * n_layers)
        head = cfg.hidden_size * cfg.vocab_size / budget.context
        limit = costs.model_macs(cfg, [dense] * n_layers, budget.context) / budget.speedup
        rows.append(macs[None])
        lo.append([-np.inf])
        hi.append([limit - head])
    budgeted = [kv] + ([macs] if budget.speedup is not None else [])
    upper = _undominated(cost, budgeted, n_c).astype(float)
    out: list[tuple[dict[int, Choice], float]] = []
    for _ in range(count):
        res = milp(cost, integrality=np.ones_like(cost), bounds=Bounds(0, upper),
                   constraints=LinearConstraint(np.vstack(rows), np.concatenate(lo),
                                                np.concatenate(hi)))
        if res.x is None:
            if not out:
                raise UserError(f"no layout meets the budget ({_budget_text(budget)}) with "
                                f"the candidates {', '.join(c.name for c in choices)}")
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


def _undominated(cost: np.ndarray, budgeted: list[np.ndarray], n_c: int) -> np.ndarray:
    """Per variable: False if another choice of the same layer is no worse on damage and
    every budgeted cost and better on one (ties: the first listed stays)."""
    keep = np.ones_like(cost, dtype=bool)
    for base in range(0, len(cost), n_c):
        for a in range(base, base + n_c):
            for b in range(base, base + n_c):
                if a == b:
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
    return f"KV saving >= {b.kv_saving:.3f}{speed}"


def layout_summary(cfg: Any, layout: dict[int, Choice], contexts=(4096, 7168)) -> dict:
    shapes = [layout.get(j, KEEP).shape(cfg) for j in range(cfg.num_hidden_layers)]
    return costs.summary(cfg, shapes, contexts)


def layout_text(layout: dict[int, Choice]) -> str:
    """The ``--layout`` string of a layout (round-trips through ``parse_layout``)."""
    return ",".join(f"{j}:{c.name}" for j, c in sorted(layout.items()))


@dataclass
class Planned:
    layout: dict[int, Choice]
    measured_kl: float
    tried: list[dict]


def plan_layout(model, stats: PlanStats, rec: DenseRecord, choices: list[Choice],
                budget: Budget, top_k: int = 8, rounds: int = 1, progress: bool = True
                ) -> Planned:
    """Solve, then re-score the ``top_k`` best layouts as whole models on ``rec`` (held-out
    calibration windows, so the pick is not fitted to the damage windows' noise). Each further
    round corrects the estimates of the best layout's changed layers to their in-context marginal
    damage (the layout's KL minus its KL with that layer restored) and solves again. The best
    measured layout of all rounds wins."""
    cfg = model.config
    damage = {j: dict(v) for j, v in stats.damage.items()}
    tried: list[dict] = []
    seen: dict[str, tuple[dict[int, Choice], float]] = {}
    for r in range(rounds):
        found = solve_layouts(cfg, damage, choices, budget, top_k)
        for layout, predicted in tqdm(found, disable=not progress, unit="layout",
                                      desc=f"re-score layouts (round {r + 1}/{rounds})"):
            key = layout_text(layout)
            if key not in seen:
                kl = layout_kl(model, layout, stats, rec)
                seen[key] = (layout, kl)
                tried.append({"round": r + 1, "layout": key,
                              "predicted_kl": round(predicted, 5), "measured_kl": round(kl, 5)})
        best_layout, best_kl = min(seen.values(), key=lambda t: t[1])
        if r + 1 < rounds:  # in-context marginals of the best layout's changes
            for j, c in tqdm(best_layout.items(), disable=not progress, unit="layer",
                             desc="in-context damage"):
                rest = {k: v for k, v in best_layout.items() if k != j}
                damage[j][c.name] = max(best_kl - layout_kl(model, rest, stats, rec), 0.0)
    return Planned(best_layout, best_kl, tried)


def apply_layout(model, layout: dict[int, Choice], stats: PlanStats):
    """Give ``model`` the layout for good and return its ``PruningSpec`` (method ``plan``).

    Removed layers are left to ``apply_pruning`` (alpha = 0); maps are installed; KV-group
    cuts carry FLAP's o_proj bias, so the checkpoint is then a biased Llama: every layer that
    keeps its attention gets zero q/k/v/o biases and ``attention_bias`` is set.
    """
    from ..spec import PruningSpec

    cfg = model.config
    layers: Any = decoder_layers(model)
    drops = {j: c for j, c in layout.items() if c.kind in ("drop", "droplin")}
    maps: dict[int, dict[str, Any]] = {}
    for j, c in layout.items():
        if c.kind == "linear":
            install_map(layers[j], stats.maps[rank_key(c.rank)][j].module(), "normed")
            maps[j] = {"input": "normed", "rank": c.rank}
        elif c.kind in ("drop", "droplin"):
            layers[j].self_attn = choice_module(model, j, c, stats)
        if c.kind == "droplin":
            maps[j] = {"input": "normed", "rank": c.shape(cfg).added_rank, "add": True}
    shapes = None
    if any(c.kind == "drop" for c in drops.values()):  # FLAP's o_proj bias: a biased Llama
        for j, layer in enumerate(layers):
            if j not in layout or layout[j].kind == "droplin":
                add_biases(layer.self_attn, (*ATTENTION_PROJECTIONS, "o_proj"))
        cfg.attention_bias = True
    if drops:
        r = group_size(cfg)
        kv = [cfg.num_key_value_heads - (drops[j].groups if j in drops else 0)
              for j in range(cfg.num_hidden_layers)]
        shapes = {"num_attention_heads": [k * r for k in kv], "num_key_value_heads": kv,
                  "intermediate_size": [cfg.intermediate_size] * cfg.num_hidden_layers}
    removed = {j: 0.0 for j, c in layout.items() if c.kind == "remove"}
    return PruningSpec(layers=removed, maps=maps, shapes=shapes, method="plan")


def statistics_settings(model_dir: Path, calib: dict, fit_shape: tuple[int, int],
                        damage_windows: int, positions: int, ranks: list[int | None],
                        ridge: float, seed: int) -> dict:
    """What the cached statistics depend on (the cache key)."""
    cfg_hash = hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()[:16]
    weights = sorted(Path(model_dir).glob("*.safetensors"))
    sizes = [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in weights]
    return {"model_dir": str(Path(model_dir).resolve()), "config": cfg_hash, "weights": sizes,
            "calibration": calib, "fit_samples": fit_shape[0], "fit_seq_len": fit_shape[1],
            "damage_windows": damage_windows, "positions": positions,
            "ranks": [rank_key(r) for r in ranks], "ridge": ridge, "seed": seed}


def ensure_statistics(model, windows: torch.Tensor, settings: dict, choices: list[Choice],
                      ranks: list[int | None], ridge: float, cache: Path | None,
                      progress: bool = True) -> tuple[PlanStats, DenseRecord]:
    """Load the cached statistics or compute them (maps, FLAP scores, per-layer damage)."""
    stats = PlanStats.load(cache, settings) if cache is not None else None
    damage_windows = windows[:settings["damage_windows"]]
    if stats is None:
        t0 = time.perf_counter()
        maps, order, means, fits = fit_statistics(model, windows, ranks, ridge,
                                                  progress=progress)
        stats = PlanStats(settings, maps, order, means, fits,
                          seconds={"fit": round(time.perf_counter() - t0, 2)})
    t0 = time.perf_counter()
    rec = record_dense(model, damage_windows, list(range(model.config.num_hidden_layers)),
                       positions=settings["positions"], seed=settings["seed"])
    before = sum(len(v) for v in stats.damage.values())
    score_candidates(model, stats, rec, choices, progress)
    if sum(len(v) for v in stats.damage.values()) > before:
        stats.seconds["damage"] = round(stats.seconds.get("damage", 0.0)
                                        + time.perf_counter() - t0, 2)
        if cache is not None:
            stats.save(cache)
    return stats, rec
