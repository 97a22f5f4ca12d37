"""How the linear maps' error depends on their ridge, in sample, out of fold and off domain
(HF forward, no vLLM; issue 23 item 3: ridges chosen by held-out error, not fixed).

The planner's calibration windows (WikiText-2 validation, the plan's seed and shape) are
split into folds by window. For every layer and ridge of the grid, the attention's linear
map is fitted on all of them and scored in closed form (``held_out.squared_error``) on

- the windows it was fitted on (in sample),
- the fold left out of each fit (cross-validated: what ``--ridge held-out`` minimises),
- the dev parts of the report's other domains (Python, BoolQ, GSM8K; never the report parts),

as relative error (1 - R^2). Writes JSON and a plot.

    python benchmarks/map_ridge_curve.py [--model smollm2] [--rank full] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from harp_vllm import models
from harp_vllm.evaluation.domains import domain_text
from harp_vllm.evaluation.quality import token_windows
from harp_vllm.pruning.calibration.windows import calibration_windows, load_calibration_text
from harp_vllm.pruning.jobs.plan_options import PlanOptions
from harp_vllm.pruning.jobs.prune_options import parse_rank
from harp_vllm.pruning.methods.held_out import (
    FOLDS,
    RIDGE_GRID,
    choose_ridge,
    ridge_fits,
    squared_error,
    total_variation,
)
from harp_vllm.pruning.methods.linear import Moments, merged
from harp_vllm.pruning.reference import decoder_layers, load_model

OFF_DOMAIN = ("python", "boolq", "gsm8k")


@torch.no_grad()
def attention_moments(model, windows: torch.Tensor, folds: int) -> list[list[Moments]]:
    """Per layer, per fold (window ``i`` in fold ``i % folds``): the attention's
    input/output moments."""
    layers = decoder_layers(model)
    d = model.config.hidden_size
    out = [[Moments(d) for _ in range(folds)] for _ in layers]
    fold = [0]
    handles = [layer.self_attn.register_forward_hook(
        lambda mod, args, kw, o, j=j: out[j][fold[0]].add(kw["hidden_states"], o[0]),
        with_kwargs=True) for j, layer in enumerate(layers)]
    try:
        for i in range(len(windows)):
            fold[0] = i % folds
            model.model(input_ids=windows[i:i + 1], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rank", default="full")
    ap.add_argument("--dev-windows", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("out/map-ridge-curve"))
    a = ap.parse_args()
    torch.set_num_threads(2)
    opts = PlanOptions(model=a.model, out=a.out)
    src = models.resolve(a.model)
    tok = models.load_tokenizer(src)
    model = load_model(src).eval()
    rank = parse_rank(a.rank, model.config)
    text, _ = load_calibration_text()
    wins = calibration_windows(tok, text, opts.calib_samples + opts.rescore_windows,
                               opts.calib_seq_len, opts.seed)[:opts.calib_samples]
    print(f"fitting moments: {len(wins)} windows x {wins.shape[1]} tokens", flush=True)
    fit = attention_moments(model, wins, FOLDS)
    dev = {}
    for d in OFF_DOMAIN:
        ids = torch.tensor(token_windows(tok, domain_text(d, "dev", max_chars=opts.calib_seq_len
                                                          * a.dev_windows * 8 + 20_000),
                                         opts.calib_seq_len, a.dev_windows))
        dev[d] = [merged(m) for m in attention_moments(model, ids, 1)]
        print(f"{d}: {len(ids)} dev windows", flush=True)
    rows = []
    for j, folds in enumerate(fit):
        choice = choose_ridge(folds, rank)
        whole = merged(folds)
        var = total_variation(whole)
        row: dict = {"layer": j, "chosen": choice.ridge, "held_out": choice.held_out,
                     "in_sample": {}, **{d: {} for d in OFF_DOMAIN}}
        for ridge, (w, b) in zip(RIDGE_GRID, ridge_fits(whole, RIDGE_GRID, rank), strict=True):
            row["in_sample"][ridge] = squared_error(whole, w, b) / var
            for d in OFF_DOMAIN:
                row[d][ridge] = squared_error(dev[d][j], w, b) / total_variation(dev[d][j])
        rows.append(row)
        print(f"layer {j:2d}: chosen {choice.ridge:g}  held-out "
              f"{choice.held_out[1e-3]:.3f} @1e-3 -> {choice.held_out[choice.ridge]:.3f}  "
              f"in-sample {row['in_sample'][1e-3]:.3f} @1e-3  off-domain "
              + " ".join(f"{d} {row[d][1e-3]:.3f}->{row[d][choice.ridge]:.3f}"
                         for d in OFF_DOMAIN), flush=True)
    cols = ("in_sample", "held_out", *OFF_DOMAIN)
    summary = {c: {f"{r:g}": statistics.mean(row[c][r] for row in rows) for r in RIDGE_GRID}
               for c in cols}
    summary["chosen"] = {c: statistics.mean(row[c][row["chosen"]] for row in rows)
                         for c in cols}
    print("\nmean relative error over layers (1 - R^2):")
    print("| ridge | " + " | ".join(cols) + " |\n| --- |" + " --- |" * len(cols))
    for r in RIDGE_GRID:
        print(f"| {r:g} | " + " | ".join(f"{summary[c][f'{r:g}']:.4f}" for c in cols) + " |")
    print("| chosen per layer | " + " | ".join(f"{summary['chosen'][c]:.4f}" for c in cols)
          + " |")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ridge-curve.json").write_text(json.dumps(
        {"model": a.model, "rank": a.rank, "windows": list(wins.shape), "folds": FOLDS,
         "dev_windows": a.dev_windows, "summary": summary,
         "layers": [{k: ({f"{r:g}": e for r, e in v.items()} if isinstance(v, dict) else v)
                     for k, v in row.items()} for row in rows]}, indent=1))
    plot(rows, cols, a.out / "ridge-curve.png", a.model)
    print(f"wrote {a.out}/ridge-curve.json, ridge-curve.png")


def plot(rows: list[dict], cols: tuple[str, ...], path: Path, model: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for c in cols:
        ax.plot(RIDGE_GRID, [statistics.mean(row[c][r] for row in rows) for r in RIDGE_GRID],
                marker="o", label=c.replace("_", "-"))
    ax.set_xscale("log")
    ax.set_xlabel("ridge (relative to the mean input variance)")
    ax.set_ylabel("relative error (1 - R^2), mean of layers")
    ax.set_title(f"{model}: attention replaced by a linear map, error vs ridge")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
