"""The ``harp-vllm plan`` jobs: one budget -> a checkpoint and ``plan.json``; ``--frontier``
-> a sweep of budgets with a table and plots (the method: ``pruning/planner/``; the options:
``plan_options.py``; the loaded model and statistics: ``plan_session.py``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ...errors import UserError
from ...evaluation.perplexity import evaluate_perplexity
from ..calibration.damage import objective
from ..planner.choices import KEEP, Choice, parse_layout, share_targets
from ..planner.layouts import apply_layout, installed, layout_summary, layout_text
from ..planner.probe_prices import price_lazily, probe_key
from ..planner.retrieval import RetrievalFloor, group_retrieval, layout_mass, retrieval_floor
from ..planner.scoring import layout_kl, layout_kl_parts
from ..planner.solve import Budget, plan_layout, served_block, solver
from ..planner.statistics import share_key
from ..reference.window_sinks import (
    DEFAULT_SINK_OFFSET,
    DEFAULT_SINK_OVER_CAP,
    SINK_MAX_SHORT_KL,
    SINK_TOKENS,
    attach_window_sinks,
    fit_sinks,
    lower_to_cap,
    short_cost,
    sink_costs_by_window,
    sinks_added,
)
from .checkpoint import check_output_dir, save_pruned
from .plan_options import PlanOptions, parse_depths, parse_floors, share_count
from .plan_session import Session, open_session


def _ppl(s: Session, layout: dict[int, Choice], progress: bool) -> float | None:
    if s.eval_text is None:
        return None
    key = f"dense_ppl_{s.opts.eval_windows}x{s.opts.eval_seq_len}"
    if not layout and key in s.stats.extra:
        return s.stats.extra[key]
    with installed(s.model, layout, s.stats):
        res = evaluate_perplexity(s.model, s.tok, s.eval_text, s.opts.eval_seq_len,
                                  s.opts.eval_windows, progress=progress)
    if not layout:
        s.stats.extra[key] = res.perplexity
        if s.cache is not None:
            s.stats.save(s.cache)
    return res.perplexity


def plan_budget(s: Session, budget: Budget, progress: bool = True,
                forbidden: frozenset[tuple[int, str]] = frozenset()) -> dict:
    """Plan one budget and measure it; the plan record (no checkpoint written).
    ``forbidden``: (layer, choice name) pairs the solver does not offer. With
    ``--retrieval-floor`` one plan per floor, the best measured of all wins."""
    t0 = time.perf_counter()
    forbidden = forbidden | s.unoffered
    mass = _retrieval_mass(s) if s.opts.retrieval_floor else None
    runs: list[tuple[float | None, Any, dict]] = []
    fractions: list[float | None] = [*parse_floors(s.opts)] or [None]
    for fraction in fractions:
        floor = (None if fraction is None or mass is None
                 else retrieval_floor(mass, s.choices, s.stats, fraction))
        prices: dict | None = None
        pricing: dict = {}
        try:  # an infeasible floor fails in the first solve (the pricing's or the plan's)
            if s.opts.probe_prices:
                prices, pricing = _probe_prices(s, budget, forbidden, floor, progress)
            found = plan_layout(s.model, s.stats, s.held_out, s.choices, budget,
                                s.opts.top_k, s.opts.rounds, progress, forbidden, prices,
                                floor)
        except UserError:
            if floor is None:
                raise
            runs.append((fraction, None, {}))  # no layout keeps that much at this budget
            continue
        runs.append((fraction, found, pricing))
    done = [r for r in runs if r[1] is not None]
    if not done:
        raise UserError(f"no layout meets the budget and any of the retrieval floors "
                        f"{s.opts.retrieval_floor}")
    chosen, found, pricing = min(done, key=lambda r: r[1].measured_kl)
    extra: dict[str, Any] = dict(pricing)
    tried = [{**t, **({"floor": f} if f is not None else {})}
             for f, fd, _ in done for t in fd.tried]
    if mass is not None:
        extra["retrieval_floor"] = {
            "chosen": chosen, "beyond": _beyond(s),
            "plans": {str(f): None if fd is None else {
                "layout": layout_text(fd.layout), "measured_kl": round(fd.measured_kl, 5),
                "kept": round(layout_mass(fd.layout, mass, s.stats), 4)} for f, fd, _ in runs},
            "mass": [[round(float(x), 5) for x in row] for row in mass[min(mass)]]}  # the base
    return _record(s, found.layout, progress, budget=budget,
                   measured_kl=round(found.measured_kl, 5), tried=tried,
                   solve_seconds=round(time.perf_counter() - t0, 2), **extra)


def _beyond(s: Session) -> tuple[int, ...]:
    """The distances the retrieval mass is measured beyond: the base (``--retrieval-beyond``,
    default the largest window offered; none offered: a quarter of the context), the one
    counted, then every window size offered above it."""
    sizes = {c.window for c in s.choices if c.kind == "window" and c.window is not None}
    base = s.opts.retrieval_beyond or (max(sizes) if sizes else s.context // 4)
    return (base, *sorted(w for w in sizes if w > base))


def _retrieval_mass(s: Session) -> Any:
    """Each layer's and KV group's retrieval mass on the recall probe (``retrieval.py``),
    computed once per session (every budget of a frontier shares it)."""
    assert s.probe is not None
    if s.retrieval_mass is None:
        s.retrieval_mass = group_retrieval(s.model, s.probe, _beyond(s))
    return s.retrieval_mass


def _probe_prices(s: Session, budget: Budget, forbidden: frozenset[tuple[int, str]],
                  floor: RetrievalFloor | None, progress: bool) -> tuple[dict, dict]:
    """``--probe-prices``: the per-layer prices with the recall probe's damage, measured
    lazily (``probe_prices.py``) and cached with the statistics; and their record."""
    assert s.probe is not None and s.probe_settings is not None
    store = s.stats.extra.setdefault("probe_damage", {}).setdefault(
        probe_key(s.probe_settings), {})
    solve = solver(budget)

    def best(prices: dict) -> dict[int, Choice]:
        return solve(s.cfg, prices, s.choices, budget, 1, forbidden, floor)[0][0]

    def save() -> None:
        if s.cache is not None:
            s.stats.save(s.cache)

    prices, pricing = price_lazily(s.model, s.stats, s.probe, s.opts.recall_probe,
                                   store, best, save, progress)
    return prices, {"probe_prices": pricing.report()}


def _record(s: Session, layout: dict[int, Choice], progress: bool, budget: Budget | None,
            **extra: Any) -> dict:
    cfg = s.cfg
    per_layer = [layout.get(j, KEEP).name for j in range(cfg.num_hidden_layers)]
    # an explicit --layout measures no per-layer damage: no prediction (null, not NaN, which
    # is not JSON)
    try:
        predicted: float | None = round(sum(s.stats.damage[j][c.name]
                                            for j, c in layout.items()), 5)
    except KeyError:
        predicted = None
    rec = {"layout": layout_text(layout), "per_layer": per_layer,
           "budget": None if budget is None else vars(budget),
           "predicted_kl": predicted, **extra, "context": s.context,
           "costs": layout_summary(cfg, layout, (4096, 7168, s.context),
                                   context=s.context),
           "ppl": _ppl(s, layout, progress)}
    weights = s.held_out.weights
    if "probe" in weights:  # the recall probe's part of the re-scoring KL, and the sum
        text = layout_text(layout)
        parts = next((t.get("kl_parts") for t in rec.get("tried", []) if t["layout"] == text),
                     None)
        if parts is None:
            parts = {g: round(v, 5) for g, v in
                     layout_kl_parts(s.model, layout, s.stats, s.held_out).items()}
        rec["measured_kl_parts"] = {**parts, "probe_weight": weights["probe"]}
        rec.setdefault("measured_kl", round(objective(s.held_out, parts), 5))
    elif "measured_kl" not in rec:
        rec["measured_kl"] = round(layout_kl(s.model, layout, s.stats, s.held_out), 5)
    shares = {str(j): s.stats.extra["share_fits"][share_key(j, c.target)]
              for j, c in layout.items() if c.kind == "share" and c.target is not None}
    if shares:  # relative errors on the calibration tokens, before and after the refit
        rec["share_fit"] = {j: {k: f[k] for k in ("logit_error", "output_error")}
                            for j, f in shares.items()}
    return rec


def _settings_record(s: Session) -> dict:
    o = s.opts
    return {"calibration": s.stats.settings["calibration"], "fit_windows": o.calib_samples,
            "fit_seq_len": o.calib_seq_len, "damage_windows": o.damage_windows,
            "positions": o.positions, "rescore_windows": o.rescore_windows,
            **({"held_out_damage": True} if o.held_out_damage else {}),
            "ridge": "held-out" if o.ridge is None else o.ridge,
            **({"map_ridges": s.stats.extra["ridges"]} if "ridges" in s.stats.extra else {}),
            **({"long": s.long} if s.long else {}),
            **({"recall_probe": {"weight": o.recall_probe, "repeat": o.recall_repeat,
                                 "windows": o.recall_windows,
                                 **({"depths": list(parse_depths(o))} if o.recall_depths
                                    else {}),
                                 **({"in_prices": True} if o.probe_prices else {}),
                                 **({"retrieval_floors": parse_floors(o)}
                                    if o.retrieval_floor else {})}}
               if o.recall_probe else {}),
            **({"window_sinks": True} if o.window_sinks else {}),
            **({"sink_offset": o.sink_offset} if o.sink_offset is not None else {}),
            **({"sink_max_short_kl": o.sink_max_short_kl}
               if o.sink_max_short_kl is not None else {}),
            **({"sink_over_cap": o.sink_over_cap} if o.sink_over_cap is not None else {}),
            "top_k": o.top_k, "rounds": o.rounds, "seed": o.seed,
            "candidates": [c.name for c in s.choices],
            **({"share_targets": {str(j): [int(t) for t in share_targets(
                s.cfg, j, share_count(o))] for j in range(s.cfg.num_hidden_layers)}}
               if any(c.kind == "share" for c in s.choices) else {}),
            "eval": {"dataset": "wikitext2", "split": "test", "windows": o.eval_windows,
                     "seq_len": o.eval_seq_len},
            "statistics_seconds": s.stats.seconds}


def run_plan(opts: PlanOptions, progress: bool = True) -> dict:
    """Plan one budget (or take ``--layout``), write the checkpoint and its ``plan.json``."""
    out = Path(opts.out)
    check_output_dir(out, opts.force)
    start = time.perf_counter()
    s = open_session(opts, progress)
    priced = None  # --sink-over-cap no-window: the windows not offered, and every cost
    if opts.layout:
        layout = parse_layout(opts.layout, s.cfg)
        record = _record(s, layout, progress, budget=None)
    else:
        assert opts.kv_saving is not None
        budget = Budget(opts.kv_saving, opts.speedup, s.context, served_block(s.cfg, s.choices))
        if opts.sink_over_cap == "no-window":
            priced = _unaffordable_windows(s, progress)
        record = plan_budget(s, budget, progress,
                             frozenset() if priced is None else priced[0])
        layout = parse_layout(record["layout"], s.cfg) if record["layout"] else {}
    if not layout:
        raise UserError("the plan keeps every layer as it is; nothing to write")
    sinks: dict[int, Any] = {}
    if opts.window_sinks:  # measured again with the sinks (the layout was chosen without)
        sinks, record["window_sinks"] = _fit_window_sinks(s, layout)
        if priced is not None:
            record["window_sinks"]["offered"] = priced[1]
        keys = ("ppl", "measured_kl", *(("measured_kl_parts",)
                                          if "measured_kl_parts" in record else ()))
        record["window_sinks"]["without_sinks"] = {k: record[k] for k in keys}
        if sinks:
            with sinks_added(s.model, sinks):
                with_sinks = _record(s, layout, progress, budget=None)
            record.update({k: with_sinks[k] for k in keys})
    record.update(model=opts.model, source_dir=str(s.src),
                  ppl_dense=_ppl(s, {}, progress), settings=_settings_record(s),
                  seconds={"load_and_statistics": round(s.seconds, 2),
                           "total": round(time.perf_counter() - start, 2)})
    spec = apply_layout(s.model, layout, s.stats)
    if sinks:  # the windows with their fitted sinks, for good
        attach_window_sinks(s.model, spec.windows, sinks)
        spec.sinks = sorted(sinks)
    spec.source_model = opts.model
    spec.calibration = {"plan": {k: record[k] for k in ("layout", "budget", "predicted_kl",
                                                        "measured_kl", "ppl", "ppl_dense")},
                        **record["settings"]}
    plan_json = json.dumps(record, indent=2) + "\n"
    save_pruned(s.model, spec, s.src, out, force=opts.force, extra_files={"plan.json": plan_json})
    record["out"] = str(out)
    return record


def _sink_settings(s: Session) -> tuple[float, float]:
    """The sinks' offset and short-prompt cost cap (the options, else the defaults)."""
    o = s.opts
    return (DEFAULT_SINK_OFFSET if o.sink_offset is None else o.sink_offset,
            SINK_MAX_SHORT_KL if o.sink_max_short_kl is None else o.sink_max_short_kl)


def _sink_cost(s: Session) -> Any:
    """The session's ``short_cost`` on its damage windows (the dense reference computed once,
    shared by the pricing before the solve and the fit after it)."""
    if s.sink_cost is None:
        s.sink_cost = short_cost(s.model, s.damage_windows)
    return s.sink_cost


def _unaffordable_windows(s: Session, progress: bool
                          ) -> tuple[frozenset[tuple[int, str]], dict]:
    """``--sink-over-cap no-window``: every (layer, window size) the planner offers priced by
    the short-prompt cost of the sink it would get (``sink_costs_by_window``, calibration
    text); the pairs over the cap are not offered. Returns them and the record of costs."""
    if s.long_windows is None:
        raise UserError("--sink-over-cap no-window needs window candidates (--windows)")
    offset, cap = _sink_settings(s)
    sizes = sorted({int(c.window) for c in s.choices
                    if c.kind == "window" and c.window is not None and not c.full_groups})
    layers = list(range(s.cfg.num_hidden_layers))
    costs = sink_costs_by_window(s.model, layers, sizes, s.long_windows[:1], _sink_cost(s),
                                 offset, progress)
    forbidden = frozenset((j, f"win{w}") for (j, w), c in costs.items() if c > cap)
    return forbidden, {
        "rule": "a window is offered only where its fitted sink costs short prompts at most "
                "the cap",
        "short_kl": {f"{j}:win{w}": float(f"{c:.6g}") for (j, w), c in sorted(costs.items())},
        "not_offered": sorted(f"{j}:{name}" for j, name in forbidden)}


def _fit_window_sinks(s: Session, layout: dict[int, Choice]
                      ) -> tuple[dict[int, Any], dict]:
    """The windowed layers' sink logits, fitted on the dense model (``window_sinks.py``):
    a layer whose sink alone costs more than the cap on short prompts (the first positions
    of the damage windows) drops it or keeps it lowered to the cap (``--sink-over-cap``);
    with the record of what was fitted and kept."""
    windows = {j: int(c.window) for j, c in layout.items()  # not the per-group ones
               if c.kind == "window" and c.window is not None and not c.full_groups}
    if not windows:
        raise UserError("--window-sinks: the plan has no windowed layer (whole: a window "
                        "per KV group gets no sinks)")
    if s.long_windows is None:
        raise UserError("--window-sinks needs the long calibration windows (a plan with "
                        "windows)")
    offset, cap = _sink_settings(s)
    over_cap = DEFAULT_SINK_OVER_CAP if s.opts.sink_over_cap is None else s.opts.sink_over_cap
    fitted = fit_sinks(s.model, windows, s.long_windows[:1], offset)
    cost = _sink_cost(s)
    costs = {j: cost(j, windows[j], v) for j, v in fitted.items()}
    kept = {j: v for j, v in fitted.items() if costs[j] <= cap}
    lowered: dict[int, float] = {}
    lowered_kl: dict[int, float] = {}
    if over_cap == "lower":
        lowered, lowered_kl = lower_to_cap(cost, windows, fitted, costs, cap)
        kept.update({j: fitted[j] - d for j, d in lowered.items()})
    kept = dict(sorted(kept.items()))
    return kept, {
        "fit": f"median log-sum-exp of the first {SINK_TOKENS} keys' logits, queries past the "
               f"window, 1 x {s.long_windows.shape[1]} calibration tokens, less the offset",
        "offset": offset, "max_short_kl": cap, "over_cap": over_cap,
        "short_kl": {str(j): round(c, 6) for j, c in costs.items()},
        "lowered": {str(j): {"offset": d, "short_kl": round(lowered_kl[j], 6)}
                    for j, d in lowered.items()},
        "layers": sorted(kept),
        "logits": {str(j): [round(float(x), 4) for x in v] for j, v in kept.items()}}


def run_frontier(opts: PlanOptions, progress: bool = True) -> dict:
    """Plan every budget in ``opts.budgets``; write frontier.json/.md and the plots."""
    from tqdm.auto import tqdm

    out = Path(opts.out)
    compare = _load_compare(opts.compare) if opts.compare else {}
    start = time.perf_counter()
    s = open_session(opts, progress)
    rows = []
    for b in tqdm(opts.budgets, disable=not progress, desc="frontier", unit="budget"):
        t0 = time.perf_counter()
        rec = plan_budget(s, Budget(b, opts.speedup, s.context, served_block(s.cfg, s.choices)),
                          progress)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(rec)
    report = {"model": opts.model, "ppl_dense": _ppl(s, {}, progress),
              "settings": _settings_record(s), "plans": rows, "compare": compare,
              "seconds": {"load_and_statistics": round(s.seconds, 2),
                          "total": round(time.perf_counter() - start, 2)}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.json").write_text(json.dumps(report, indent=2) + "\n")
    from ..planner.frontier_report import write_report

    write_report(report, out)
    report["out"] = str(out)
    return report


def _load_compare(path: Path) -> dict:
    """Single-method curves: ``{"method": [{"kv_saving": x, "ppl": y, ...}, ...], ...}``."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--compare {path}: {e}") from None
    if isinstance(raw, dict):  # "_source" and similar keys document the file
        raw = {k: v for k, v in raw.items() if not k.startswith("_")}
    if not isinstance(raw, dict) or not all(
            isinstance(v, list) and all(isinstance(p, dict) and {"kv_saving", "ppl"} <= set(p)
                                        for p in v) for v in raw.values()):
        raise UserError(f"--compare {path}: expected {{method: [{{kv_saving, ppl}}, ...]}}")
    return raw


__all__ = ["run_frontier", "run_plan"]
