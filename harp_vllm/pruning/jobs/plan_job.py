"""The ``harp-vllm plan`` jobs: one budget -> a checkpoint and ``plan.json``; ``--frontier``
-> a sweep of budgets with a table and plots (the method: ``pruning/planner/``)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ... import models
from ...errors import UserError
from ...evaluation import data as data_mod
from ...evaluation.perplexity import evaluate_perplexity
from ...families import PLAN_MODEL_TYPES
from ...paths import cache_dir
from .. import costs
from ..calibration.damage import record_dense
from ..calibration.windows import (
    calibration_windows,
    load_calibration_text,
    mixed_calibration_windows,
    unused_long_windows,
)
from ..planner.choices import (
    DEFAULT_WINDOWS,
    KEEP,
    KINDS,
    Choice,
    candidates,
    check_window,
    parse_layout,
)
from ..planner.layouts import (
    apply_layout,
    installed,
    layout_summary,
    layout_text,
    share_key,
)
from ..planner.scoring import ensure_statistics, layout_kl
from ..planner.solve import Budget, plan_layout
from ..planner.statistics import PlanStats, statistics_settings, stats_path
from ..reference import load_model
from .checkpoint import check_output_dir, save_pruned
from .options import parse_rank

DEFAULT_BUDGETS = (0.1, 0.2, 0.27, 0.3, 0.4, 0.5)


@dataclass
class PlanOptions:
    model: str
    out: Path
    kv_saving: float | None = None
    speedup: float | None = None
    context: int = 7168
    layout: str | None = None  # explicit layout: no search
    frontier: bool = False
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    compare: Path | None = None  # single-method curves for the frontier plot
    ranks: str | None = None  # None: full (KV budget), 192,full (with a speed budget)
    candidates: str | None = None  # kinds offered; None: see default_kinds
    windows: str | None = None  # sliding windows offered (tokens, comma list): adds "window"
    long_seq_len: int | None = None  # with windows: long windows' length (None: --context)
    long_damage_windows: int = 1
    long_rescore_windows: int = 2
    long_positions: int = 1024
    calib_file: Path | None = None
    calib_mix: str | None = None  # comma list of domains: windows from each one's dev part
    calib_samples: int = 16
    calib_seq_len: int = 1024  # long windows: 256-token ones misjudge long-range heads
    damage_windows: int = 4
    rescore_windows: int = 4  # windows disjoint from every fit that layouts are re-scored on
    positions: int = 128
    ridge: float = 1e-3
    top_k: int = 8
    rounds: int = 1
    seed: int = 0
    eval_windows: int = 8
    eval_seq_len: int = 2048
    use_cache: bool = True
    force: bool = False
    extra: dict = field(default_factory=dict)


def _check(opts: PlanOptions) -> None:
    if opts.frontier:
        if opts.layout or opts.kv_saving is not None:
            raise UserError("--frontier sweeps --budgets; do not give --kv-saving or --layout")
        bad = [b for b in opts.budgets if not 0 < b < 1]
        if bad or not opts.budgets:
            raise UserError(f"--budgets must be KV savings in (0, 1), got {list(opts.budgets)}")
    elif (opts.layout is None) == (opts.kv_saving is None):
        raise UserError("give --kv-saving S (plan under a budget), --layout (an explicit "
                        "layout) or --frontier")
    if opts.kv_saving is not None and not 0 < opts.kv_saving < 1:
        raise UserError(f"--kv-saving must be in (0, 1), got {opts.kv_saving}")
    if opts.speedup is not None and opts.speedup <= 1:
        raise UserError(f"--speedup must be > 1 (a predicted prefill speed-up), got "
                        f"{opts.speedup}")
    if opts.context < 1:
        raise UserError(f"--context must be >= 1, got {opts.context}")
    if opts.top_k < 1 or opts.rounds < 1:
        raise UserError(f"--top-k and --rounds must be >= 1, got {opts.top_k}, {opts.rounds}")
    if not 1 <= opts.damage_windows <= opts.calib_samples:
        raise UserError(f"--damage-windows must be in 1..--calib-samples ({opts.calib_samples}), "
                        f"got {opts.damage_windows}")
    if opts.rescore_windows < 0:
        raise UserError(f"--rescore-windows must be >= 0, got {opts.rescore_windows}")
    if opts.calib_mix is not None and opts.calib_file is not None:
        raise UserError("give --calib-mix or --calib-file, not both")
    if ((opts.long_seq_len is not None and opts.long_seq_len < 2)
            or opts.long_damage_windows < 1 or opts.long_rescore_windows < 0):
        raise UserError("--long-seq-len must be >= 2, --long-damage-windows >= 1 and "
                        "--long-rescore-windows >= 0")
    if opts.calib_samples % 8:
        raise UserError(f"--calib-samples must be a multiple of 8 (the batch), got "
                        f"{opts.calib_samples}")


def default_kinds(speedup: float | None) -> tuple[str, ...]:
    """The candidate kinds offered by default. Under a KV budget alone FLAP's bias-only cut is
    left out: the group map (``dropKlin``) has the same KV bytes and measured lower damage in
    every SmolLM2 layer but one (docs/results.md), so it would only cost scoring time. A speed
    budget adds it (it is cheaper in MACs) and the rank-192 maps."""
    return (("drop", "droplin", "linear", "remove") if speedup is not None
            else ("droplin", "linear", "remove"))


def _kinds(opts: PlanOptions) -> tuple[str, ...]:
    if opts.candidates is None:
        kinds = default_kinds(opts.speedup)
        return (*kinds, "window") if opts.windows else kinds
    kinds = tuple(dict.fromkeys(k.strip() for k in opts.candidates.split(",") if k.strip()))
    if not kinds:
        raise UserError(f"--candidates is empty (give some of {', '.join(KINDS)})")
    return kinds


def _windows(opts: PlanOptions, cfg: Any) -> tuple[int, ...]:
    if opts.windows is None:
        return DEFAULT_WINDOWS
    try:
        sizes = tuple(dict.fromkeys(int(t) for t in opts.windows.split(",") if t.strip()))
    except ValueError:
        raise UserError(f"--windows must be a comma list of token counts, got "
                        f"{opts.windows!r}") from None
    if not sizes:
        raise UserError("--windows is empty (give e.g. 512,1024,2048)")
    return tuple(check_window(w, cfg) for w in sizes)


def _ranks(text: str | None, cfg: Any, speedup: float | None) -> list[int | None]:
    if text is None:
        text = "192,full" if speedup is not None else "full"
    ranks = [parse_rank(t.strip(), cfg) for t in text.split(",") if t.strip()]
    if not ranks:
        raise UserError("--ranks is empty (give e.g. 192,full)")
    return list(dict.fromkeys(ranks))


@dataclass
class Session:
    """A loaded model with its planning statistics: what every budget is planned from."""

    opts: PlanOptions
    src: Path
    cfg: Any
    tok: Any
    model: Any
    stats: PlanStats
    rec: Any
    held_out: Any  # the re-scoring record: held-out windows, every position
    choices: list[Choice]
    cache: Path | None
    eval_text: str | None
    seconds: float
    long: dict | None = None  # the long windows' settings (windows offered)


def open_session(opts: PlanOptions, progress: bool = True) -> Session:
    """Validate, load the dense model and calibration windows, get the statistics."""
    from transformers import AutoConfig


    _check(opts)
    src = models.resolve(opts.model)
    cfg = AutoConfig.from_pretrained(src)
    if getattr(cfg, "harp_pruning", None):
        raise UserError(f"{opts.model} is already a pruned checkpoint; plan its source model")
    if cfg.model_type not in PLAN_MODEL_TYPES:
        raise UserError(f"harp-vllm plan serves {', '.join(PLAN_MODEL_TYPES)} models (linear maps "
                        f"and KV-group cuts in one checkpoint), not {cfg.model_type!r}")
    ranks = _ranks(opts.ranks, cfg, opts.speedup)
    kinds = _kinds(opts)
    layout = parse_layout(opts.layout, cfg) if opts.layout else None
    # long windows (damage + re-scoring) when a sliding window is offered or in the layout
    use_long = "window" in kinds if layout is None else any(
        c.kind == "window" for c in layout.values())
    n_long = opts.long_damage_windows + opts.long_rescore_windows if use_long else 0
    long_len = opts.long_seq_len or opts.context
    t0 = time.perf_counter()
    tok = models.load_tokenizer(src)
    # the fits (maps, statistics, damage) read the first calib_samples windows; the layouts
    # are re-scored on rescore_windows more, disjoint from every fit
    n_windows = opts.calib_samples + opts.rescore_windows
    long_windows = None
    if opts.calib_mix is not None:  # long windows from each domain's tail (fits move)
        windows, calib, long_windows = mixed_calibration_windows(
            tok, [d.strip() for d in opts.calib_mix.split(",") if d.strip()], n_windows,
            opts.calib_seq_len, opts.seed, long=(n_long, long_len))
    else:  # long windows between the fits' windows (fits, and their cache, unchanged)
        text, calib = load_calibration_text(calib_file=opts.calib_file)
        windows = calibration_windows(tok, text, n_windows, opts.calib_seq_len, opts.seed)
        if n_long:
            long_windows = unused_long_windows(tok, text, n_windows, opts.calib_seq_len,
                                               opts.seed, n_long, long_len)
    rescore = windows[opts.calib_samples:]
    windows = windows[:opts.calib_samples]
    model = load_model(src)
    choices = candidates(cfg, ranks, kinds, _windows(opts, cfg))
    if layout is not None:  # an explicit layout needs only its own choices' statistics
        choices = [KEEP, *dict.fromkeys(layout.values())]
        ranks = list(dict.fromkeys(c.rank for c in choices if c.kind == "linear")) or ranks
    settings = statistics_settings(src, calib, (opts.calib_samples, opts.calib_seq_len),
                                   opts.damage_windows, opts.positions, ranks, opts.ridge,
                                   opts.seed)
    if opts.calib_mix is not None and n_long:  # the fits left the domains' tails: new entry
        settings["long_tails"] = n_long * long_len
    long = None
    if n_long:
        long = {"seq_len": long_len, "damage_windows": opts.long_damage_windows,
                "rescore_windows": opts.long_rescore_windows, "positions": opts.long_positions}
    cache = stats_path(cache_dir(), settings) if opts.use_cache else None
    score = layout is None
    long_damage = None if long_windows is None else long_windows[:opts.long_damage_windows]
    stats, rec = ensure_statistics(model, windows, settings, choices if score else [KEEP],
                                   ranks, opts.ridge, cache, progress, long_damage, long)
    fit_shares(model, stats, layout or {}, windows, cache)
    held_out = rec
    if long_windows is not None and opts.long_rescore_windows:
        held_out = record_dense(model, long_windows[opts.long_damage_windows:],
                                list(range(cfg.num_hidden_layers)), batch=1,
                                positions=opts.long_positions, seed=opts.seed)
    elif opts.rescore_windows:
        held_out = record_dense(model, rescore,
                                list(range(cfg.num_hidden_layers)),
                                positions=opts.calib_seq_len, seed=opts.seed)
    eval_text = data_mod.load_text("wikitext2", "test") if opts.eval_windows > 0 else None
    return Session(opts, src, cfg, tok, model, stats, rec, held_out, choices, cache, eval_text,
                   time.perf_counter() - t0, long)


SHARE_FIT_LOGITS = 2**22  # at most this many query-key pairs per head in a sharing refit


def fit_shares(model: Any, stats: Any, layout: dict[int, Choice], windows: Any,
               cache: Any) -> None:
    """Refit the q/o of every ``shareJ`` layer of ``layout`` to its target's keys and values
    (``share_fit.py``) on the first calibration windows (as many as keep the logits to
    ``SHARE_FIT_LOGITS`` pairs per head), into ``stats.extra["share_fits"]`` (cached)."""
    from ..methods.share_fit import fit_shared

    todo = [(j, c.target) for j, c in sorted(layout.items())
            if c.kind == "share" and c.target is not None]
    fits = stats.extra.setdefault("share_fits", {})
    todo = [(j, t) for j, t in todo if share_key(j, t) not in fits]
    if not todo:
        return
    count = max(1, min(len(windows), SHARE_FIT_LOGITS // windows.shape[1] ** 2))
    for j, t in todo:
        f = fit_shared(model, j, t, windows[:count])
        fits[share_key(j, t)] = {"q_weight": f.q_weight, "o_weight": f.o_weight,
                                 "logit_error": f.logit_error, "output_error": f.output_error}
    if cache is not None:
        stats.save(cache)


def _served_block(s: Session) -> int | None:
    """With window candidates the budget is what vLLM allocates (blocks, padding layers):
    a window's saving depends on both at the context."""
    return costs.SERVED_BLOCK if any(c.kind == "window" for c in s.choices) else None


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


def plan_budget(s: Session, budget: Budget, progress: bool = True) -> dict:
    """Plan one budget and measure it; the plan record (no checkpoint written)."""
    t0 = time.perf_counter()
    found = plan_layout(s.model, s.stats, s.held_out, s.choices, budget, s.opts.top_k,
                        s.opts.rounds, progress)
    solve_seconds = time.perf_counter() - t0
    return _record(s, found.layout, progress, budget=budget,
                   measured_kl=round(found.measured_kl, 5), tried=found.tried,
                   solve_seconds=round(solve_seconds, 2))


def _record(s: Session, layout: dict[int, Choice], progress: bool, budget: Budget | None,
            **extra: Any) -> dict:
    cfg = s.cfg
    per_layer = [layout.get(j, KEEP).name for j in range(cfg.num_hidden_layers)]
    predicted = sum(s.stats.damage.get(j, {}).get(c.name, float("nan"))
                    for j, c in layout.items())
    rec = {"layout": layout_text(layout), "per_layer": per_layer,
           "budget": None if budget is None else vars(budget),
           "predicted_kl": round(predicted, 5), **extra,
           "costs": layout_summary(cfg, layout, (4096, 7168, s.opts.context),
                                   context=s.opts.context),
           "ppl": _ppl(s, layout, progress)}
    if "measured_kl" not in rec:
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
            "positions": o.positions, "rescore_windows": o.rescore_windows, "ridge": o.ridge,
            **({"long": s.long} if s.long else {}),
            "top_k": o.top_k, "rounds": o.rounds, "seed": o.seed,
            "candidates": [c.name for c in s.choices],
            "eval": {"dataset": "wikitext2", "split": "test", "windows": o.eval_windows,
                     "seq_len": o.eval_seq_len},
            "statistics_seconds": s.stats.seconds}


def run_plan(opts: PlanOptions, progress: bool = True) -> dict:
    """Plan one budget (or take ``--layout``), write the checkpoint and its ``plan.json``."""
    out = Path(opts.out)
    check_output_dir(out, opts.force)
    start = time.perf_counter()
    s = open_session(opts, progress)
    if opts.layout:
        layout = parse_layout(opts.layout, s.cfg)
        record = _record(s, layout, progress, budget=None)
    else:
        assert opts.kv_saving is not None
        budget = Budget(opts.kv_saving, opts.speedup, opts.context, _served_block(s))
        record = plan_budget(s, budget, progress)
        layout = parse_layout(record["layout"], s.cfg) if record["layout"] else {}
    if not layout:
        raise UserError("the plan keeps every layer as it is; nothing to write")
    record.update(model=opts.model, source_dir=str(s.src),
                  ppl_dense=_ppl(s, {}, progress), settings=_settings_record(s),
                  seconds={"load_and_statistics": round(s.seconds, 2),
                           "total": round(time.perf_counter() - start, 2)})
    spec = apply_layout(s.model, layout, s.stats)
    spec.source_model = opts.model
    spec.calibration = {"plan": {k: record[k] for k in ("layout", "budget", "predicted_kl",
                                                        "measured_kl", "ppl", "ppl_dense")},
                        **record["settings"]}
    plan_json = json.dumps(record, indent=2) + "\n"
    save_pruned(s.model, spec, s.src, out, force=opts.force, extra_files={"plan.json": plan_json})
    record["out"] = str(out)
    return record


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
        rec = plan_budget(s, Budget(b, opts.speedup, opts.context, _served_block(s)), progress)
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


__all__ = ["PlanOptions", "run_frontier", "run_plan"]
