"""A ``harp-vllm plan`` session: the dense model loaded with its calibration windows and
planning statistics (fitted once, cached), and the sharing layers' refits; what every budget
is planned from."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import models
from ...errors import UserError
from ...evaluation import data as data_mod
from ...families import model_types
from ...paths import cache_dir
from ..calibration.damage import merge_records, record_dense
from ..calibration.recall_probe import recall_windows
from ..calibration.self_text import SelfCalibration, self_calibration_text
from ..calibration.windows import (
    calibration_windows,
    load_calibration_text,
    mixed_calibration_windows,
    unused_long_windows,
)
from ..planner.choices import KEEP, Choice, candidates, parse_layout, unoffered_shares
from ..planner.scoring import ensure_statistics
from ..planner.statistics import PlanStats, statistics_settings, stats_path
from ..reference import load_model
from .plan_options import (
    PlanOptions,
    check_options,
    parse_depths,
    parse_kinds,
    parse_ranks,
    parse_windows,
    share_count,
)


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
    context: int  # the context length budgets are stated at (``--context`` or the model's)
    long: dict | None = None  # the long windows' settings (windows offered)
    long_windows: Any = None  # the long windows' token ids (damage windows first)
    damage_windows: Any = None  # the short calibration windows damage is measured on
    sink_cost: Any = None  # window sinks' short-prompt cost (``short_cost``), built once
    probe: Any = None  # the recall probe's record alone, weight 1 (``--recall-probe``)
    probe_settings: dict | None = None  # what its windows are (the probe prices' cache key)
    retrieval_mass: Any = None  # the probe's retrieval mass (``--retrieval-floor``), built once
    # (layer, shareJ) pairs a layer is not offered (all but its nearest targets of its kind)
    unoffered: frozenset[tuple[int, str]] = frozenset()


def self_calibration_spec(opts: PlanOptions, n_windows: int, n_long: int, long_len: int
                          ) -> SelfCalibration:
    """Sequences as long as the longest window cut from them, enough of them for the fits'
    and re-scoring windows side by side and the long windows beside those (10% spare for
    the text's re-tokenisation)."""
    length = max(opts.calib_seq_len, long_len if n_long else 0)
    need = n_windows * opts.calib_seq_len + n_long * (long_len + opts.calib_seq_len)
    return SelfCalibration(sequences=-(-int(need * 1.1) // length), tokens=length,
                           seed=opts.seed)


def open_session(opts: PlanOptions, progress: bool = True) -> Session:
    """Validate, load the dense model and calibration windows, get the statistics."""
    from transformers import AutoConfig

    check_options(opts)
    src = models.resolve(opts.model)
    # budgets are stated at --context, default the model's own
    context = opts.context or models.kv_context(opts.model, src)
    cfg = AutoConfig.from_pretrained(src)
    if getattr(cfg, "harp_pruning", None):
        raise UserError(f"{opts.model} is already a pruned checkpoint; plan its source model")
    # every layout has maps; KV-group cuts only where the family serves them (``unserved``)
    served = model_types(lambda f: f.linear_maps)
    if cfg.model_type not in served:
        raise UserError(f"harp-vllm plan serves {', '.join(served)} models (linear maps "
                        f"and its other choices in one checkpoint), not {cfg.model_type!r}")
    ranks = parse_ranks(opts.ranks, cfg, opts.speedup)
    kinds = parse_kinds(opts, cfg)
    layout = parse_layout(opts.layout, cfg) if opts.layout else None
    # long windows (damage + re-scoring) when a sliding window is offered or in the layout,
    # or the re-scoring takes the recall probe (its windows are long ones too)
    use_long = bool({"window", "group-window"} & set(kinds)) if layout is None else any(
        c.kind == "window" for c in layout.values())
    use_long = use_long or opts.recall_probe > 0
    n_long = opts.long_damage_windows + opts.long_rescore_windows if use_long else 0
    n_probe = opts.recall_windows if opts.recall_probe > 0 else 0
    long_len = opts.long_seq_len or context
    t0 = time.perf_counter()
    tok = models.load_tokenizer(src)
    model = load_model(src)
    # the fits (maps, statistics, damage) read the first calib_samples windows; the layouts
    # are re-scored on rescore_windows more, disjoint from every fit
    n_windows = opts.calib_samples + opts.rescore_windows
    long_windows = None
    probe_src: Any = None
    if opts.calib_mix is not None:  # long windows from each domain's tail (fits move)
        windows, calib, long_windows = mixed_calibration_windows(
            tok, [d.strip() for d in opts.calib_mix.split(",") if d.strip()], n_windows,
            opts.calib_seq_len, opts.seed, long=(n_long, long_len))
    else:  # long windows between the fits' windows (fits, and their cache, unchanged)
        if opts.calib_self:  # the model's own text, enough for every window cut from it
            text, calib = self_calibration_text(
                model, tok, self_calibration_spec(opts, n_windows, n_long + n_probe, long_len),
                str(src), cache_dir() if opts.use_cache else None, progress)
        else:
            text, calib = load_calibration_text(calib_file=opts.calib_file)
        windows = calibration_windows(tok, text, n_windows, opts.calib_seq_len, opts.seed)
        if n_long:  # the probe's windows after the others (which stay the same)
            long_windows = unused_long_windows(tok, text, n_windows, opts.calib_seq_len,
                                               opts.seed, n_long + n_probe, long_len)
            probe_src, long_windows = long_windows[n_long:], long_windows[:n_long]
    rescore = windows[opts.calib_samples:]
    windows = windows[:opts.calib_samples]
    choices = candidates(cfg, ranks, kinds, parse_windows(opts, cfg), share_count(opts),
                         parse_windows(opts, cfg, "--group-windows"))
    if layout is not None:  # an explicit layout needs only its own choices' statistics
        choices = [KEEP, *dict.fromkeys(layout.values())]
        ranks = list(dict.fromkeys(c.rank for c in choices if c.kind == "linear")) or ranks
    settings = statistics_settings(src, calib, (opts.calib_samples, opts.calib_seq_len),
                                   opts.damage_windows, opts.positions, ranks, opts.ridge,
                                   opts.seed)
    if opts.held_out_damage:  # the maps' damage measured with maps that never saw it
        settings["damage_maps"] = "held-out"
    if opts.calib_mix is not None and n_long:  # the fits left the domains' tails: new entry
        settings["long_tails"] = n_long * long_len
    long = None
    if n_long:
        long = {"seq_len": long_len, "damage_windows": opts.long_damage_windows,
                "rescore_windows": opts.long_rescore_windows, "positions": opts.long_positions}
    cache = stats_path(cache_dir(), settings) if opts.use_cache else None
    score = layout is None
    long_damage = None if long_windows is None else long_windows[:opts.long_damage_windows]
    unoffered = unoffered_shares(cfg, choices, share_count(opts)) if score else frozenset()
    shares = [(j, c.target) for j, c in sorted((layout or {}).items())
              if c.kind == "share" and c.target is not None]
    stats, rec = ensure_statistics(model, windows, settings, choices if score else [KEEP],
                                   ranks, opts.ridge, cache, progress, long_damage, long,
                                   opts.held_out_damage, unoffered, shares)
    held_out = rec
    if long_windows is not None and opts.long_rescore_windows:
        held_out = record_dense(model, long_windows[opts.long_damage_windows:],
                                list(range(cfg.num_hidden_layers)), batch=1,
                                positions=opts.long_positions, seed=opts.seed)
    elif opts.rescore_windows:
        held_out = record_dense(model, rescore,
                                list(range(cfg.num_hidden_layers)),
                                positions=opts.calib_seq_len, seed=opts.seed)
    probe = probe_settings = None
    if n_probe:  # facts planted early in the probe windows, recalled at their end
        ids, picks = recall_windows(tok, probe_src, seed=opts.seed, repeat=opts.recall_repeat,
                                    depths=parse_depths(opts))
        probe = record_dense(model, ids, list(range(cfg.num_hidden_layers)), batch=1,
                             picks=picks)
        probe.groups, probe.weights = ["probe"] * len(probe.picks), {"probe": 1.0}
        held_out = merge_records(held_out, probe, opts.recall_probe)
        probe_settings = {"seq_len": long_len, "windows": n_probe, "after_long": n_long,
                          "repeat": opts.recall_repeat, "seed": opts.seed,
                          **({"depths": list(parse_depths(opts))} if opts.recall_depths else {})}
    eval_text = data_mod.load_text("wikitext2", "test") if opts.eval_windows > 0 else None
    return Session(opts, src, cfg, tok, model, stats, rec, held_out, choices, cache, eval_text,
                   time.perf_counter() - t0, context, long, long_windows,
                   windows[:opts.damage_windows], unoffered=unoffered, probe=probe,
                   probe_settings=probe_settings)
