"""The ``harp-vllm prune`` job: choose layers, search alphas, write the pruned checkpoint.

Methods: ``harp`` (top/bottom/listed layers, greedy alpha search or a fixed alpha),
``gate-norm`` (data-free: remove the attention sublayer, alpha = 0, of the K layers with the
lowest Gate-Norm), ``hybrid`` (Gate-Norm chooses the K layers, HARP's token-local path and
alpha search replace their attention) and the head/MLP-level methods ``amp``, ``flap`` and
``wanda-sp`` (see ``methods/structured.py``; ``--ratio`` is then the share of attention
heads), and ``linear`` (the chosen layers' attention replaced by a fitted affine map, see
``methods/linear.py``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import models
from ...errors import UserError
from ...evaluation import data as data_mod
from ...evaluation.perplexity import evaluate_perplexity
from ...families import family_of, harp_architecture, model_types
from ...spec import PruningSpec
from ..calibration.windows import calibration_windows, load_calibration_text
from ..costs import kv_bytes_per_token, model_shapes
from ..heads import MLP_BIAS, check_family, count_parameters
from ..methods.alpha_search import fast_search, naive_search
from ..methods.gate_norm import gate_norm_scores, lowest_scoring
from ..methods.structured import (
    DEFAULT_ALLOCATION,
    METHODS,
    prune_structured,
    shapes_of,
)
from ..reference import load_model, pruned
from ..selection import select_layers
from .checkpoint import check_output_dir, save_pruned
from .prune_options import PruneOptions, calibration_shape, parse_rank


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
    harp_architecture(hf_cfg)  # UserError for an unsupported family or architecture
    if opts.method in METHODS:
        return run_structured(opts, src, hf_cfg, out, progress)
    if opts.method == "linear":
        return run_linear(opts, src, hf_cfg, out, progress)
    layers, scores, alpha = choose_layers(opts, src, cfg["num_hidden_layers"])
    if opts.search not in ("fast", "naive"):
        raise UserError(f"--search must be fast or naive, got {opts.search!r}")
    run = prepare_run(opts, src, progress, calibrate=alpha is None, layers=layers)
    model, windows, report = run.model, run.windows, run.report
    calib_src, samples, seq_len = run.calib_src, run.samples, run.seq_len
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
    spec = PruningSpec(layers=alphas, method=opts.method, source_model=opts.model,
                       calibration=calibration)
    return evaluate_and_save(run, spec, opts, src, out, progress)


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
        calib_text, calib_src = load_calibration_text(opts.calib_data, opts.calib_split,
                                                      opts.calib_file)
        windows = calibration_windows(tok, calib_text, samples, seq_len, opts.seed)
    eval_text = data_mod.load_text("wikitext2", "test") if opts.eval_windows > 0 else None
    model = load_model(src)
    report: dict = {"model": opts.model, "method": opts.method, "source_dir": str(src),
                    **report_extra}
    before = None
    if eval_text is not None:
        before = evaluate_perplexity(model, tok, eval_text, opts.eval_seq_len,
                                     opts.eval_windows, progress=progress)
        report["ppl_before"] = before.perplexity
    return PreparedRun(tok, model, windows, calib_src, samples, seq_len, eval_text, before,
                       count_parameters(model), report)


def evaluate_and_save(run: PreparedRun, spec: PruningSpec, opts: PruneOptions, src: Path,
                      out: Path, progress: bool) -> dict:
    """The tail of every method: the pruned model's perplexity (when evaluating), the
    checkpoint, the finished report.

    HARP's alphas (``spec.layers``) are applied for the measurement only (``save_pruned``
    prunes for good); the other methods have already changed the model (their
    ``spec.layers`` is empty). The evaluation goes into ``spec.calibration`` too.
    """
    report = run.report
    if run.eval_text is not None:
        with pruned(run.model, spec.layers):
            after = evaluate_perplexity(run.model, run.tok, run.eval_text, opts.eval_seq_len,
                                        opts.eval_windows, progress=progress)
        record_eval(report, spec.calibration, run.before, after, opts.eval_seq_len)
    save_pruned(run.model, spec, src, out, force=opts.force)
    report["out"] = str(out)
    report["calibration"] = spec.calibration
    return report


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
    model, windows, report = run.model, run.windows, run.report
    calib_src, samples, seq_len = run.calib_src, run.samples, run.seq_len
    res = prune_structured(model, windows, opts.method, opts.ratio, opts.mlp_ratio,
                           opts.allocation, opts.bias_compensation, progress=progress)
    shapes = shapes_of(hf_cfg, res)
    heads_total = hf_cfg.num_attention_heads * hf_cfg.num_hidden_layers
    calibration = {**calib_src, "samples": samples, "seq_len": seq_len, "seed": opts.seed,
                   "head_ratio": opts.ratio, "mlp_ratio": opts.mlp_ratio,
                   "allocation": opts.allocation or DEFAULT_ALLOCATION[opts.method],
                   "bias_compensation": bool(getattr(model.config, MLP_BIAS, False)),
                   "gqa": "whole KV groups", "score_seconds": round(res.seconds, 2),
                   "heads_removed": heads_total - sum(shapes["num_attention_heads"]),
                   "group_scores": res.group_scores}
    spec = PruningSpec(layers={}, method=opts.method, source_model=opts.model,
                       calibration=calibration, shapes=shapes)
    report.update(params_before=run.params_before, params_after=count_parameters(model),
                  kv_bytes_per_token_before=kv_bytes_per_token(hf_cfg),
                  kv_bytes_per_token_after=kv_bytes_per_token(hf_cfg,
                                                               model_shapes(hf_cfg, spec)),
                  heads_removed=calibration["heads_removed"], heads_total=heads_total,
                  shapes=shapes, alphas={})
    return evaluate_and_save(run, spec, opts, src, out, progress)


def run_linear(opts: PruneOptions, src: Path, hf_cfg, out: Path, progress: bool) -> dict:
    """Replace the chosen layers' attention by fitted affine maps; write the checkpoint.

    (Long: option checks, layer choice, fit, optional refinement and the report, in order.)
    """
    from ..methods.linear import (
        check_options,
        fit_linear,
        layer_damage,
        lowest_damage,
        map_cost,
        refine,
    )

    served = model_types(lambda f: f.linear_maps)
    if hf_cfg.model_type not in served:
        raise UserError(f"--method linear is served for {', '.join(served)} models, "
                        f"not {hf_cfg.model_type!r}")
    if opts.alpha is not None:
        raise UserError("--alpha is for HARP; --method linear fits its maps")
    if opts.refine_steps < 0:
        raise UserError(f"--refine-steps must be >= 0, got {opts.refine_steps}")
    rank = parse_rank(opts.rank, hf_cfg)
    check_options(hf_cfg.hidden_size, rank, opts.map_input, opts.fit_order, opts.ridge,
                  family_of(hf_cfg).post_norm)
    explicit = opts.layer_list is not None or opts.position != "top"
    select = opts.select or ("top" if explicit else "damage")
    if select not in ("top", "damage"):
        raise UserError(f"--select must be top or damage, got {select!r}")
    if select == "damage" and explicit:
        raise UserError("--select damage chooses its own layers: give --layers P or --ratio r, "
                        "not --layer-list/--position")
    n_calib = calibration_shape(opts)[0]
    if select == "damage" and not 1 <= opts.select_windows <= n_calib:
        raise UserError(f"--select-windows must be between 1 and the {n_calib} calibration "
                        f"windows (--calib-samples), got {opts.select_windows}")
    layers = select_layers(hf_cfg.num_hidden_layers, opts.layers, opts.ratio, opts.layer_list,
                           opts.position)
    run = prepare_run(opts, src, progress, layers=layers)
    model, windows, report = run.model, run.windows, run.report
    calib_src, samples, seq_len = run.calib_src, run.samples, run.seq_len
    damage, select_seconds = None, 0.0
    if select == "damage":  # rank every layer by the KL its lone replacement costs
        t0 = time.perf_counter()
        damage = layer_damage(model, windows[:opts.select_windows], rank=rank,
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
                   **({"select_windows": opts.select_windows} if select == "damage" else {}),
                   **({"damage": {str(k): round(v, 5) for k, v in damage.items()}}
                      if damage is not None else {}),
                   "unexplained": {str(k): round(v["unexplained"], 4)
                                   for k, v in sorted(fit.stats.items())}}
    if opts.refine_steps:
        info = refine(model, fit, opts.refine_steps, progress=progress)
        calibration["refine"] = {k: (round(v, 4) if isinstance(v, float) else v)
                                 for k, v in info.items()}
    cost = map_cost(hf_cfg, rank)
    spec = PruningSpec(layers={}, maps={k: v.spec() for k, v in fit.maps.items()},
                       method="linear", source_model=opts.model, calibration=calibration)
    report.update(params_before=run.params_before, params_after=count_parameters(model),
                  kv_bytes_per_token_before=kv_bytes_per_token(hf_cfg),
                  kv_bytes_per_token_after=kv_bytes_per_token(hf_cfg,
                                                              model_shapes(hf_cfg, spec)),
                  map_cost=cost, alphas={},
                  maps={str(k): v.spec() for k, v in sorted(fit.maps.items())})
    return evaluate_and_save(run, spec, opts, src, out, progress)
