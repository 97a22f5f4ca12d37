"""The linear-replacement table of docs/results.md (issue 18) from benchmarks/linear_table.sh's
outputs, optionally with bench_engine_variants.py's JSON (prefill ratios), and a per-layer plot
of what each P = 8 method removes::

    .venv/bin/python benchmarks/linear_table_report.py out/linear-table \\
        [--engine out/linear-engine.json] [--plot docs/linear/layers.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROWS = [  # (variant, label)
    ("dense", "dense"),
    ("lin4", "linear P=4 (damage-selected on 16 windows, rank 192, normed)"),
    ("flap4", "FLAP, 12 of 90 KV groups (global, bias comp.)"),
    ("lin8-timed", "**linear P=8 (default: damage-selected on 8 windows, rank 192)**"),
    ("lin8", "linear P=8, damage-selected on 16 windows"),
    ("harp8", "HARP top-8, searched alphas"),
    ("flap8", "FLAP, 24 of 90 KV groups"),
    ("lin8-top", "linear, top 8 layers"),
    ("lin8-full", "linear P=8, rank full (d x d)"),
    ("lin8-raw", "linear P=8, raw input (NBL)"),
    ("lin8-seq", "linear P=8, sequential fit"),
    ("lin8-res", "linear P=8, residual-target fit"),
    ("lin8-c16", "linear P=8, 16 x 256 calibration"),
    ("lin8-c256", "linear P=8, 256 x 256 calibration"),
    ("lin8-top-full", "linear, top 8, rank full"),
    ("lin8-top-raw", "linear, top 8, raw input"),
    ("lin8-refine", "linear P=8 + 100 steps KL refinement"),
    ("lin12", "linear P=12 (damage-selected on 16 windows)"),
    ("flap12", "FLAP, 36 of 90 KV groups"),
]


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def fit_time(prune: dict | None) -> str:
    if prune is None:
        return "-"
    c = prune.get("calibration", {})
    if "fit_seconds" in c:
        sel = c.get("select_seconds") or 0.0
        refine = (c.get("refine") or {}).get("seconds", 0.0)
        total = c["fit_seconds"] + sel + refine
        parts = [f"fit {c['fit_seconds']:.0f}"] + ([f"select {sel:.0f}"] if sel else []) + (
            [f"refine {refine:.0f}"] if refine else [])
        return f"{total:.0f} s ({', '.join(parts)})"
    if "search_seconds" in c:
        return f"{c['search_seconds']:.0f} s (alpha search)"
    if "score_seconds" in c:
        return f"{c['score_seconds']:.0f} s (scoring)"
    return "-"


def layers_of(out: Path, name: str) -> str:
    cfg = load(out / name / "config.json")
    if cfg is None:
        return "-"
    sec = cfg.get("harp_pruning") or {}
    if sec.get("maps"):
        return ",".join(sorted(sec["maps"], key=int))
    if sec.get("layers"):
        return ",".join(sorted(sec["layers"], key=int))
    if sec.get("shapes"):
        kv = sec["shapes"]["num_key_value_heads"]
        full = cfg["num_key_value_heads"]
        return f"{sum(full - k for k in kv)} groups over {sum(k < full for k in kv)} layers"
    return "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--engine", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    from head_table_report import describe

    engine = load(args.engine) if args.engine else None
    dense = load(args.out / "dense.json")
    print("| variant | layers replaced / cut | ppl (8 x 2048) | x dense | params | "
          "KV bytes/token (bf16) | time to prune | 4k / 7k prefill vs dense |")
    print("|---|---|---|---|---|---|---|---|")
    for name, label in ROWS:
        res = load(args.out / f"{name}.json")
        if res is None:
            continue
        path = args.out / name
        d = describe(path) if name != "dense" else None
        from harp_vllm import models

        if name == "dense":
            d = describe(models.prepare("smollm2-135m", progress=False))
        ratio = res["perplexity"] / dense["perplexity"]
        eng = "-"
        rows = {r["variant"]: r for r in (engine or {}).get("table", [])}
        if name in rows:
            eng = " / ".join(f"{v:.2f}x" for k, v in rows[name].items()
                             if k.startswith("prefill_") and k.endswith("_ratio"))
        print(f"| {label} | {layers_of(args.out, name) if name != 'dense' else '-'} | "
              f"{res['perplexity']:.2f} | {ratio:.2f} | {d['params'] / 1e6:.1f} M | "
              f"{d['kv_bytes']:,} | {fit_time(load(args.out / f'{name}.prune.json'))} | "
              f"{eng} |")
    if args.plot:
        plot(args.out, args.plot)


def plot(out: Path, target: Path) -> None:
    """Which layers lose attention (or KV groups) at P = 8, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from head_table_report import kv_heads_per_layer

    names = [("lin8-timed", "linear (damage-selected)"), ("lin8-top", "linear (top 8)"),
             ("harp8", "HARP top-8"), ("flap8", "FLAP 24 groups")]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    for row, (name, _label) in enumerate(names):
        if not (out / name / "config.json").is_file():
            continue
        cfg = load(out / name / "config.json")
        sec = cfg.get("harp_pruning") or {}
        kept = kv_heads_per_layer(out / name)
        if sec.get("maps"):
            kept = [0 if str(i) in sec["maps"] else cfg["num_key_value_heads"]
                    for i in range(cfg["num_hidden_layers"])]
        full = cfg["num_key_value_heads"]
        ax.scatter(range(len(kept)), [row] * len(kept), c=[k / full for k in kept],
                   cmap="RdYlGn", vmin=0, vmax=1, s=120, marker="s")
    ax.set_yticks(range(len(names)), [n[1] for n in names])
    ax.set_xticks(range(0, 30, 2))
    ax.set_xlabel("layer (red: attention replaced / KV heads removed; green: kept)")
    ax.set_title("SmolLM2-135M at 27% KV saving: where each method removes attention")
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=120)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
