"""The ``harp-vllm prune`` job: choose layers, search alphas, write the pruned checkpoint.

Methods: ``harp`` (top/bottom/listed layers, greedy alpha search or a fixed alpha),
``gate-norm`` (data-free: remove the attention sublayer, alpha = 0, of the K layers with the
lowest Gate-Norm), ``hybrid`` (Gate-Norm chooses the K layers, HARP's token-local path and
alpha search replace their attention) and the head/MLP-level methods ``amp``, ``flap`` and
``wanda-sp`` (see ``structured.py``; ``--ratio`` is then the share of attention heads), and
``linear`` (the chosen layers' attention replaced by a fitted affine map, see ``linear.py``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import models
from ..errors import UserError
from ..evaluation import data as data_mod
from ..evaluation.perplexity import evaluate_perplexity
from ..families import LINEAR_MODEL_TYPES, head_dim
from ..spec import PruningSpec
from .checkpoint import check_output_dir, save_pruned
from .gate_norm import gate_norm_scores, lowest_scoring
from .heads import check_family, count_parameters
from .reference import family_post_norm, harp_architecture, pruned
from .search import (
    DEFAULT_CALIB_SAMPLES,
    DEFAULT_CALIB_SEQ_LEN,
    DEFAULT_GRID,
    calibration_windows,
    fast_search,
    naive_search,
)
from .structured import (
    DEFAULT_ALLOCATION,
    METHODS,
    kv_bytes_per_token,
    prune_structured,
    shapes_of,
)


def parse_layer_list(text: str) -> list[int]:
    """``"22-29,31"`` -> ``[22, ..., 29, 31]``."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise UserError(f"bad layer list item {part!r} (use e.g. 22-29,31)") from None
    if not out:
        raise UserError("the layer list is empty")
    return sorted(set(out))


def select_layers(num_layers: int, count: int | None = None, ratio: float | None = None,
                  layer_list: str | None = None, position: str = "top") -> list[int]:
    """The layers to prune: the top (or bottom, layer 0 excluded) P, or an explicit list."""
    given = sum(x is not None for x in (count, ratio, layer_list))
    if given != 1:
        raise UserError("give exactly one of --layers P, --ratio r or --layer-list")
    if layer_list is not None:
        layers = parse_layer_list(layer_list)
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise UserError(f"layer index {bad[0]} out of range (the model has {num_layers} "
                            f"layers: 0..{num_layers - 1})")
        return layers
    if ratio is not None:
        if not 0 < ratio < 1:
            raise UserError(f"--ratio must be in (0, 1), got {ratio}")
        count = round(ratio * num_layers)
    assert count is not None
    limit = num_layers - 1 if position == "bottom" else num_layers
    if not 1 <= count <= limit:
        raise UserError(f"cannot prune {count} layers of {num_layers} ({position}); "
                        f"choose 1..{limit}")
    if position == "top":
        return list(range(num_layers - count, num_layers))
    if position == "bottom":
        return list(range(1, count + 1))
    raise UserError(f"--position must be top or bottom, got {position!r}")


def parse_grid(text: str) -> tuple[float, ...]:
    try:
        grid = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"bad --alpha-grid {text!r} (use e.g. 0,0.1,0.2)") from None
    if not grid:
        raise UserError("the alpha grid is empty")
    return grid


@dataclass
class PruneOptions:
    model: str
    out: Path
    method: str = "harp"
    layers: int | None = None
    ratio: float | None = None
    layer_list: str | None = None
    position: str = "top"
    alpha: float | None = None  # fixed alpha for every layer: no search
    grid: tuple[float, ...] = DEFAULT_GRID
    calib_data: str = "wikitext2"
    calib_split: str | None = None
    calib_file: Path | None = None
    calib_samples: int | None = None  # default: 8 (harp), 128 (amp, flap, wanda-sp)
    calib_seq_len: int | None = None  # default: 256 (harp), 128 (amp, flap, wanda-sp)
    mlp_ratio: float = 0.0  # amp, flap, wanda-sp: share of MLP channels removed
    allocation: str | None = None  # uniform | global (default: the method's own)
    bias_compensation: bool | None = None  # default: on for flap only
    seed: int = 0
    search: str = "fast"
    rank: str | None = None  # linear: an integer or "full" (default: HARP's n_kv * head_dim)
    map_input: str = "normed"  # linear: normed | raw
    ridge: float = 1e-3  # linear: ridge, relative to the mean input variance
    fit_order: str = "dense"  # linear: dense | sequential | residual
    refine_steps: int = 0  # linear: joint KL refinement steps after the closed-form fit
    select: str | None = None  # linear: damage (lowest single-layer KL; the default unless
    # --layer-list or --position is given) or top (by --position)
    eval_windows: int = 8
    eval_seq_len: int = 2048
    force: bool = False


def load_calibration_text(opts: PruneOptions) -> tuple[str, dict]:
    if opts.calib_file is not None:
        return data_mod.read_text_file(opts.calib_file), {"file": str(opts.calib_file)}
    # Held-out rule: locally calibrate on validation (test is for evaluation); on the hub, train.
    split = opts.calib_split or ("train" if opts.calib_data.startswith("hub:") else "validation")
    if opts.calib_data == "wikitext2" and split == "test":
        raise UserError("calibrating on the test split would leak the evaluation text; use "
                        "validation (local) or train (hub)")
    return data_mod.load_text(opts.calib_data, split), {"dataset": opts.calib_data,
                                                         "split": split}


LAYER_METHODS = ("harp", "gate-norm", "hybrid")
DAMAGE_WINDOWS = 8  # calibration windows --select damage scores every layer on


def calibration_shape(opts: PruneOptions) -> tuple[int, int]:
    """(samples, tokens per sample): HARP's search default 8 x 256, the linear fit's 64 x 256
    (a d x d fit needs many tokens), or Wanda-sp/FLAP's 128 x 128."""
    default = ((DEFAULT_CALIB_SAMPLES, DEFAULT_CALIB_SEQ_LEN) if opts.method in LAYER_METHODS
               else (64, 256) if opts.method == "linear" else (128, 128))
    return (opts.calib_samples if opts.calib_samples is not None else default[0],
            opts.calib_seq_len if opts.calib_seq_len is not None else default[1])


def choose_layers(opts: PruneOptions, src: Path, n_layers: int
                  ) -> tuple[list[int], dict[int, float] | None, float | None]:
    """(layers to prune, Gate-Norm scores if used, fixed alpha or None to search)."""
    if opts.method == "harp":
        return (select_layers(n_layers, opts.layers, opts.ratio, opts.layer_list, opts.position),
                None, opts.alpha)
    if opts.method not in ("gate-norm", "hybrid"):
        raise UserError(f"unknown --method {opts.method!r}; choose harp, gate-norm, hybrid, "
                        f"linear, amp, flap or wanda-sp")
    if opts.layer_list is not None or opts.position != "top":
        raise UserError(f"--method {opts.method} chooses its own layers: give --layers K "
                        "or --ratio r, not --layer-list/--position")
    count = len(select_layers(n_layers, opts.layers, opts.ratio, None, "top"))
    scores = gate_norm_scores(src)
    if opts.method == "hybrid":
        return lowest_scoring(scores, count), scores, opts.alpha
    if opts.alpha not in (None, 0.0):
        raise UserError("--method gate-norm removes whole sublayers (alpha = 0); use "
                        "--method hybrid for HARP's rescaled path")
    return lowest_scoring(scores, count), scores, 0.0


def record_eval(report: dict, calibration: dict, before, after, seq_len: int) -> None:
    """Put the before/after WikiText-2 test perplexity into the report and the checkpoint."""
    report["ppl_after"] = after.perplexity
    report["eval"] = {"dataset": "wikitext2", "split": "test", "seq_len": seq_len,
                      "windows": before.windows}
    calibration["eval"] = {**report["eval"], "ppl_before": before.perplexity,
                           "ppl_after": after.perplexity}


def run_prune(opts: PruneOptions, progress: bool = True) -> dict:
    """Validate everything cheap first, then search and write; returns a report dict.

    (Long: the checks and the dispatch by method are one readable sequence.)
    """
    out = Path(opts.out)
    check_output_dir(out, opts.force)
    src = models.resolve(opts.model)
    cfg = json.loads((src / "config.json").read_text())
    from transformers import AutoConfig

    hf_cfg = AutoConfig.from_pretrained(src)
    if getattr(hf_cfg, "harp_pruning", None):
        raise UserError(f"{opts.model} is already a pruned checkpoint; prune its source model")
    family_post_norm(hf_cfg)
    harp_architecture(hf_cfg)
    if opts.method in METHODS:
        return run_structured(opts, src, hf_cfg, out, progress)
    if opts.method == "linear":
        return run_linear(opts, src, hf_cfg, out, progress)
    layers, scores, alpha = choose_layers(opts, src, cfg["num_hidden_layers"])
    if opts.search not in ("fast", "naive"):
        raise UserError(f"--search must be fast or naive, got {opts.search!r}")
    run = prepare_run(opts, src, progress, calibrate=alpha is None, layers=layers)
    tok, model, windows, report = run.tok, run.model, run.windows, run.report
    calib_src, samples, seq_len = run.calib_src, run.samples, run.seq_len
    eval_text, before = run.eval_text, run.before
    calibration: dict = {}
    if alpha is not None:
        alphas = {i: float(alpha) for i in layers}
        calibration = {"fixed_alpha": float(alpha)}
    else:
        search = fast_search if opts.search == "fast" else naive_search
        res = search(model, windows, layers, opts.grid, progress=progress)
        alphas = res.alphas
        calibration = {**calib_src, "samples": samples, "seq_len": seq_len, "seed": opts.seed,
                       "grid": list(opts.grid), "search": opts.search,
                       "search_seconds": round(res.seconds, 2),
                       "calib_ppl": {str(k): v for k, v in sorted(res.calib_ppl.items())}}
    if scores is not None:
        calibration["gate_norm"] = {str(k): v for k, v in scores.items()}
    report["alphas"] = {str(k): v for k, v in sorted(alphas.items())}
    if eval_text is not None:
        with pruned(model, alphas):
            after = evaluate_perplexity(model, tok, eval_text, opts.eval_seq_len,
                                        opts.eval_windows, progress=progress)
        record_eval(report, calibration, before, after, opts.eval_seq_len)
    spec = PruningSpec(layers=alphas, method=opts.method, source_model=opts.model,
                       calibration=calibration)
    save_pruned(model, spec, src, out, force=opts.force)
    report["out"] = str(out)
    report["calibration"] = calibration
    return report


@dataclass
class PreparedRun:
    """What a prune job starts from: tokenizer, dense model, calibration windows (None for a
    fixed-alpha HARP run), the evaluation text and the dense perplexity (when evaluating), and
    the report so far."""

    tok: Any
    model: Any
    windows: Any
    calib_src: dict
    samples: int
    seq_len: int
    eval_text: str | None
    before: Any
    params_before: int
    report: dict


def prepare_run(opts: PruneOptions, src: Path, progress: bool, calibrate: bool = True,
                **report_extra: Any) -> PreparedRun:
    """Load tokenizer, calibration windows (``calibrate``) and model; measure the dense
    perplexity."""
    tok = models.load_tokenizer(src)
    samples, seq_len = calibration_shape(opts)
    windows = None
    calib_src: dict = {}
    if calibrate:
        calib_text, calib_src = load_calibration_text(opts)
        windows = calibration_windows(tok, calib_text, samples, seq_len, opts.seed)
    eval_text = data_mod.load_text("wikitext2", "test") if opts.eval_windows > 0 else None
    model = models.load(src)
    report: dict = {"model": opts.model, "method": opts.method, "source_dir": str(src),
                    **report_extra}
    before = None
    if eval_text is not None:
        before = evaluate_perplexity(model, tok, eval_text, opts.eval_seq_len,
                                     opts.eval_windows, progress=progress)
        report["ppl_before"] = before.perplexity
    return PreparedRun(tok, model, windows, calib_src, samples, seq_len, eval_text, before,
                       count_parameters(model), report)


def run_structured(opts: PruneOptions, src: Path, hf_cfg, out: Path, progress: bool) -> dict:
    """AMP / FLAP / Wanda-sp: score heads and MLP channels, cut them, write the checkpoint."""
    check_family(hf_cfg)
    if opts.layers is not None or opts.layer_list is not None or opts.alpha is not None:
        raise UserError(f"--method {opts.method} prunes heads: give --ratio (share of attention "
                        f"heads) and optionally --mlp-ratio, not --layers/--layer-list/--alpha")
    if opts.ratio is None:
        raise UserError(f"--method {opts.method} needs --ratio (share of attention heads)")
    if opts.ratio == 0 and opts.mlp_ratio == 0:
        raise UserError("--ratio 0 and --mlp-ratio 0 would prune nothing")
    run = prepare_run(opts, src, progress)
    tok, model, windows, report = run.tok, run.model, run.windows, run.report
    calib_src, samples, seq_len = run.calib_src, run.samples, run.seq_len
    eval_text, before, params_before = run.eval_text, run.before, run.params_before
    res = prune_structured(model, windows, opts.method, opts.ratio, opts.mlp_ratio,
                           opts.allocation, opts.bias_compensation, progress=progress)
    shapes = shapes_of(hf_cfg, res)
    heads_total = hf_cfg.num_attention_heads * hf_cfg.num_hidden_layers
    calibration = {**calib_src, "samples": samples, "seq_len": seq_len, "seed": opts.seed,
                   "head_ratio": opts.ratio, "mlp_ratio": opts.mlp_ratio,
                   "allocation": opts.allocation or DEFAULT_ALLOCATION[opts.method],
                   "bias_compensation": bool(getattr(model.config, "mlp_bias", False)),
                   "gqa": "whole KV groups", "score_seconds": round(res.seconds, 2),
                   "heads_removed": heads_total - sum(shapes["num_attention_heads"]),
                   "group_scores": res.group_scores}
    report.update(params_before=params_before, params_after=count_parameters(model),
                  kv_bytes_per_token_before=kv_bytes_per_token(hf_cfg),
                  kv_bytes_per_token_after=kv_bytes_per_token(
                      hf_cfg, shapes["num_key_value_heads"]),
                  heads_removed=calibration["heads_removed"], heads_total=heads_total,
                  shapes=shapes, alphas={})
    if eval_text is not None:
        after = evaluate_perplexity(model, tok, eval_text, opts.eval_seq_len,
                                    opts.eval_windows, progress=progress)
        record_eval(report, calibration, before, after, opts.eval_seq_len)
    spec = PruningSpec(layers={}, method=opts.method, source_model=opts.model,
                       calibration=calibration, shapes=shapes)
    save_pruned(model, spec, src, out, force=opts.force)
    report["out"] = str(out)
    report["calibration"] = calibration
    return report


def parse_rank(text: str | None, hf_cfg) -> int | None:
    """``--rank``: an integer, ``full`` (None), or by default HARP's folded width n_kv*d_h."""
    d = hf_cfg.hidden_size
    if text is None:
        return min(d, hf_cfg.num_key_value_heads * head_dim(hf_cfg))
    if str(text).lower() == "full":
        return None
    try:
        rank = int(text)
    except ValueError:
        raise UserError(f"--rank must be an integer or 'full', got {text!r}") from None
    if not 1 <= rank <= d:
        raise UserError(f"--rank {rank} is out of range: the hidden size is {d}, so a map has "
                        f"rank 1..{d} (or 'full')")
    return None if rank == d else rank


def run_linear(opts: PruneOptions, src: Path, hf_cfg, out: Path, progress: bool) -> dict:
    """Replace the chosen layers' attention by fitted affine maps; write the checkpoint.

    (Long: option checks, layer choice, fit, optional refinement and the report, in order.)
    """
    from .linear import (
        check_options,
        fit_linear,
        layer_damage,
        lowest_damage,
        map_cost,
        refine,
    )

    if hf_cfg.model_type not in LINEAR_MODEL_TYPES:
        raise UserError(f"--method linear is served for {', '.join(LINEAR_MODEL_TYPES)} models, "
                        f"not {hf_cfg.model_type!r}")
    if opts.alpha is not None:
        raise UserError("--alpha is for HARP; --method linear fits its maps")
    if opts.refine_steps < 0:
        raise UserError(f"--refine-steps must be >= 0, got {opts.refine_steps}")
    rank = parse_rank(opts.rank, hf_cfg)
    check_options(hf_cfg.hidden_size, rank, opts.map_input, opts.fit_order, opts.ridge)
    explicit = opts.layer_list is not None or opts.position != "top"
    select = opts.select or ("top" if explicit else "damage")
    if select not in ("top", "damage"):
        raise UserError(f"--select must be top or damage, got {select!r}")
    if select == "damage" and explicit:
        raise UserError("--select damage chooses its own layers: give --layers P or --ratio r, "
                        "not --layer-list/--position")
    layers = select_layers(hf_cfg.num_hidden_layers, opts.layers, opts.ratio, opts.layer_list,
                           opts.position)
    run = prepare_run(opts, src, progress, layers=layers)
    tok, model, windows, report = run.tok, run.model, run.windows, run.report
    calib_src, samples, seq_len = run.calib_src, run.samples, run.seq_len
    eval_text, before, params_before = run.eval_text, run.before, run.params_before
    damage, select_seconds = None, 0.0
    if select == "damage":  # rank every layer by the KL its lone replacement costs
        t0 = time.perf_counter()
        damage = layer_damage(model, windows[:DAMAGE_WINDOWS], rank=rank,
                              input_kind=opts.map_input, ridge=opts.ridge, progress=progress)
        layers = lowest_damage(damage, len(layers))
        report["layers"] = layers
        select_seconds = time.perf_counter() - t0
    fit = fit_linear(model, windows, layers, rank=rank, input_kind=opts.map_input,
                     order=opts.fit_order, ridge=opts.ridge, teacher=opts.refine_steps > 0,
                     progress=progress)
    calibration = {**calib_src, "samples": samples, "seq_len": seq_len, "seed": opts.seed,
                   "rank": rank, "input": opts.map_input, "ridge": opts.ridge,
                   "fit_order": opts.fit_order, "fit_seconds": round(fit.seconds, 2),
                   "select": select, "select_seconds": round(select_seconds, 2),
                   **({"damage": {str(k): round(v, 5) for k, v in damage.items()}}
                      if damage is not None else {}),
                   "unexplained": {str(k): round(v["unexplained"], 4)
                                   for k, v in sorted(fit.stats.items())}}
    if opts.refine_steps:
        info = refine(model, fit, opts.refine_steps, progress=progress)
        calibration["refine"] = {k: (round(v, 4) if isinstance(v, float) else v)
                                 for k, v in info.items()}
    cost = map_cost(hf_cfg, rank)
    report.update(params_before=params_before, params_after=count_parameters(model),
                  kv_bytes_per_token_before=kv_bytes_per_token(hf_cfg),
                  kv_bytes_per_token_after=kv_bytes_per_token(hf_cfg, [
                      0 if i in fit.maps else hf_cfg.num_key_value_heads
                      for i in range(hf_cfg.num_hidden_layers)]),
                  map_cost=cost, alphas={},
                  maps={str(k): v.spec() for k, v in sorted(fit.maps.items())})
    if eval_text is not None:
        after = evaluate_perplexity(model, tok, eval_text, opts.eval_seq_len,
                                    opts.eval_windows, progress=progress)
        record_eval(report, calibration, before, after, opts.eval_seq_len)
    spec = PruningSpec(layers={}, maps={k: v.spec() for k, v in fit.maps.items()},
                       method="linear", source_model=opts.model, calibration=calibration)
    save_pruned(model, spec, src, out, force=opts.force)
    report["out"] = str(out)
    report["calibration"] = calibration
    return report


def alpha_table_rows(report: dict) -> list[tuple[str, str, str]]:
    """(layer, alpha, calibration ppl at the chosen alpha) for printing, top layer first."""
    calib = report.get("calibration", {}).get("calib_ppl", {})
    grid = report.get("calibration", {}).get("grid")
    rows = []
    for k, a in sorted(report["alphas"].items(), key=lambda kv: -int(kv[0])):
        ppl = "-"
        if k in calib and grid:
            ppl = f"{calib[k][min(range(len(grid)), key=lambda i: abs(grid[i] - a))]:.3f}"
        rows.append((k, f"{a:.1f}", ppl))
    return rows



def shape_table_rows(shapes: dict[str, list[int]]) -> list[tuple[str, str, str, str]]:
    """(layer, heads, KV heads, MLP channels) for printing, top layer first."""
    rows = zip(shapes["num_attention_heads"], shapes["num_key_value_heads"],
               shapes["intermediate_size"], strict=True)
    return [(str(i), str(q), str(kv), str(m)) for i, (q, kv, m) in reversed(list(enumerate(rows)))]
