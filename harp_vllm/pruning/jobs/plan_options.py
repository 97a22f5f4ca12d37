"""The ``harp-vllm plan`` job's options, checked, and the parsers of its lists (candidate
kinds, sliding windows, map ranks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import UserError
from ..planner.choices import (
    DEFAULT_SHARE_TARGETS,
    DEFAULT_WINDOWS,
    KINDS,
    check_window,
    served_kinds,
    unserved,
)
from ..reference.window_sinks import SINK_OVER_CAPS
from .prune_options import parse_rank

DEFAULT_BUDGETS = (0.1, 0.2, 0.27, 0.3, 0.4, 0.5)


@dataclass
class PlanOptions:
    model: str
    out: Path
    kv_saving: float | None = None
    speedup: float | None = None
    context: int | None = None  # None: the model's own (``models.kv_context``)
    layout: str | None = None  # explicit layout: no search
    frontier: bool = False
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    compare: Path | None = None  # single-method curves for the frontier plot
    ranks: str | None = None  # None: full (KV budget), 192,full (with a speed budget)
    candidates: str | None = None  # kinds offered; None: see default_kinds
    windows: str | None = None  # sliding windows offered (tokens, comma list): adds "window"
    share_targets: int | None = None  # offer shareJ, each layer's nearest J: adds "share"
    group_windows: str | None = None  # windows offered with one KV group kept whole
    # (tokens, comma list): adds "group-window" (winWkG)
    window_sinks: bool = False  # the plan's windowed layers get fitted sink logits
    sink_offset: float | None = None  # subtracted from each fitted logit (None: the default)
    sink_max_short_kl: float | None = None  # a layer's sink's short-context cost cap (None:
    # the default)
    sink_over_cap: str | None = None  # "drop", "lower" or "no-window" (None: the default)
    long_seq_len: int | None = None  # with windows: long windows' length (None: --context)
    long_damage_windows: int = 1
    long_rescore_windows: int = 2
    long_positions: int = 1024
    recall_probe: float = 0.0  # weight of the recall probe's KL in the layouts' re-scoring
    recall_repeat: int = 24  # the repetitive probe window's period (tokens)
    recall_windows: int = 2  # probe windows (every odd one repetitive)
    recall_depths: str | None = None  # comma list of fractions: one fact at each (None: 3
    # facts at random in each window's first half)
    probe_prices: bool = False  # the probe's damage in the per-layer prices (lazily measured)
    retrieval_floor: str | None = None  # comma list of fractions of the retrieval mass kept
    retrieval_beyond: int | None = None  # the mass's base distance (None: the largest window)
    calib_file: Path | None = None
    calib_mix: str | None = None  # comma list of domains: windows from each one's dev part
    calib_self: bool = False  # calibrate on text sampled from the dense model itself
    calib_samples: int = 16
    calib_seq_len: int = 1024  # long windows: 256-token ones misjudge long-range heads
    damage_windows: int = 4
    held_out_damage: bool = False  # damage measured with maps fitted without its windows
    rescore_windows: int = 4  # windows disjoint from every fit that layouts are re-scored on
    positions: int = 128
    ridge: float | None = 1e-3  # None: each map's ridge chosen by held-out error
    top_k: int = 8
    rounds: int = 1
    seed: int = 0
    eval_windows: int = 8
    eval_seq_len: int = 2048
    use_cache: bool = True
    force: bool = False
    extra: dict = field(default_factory=dict)


def check_options(opts: PlanOptions) -> None:
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
    if opts.context is not None and opts.context < 1:
        raise UserError(f"--context must be >= 1, got {opts.context}")
    if opts.top_k < 1 or opts.rounds < 1:
        raise UserError(f"--top-k and --rounds must be >= 1, got {opts.top_k}, {opts.rounds}")
    if not 1 <= opts.damage_windows <= opts.calib_samples:
        raise UserError(f"--damage-windows must be in 1..--calib-samples ({opts.calib_samples}), "
                        f"got {opts.damage_windows}")
    if opts.held_out_damage and opts.damage_windows >= opts.calib_samples:
        raise UserError(f"--held-out-damage fits the maps it scores without the damage "
                        f"windows: --damage-windows ({opts.damage_windows}) must be fewer "
                        f"than --calib-samples ({opts.calib_samples})")
    if opts.rescore_windows < 0:
        raise UserError(f"--rescore-windows must be >= 0, got {opts.rescore_windows}")
    if sum([opts.calib_mix is not None, opts.calib_file is not None, opts.calib_self]) > 1:
        raise UserError("give one of --calib-mix, --calib-file and --calib-self")
    if ((opts.long_seq_len is not None and opts.long_seq_len < 2)
            or opts.long_damage_windows < 1 or opts.long_rescore_windows < 0):
        raise UserError("--long-seq-len must be >= 2, --long-damage-windows >= 1 and "
                        "--long-rescore-windows >= 0")
    if opts.recall_probe < 0 or opts.recall_repeat < 1 or opts.recall_windows < 1:
        raise UserError(f"--recall-probe must be >= 0, --recall-repeat and --recall-windows "
                        f">= 1, got {opts.recall_probe}, {opts.recall_repeat}, "
                        f"{opts.recall_windows}")
    if opts.recall_probe and opts.long_rescore_windows < 1:
        raise UserError("--recall-probe is scored beside the long re-scoring windows: give "
                        "--long-rescore-windows >= 1")
    # the options that read the recall probe, and (solver: True) those that steer the solver
    for given, option, what, solver in (
            (opts.probe_prices, "--probe-prices", "adds the recall probe's damage to the "
             "per-layer prices", "prices the solver's candidates"),
            (opts.recall_depths is not None, "--recall-depths", "places the recall probe's "
             "facts", None),
            (opts.retrieval_floor is not None, "--retrieval-floor", "measures the retrieval "
             "mass on the recall probe", "constrains the solver")):
        if given and not opts.recall_probe:
            raise UserError(f"{option} {what}: give --recall-probe WEIGHT too")
        if given and solver and opts.layout:
            raise UserError(f"{option} {solver}: it applies to --kv-saving or --frontier, not "
                            f"to a given --layout")
    parse_depths(opts)
    parse_floors(opts)
    if opts.retrieval_beyond is not None and (opts.retrieval_floor is None
                                              or opts.retrieval_beyond < 1):
        raise UserError(f"--retrieval-beyond is the retrieval floor's base distance: give "
                        f"--retrieval-floor too, and a distance >= 1 (got "
                        f"{opts.retrieval_beyond})")
    if opts.recall_probe and opts.calib_mix is not None:
        raise UserError("--recall-probe plants its facts in long windows of the calibration "
                        "text; with --calib-mix those windows are the domains' tails, which "
                        "the probe does not take yet: give one of the two")
    if opts.window_sinks and opts.frontier:
        raise UserError("--window-sinks applies to one plan (--kv-saving or --layout), not "
                        "--frontier")
    if (opts.sink_offset is not None or opts.sink_max_short_kl is not None
            or opts.sink_over_cap is not None) and not opts.window_sinks:
        raise UserError("--sink-offset, --sink-max-short-kl and --sink-over-cap apply to the "
                        "fitted sinks: give --window-sinks too")
    if opts.sink_over_cap is not None and opts.sink_over_cap not in SINK_OVER_CAPS:
        raise UserError(f"--sink-over-cap must be one of {', '.join(SINK_OVER_CAPS)}, got "
                        f"{opts.sink_over_cap!r}")
    if opts.sink_over_cap == "no-window" and opts.layout:
        raise UserError("--sink-over-cap no-window prices the windows the planner offers: it "
                        "applies to --kv-saving, not to a given --layout")
    if opts.sink_max_short_kl is not None and opts.sink_max_short_kl < 0:
        raise UserError(f"--sink-max-short-kl must be >= 0, got {opts.sink_max_short_kl}")
    if opts.sink_offset is not None and not 0 <= opts.sink_offset < 50:
        raise UserError(f"--sink-offset must be in [0, 50), got {opts.sink_offset}")
    if opts.share_targets is not None and opts.share_targets < 1:
        raise UserError(f"--share-targets must be >= 1 (earlier layers offered to each layer), "
                        f"got {opts.share_targets}")
    if opts.group_windows is not None and opts.layout:
        raise UserError("--group-windows offers windows to the solver; with --layout name "
                        "them in the layout (winWkG)")
    if opts.share_targets is not None and opts.layout:
        raise UserError("--share-targets offers sharing to the solver; a --layout names its "
                        "sharing layers itself (e.g. 14:share12)")
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


def parse_kinds(opts: PlanOptions, cfg: Any) -> tuple[str, ...]:
    """The candidate kinds offered: ``--candidates``, or the defaults the model's family
    serves (no KV-group cut for a single KV head or a family without per-layer heads)."""
    if opts.candidates is None:
        kinds = default_kinds(opts.speedup)
        why = unserved("share", cfg) if opts.share_targets else None
        if why is not None:
            raise UserError(f"--share-targets: {why}")
        why = unserved("group-window", cfg) if opts.group_windows else None
        if why is not None:
            raise UserError(f"--group-windows: {why}")
        kinds = (*kinds, *(("window",) if opts.windows else ()),
                 *(("group-window",) if opts.group_windows else ()),
                 *(("share",) if opts.share_targets else ()))
        return served_kinds(kinds, cfg)
    kinds = tuple(dict.fromkeys(k.strip() for k in opts.candidates.split(",") if k.strip()))
    if not kinds:
        raise UserError(f"--candidates is empty (give some of {', '.join(KINDS)})")
    for given, option, needs in ((opts.windows, "--windows", ("window", "group-window")),
                                 (opts.group_windows, "--group-windows", ("group-window",)),
                                 (opts.share_targets, "--share-targets", ("share",))):
        if given and not set(needs) & set(kinds):
            raise UserError(f"{option} is given but --candidates {opts.candidates!r} offers "
                            f"no {' or '.join(needs)} candidate: add it, or leave {option} "
                            f"out")
    return kinds


def _fractions(text: str, option: str, most: int | None = None) -> tuple[float, ...]:
    """A comma list of fractions, each in [0, 1) (at most ``most``), or a UserError."""
    try:
        values = tuple(dict.fromkeys(float(t) for t in text.split(",") if t.strip()))
    except ValueError:
        raise UserError(f"{option} must be a comma list of fractions, got {text!r}") from None
    if not values or not all(0 <= v < 1 for v in values) or (most and len(values) > most):
        raise UserError(f"{option}: {'1 to ' + str(most) if most else 'one or more'} "
                        f"fractions, each in [0, 1), got {text!r}")
    return values


def parse_depths(opts: PlanOptions) -> tuple[float, ...]:
    """``--recall-depths``' fractions (at most 8: the probe's names), or none."""
    return () if opts.recall_depths is None else _fractions(opts.recall_depths,
                                                            "--recall-depths", 8)


def parse_floors(opts: PlanOptions) -> list[float]:
    """``--retrieval-floor``'s fractions, or none."""
    return [] if opts.retrieval_floor is None else list(_fractions(opts.retrieval_floor,
                                                                   "--retrieval-floor"))


def share_count(opts: PlanOptions) -> int:
    """How many earlier layers each layer is offered to share (``--share-targets``)."""
    return DEFAULT_SHARE_TARGETS if opts.share_targets is None else opts.share_targets


def parse_windows(opts: PlanOptions, cfg: Any, option: str = "--windows"
                  ) -> tuple[int, ...]:
    """The window sizes of ``--windows`` (default ``DEFAULT_WINDOWS``) or, with ``option``
    ``--group-windows``, of that option (default: the ``--windows`` ones)."""
    text = opts.windows if option == "--windows" else opts.group_windows
    if text is None and option != "--windows":
        return parse_windows(opts, cfg)
    if text is None:
        return DEFAULT_WINDOWS
    try:
        sizes = tuple(dict.fromkeys(int(t) for t in text.split(",") if t.strip()))
    except ValueError:
        raise UserError(f"{option} must be a comma list of token counts, got "
                        f"{text!r}") from None
    if not sizes:
        raise UserError(f"{option} is empty (give e.g. 512,1024,2048)")
    return tuple(check_window(w, cfg) for w in sizes)


def parse_ridge(text: str) -> float | None:
    """``--ridge``: a number >= 0, or ``held-out`` (None: chosen per map by cross-validated
    error, ``methods/held_out.py``)."""
    if text.strip().lower() == "held-out":
        return None
    try:
        ridge = float(text)
    except ValueError:
        raise UserError(f"--ridge must be a number >= 0 or 'held-out', got {text!r}") from None
    if not ridge >= 0:
        raise UserError(f"--ridge must be >= 0 (or 'held-out'), got {text!r}")
    return ridge


def parse_ranks(text: str | None, cfg: Any, speedup: float | None) -> list[int | None]:
    if text is None:
        text = "192,full" if speedup is not None else "full"
    ranks = [parse_rank(t.strip(), cfg) for t in text.split(",") if t.strip()]
    if not ranks:
        raise UserError("--ranks is empty (give e.g. 192,full)")
    return list(dict.fromkeys(ranks))
