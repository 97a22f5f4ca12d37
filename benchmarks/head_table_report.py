"""The head-level comparison table of docs/results.md (issue 9) from benchmarks/head_table.sh's
outputs and, optionally, bench_engine_variants.py's JSON (4k-prompt prefill throughput)::

    .venv/bin/python benchmarks/head_table_report.py out/head-table --engine out/head-engine.json \
        --plot docs/heads/kv_heads_per_layer.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from safetensors import safe_open

from harp_vllm import models
from harp_vllm.serving.metrics import kv_layout

ROWS = [  # (variant, label, engine name)
    ("dense", "dense", "dense"),
    ("harp-top8", "HARP top-8 (searched alphas)", "harp8"),
    ("alpha1-top8", "HARP top-8, alpha = 1", "alpha1"),
    ("flap-global", "FLAP (WIFV, global, bias comp.)", "flap"),
    ("flap-global-nobias", "FLAP without bias compensation", "flap_nobias"),
    ("wanda-sp-global", "Wanda-sp (global)", "wanda"),
    ("amp-global", "AMP (global)", "amp"),
    ("flap-uniform", "FLAP (uniform, 1 group/layer)", "flap_u"),
    ("wanda-sp-uniform", "Wanda-sp (uniform, 1 group/layer)", "wanda_u"),
    ("amp-uniform", "AMP (uniform, 1 group/layer)", "amp_u"),
    ("flap-uniform-nobias", "FLAP (uniform) without bias compensation", "-"),
    ("wanda-sp-uniform-bias", "Wanda-sp (uniform) with FLAP's bias compensation", "-"),
    ("flap-global-mlp20", "FLAP (global), also 20% of MLP channels", "-"),
    ("amp-uniform-mlp20", "AMP (uniform), also 20% of MLP channels", "-"),
]


def parameters(path: Path) -> int:
    total = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                total += math.prod(st.get_slice(k).get_shape())
    return total


def describe(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    n, kv = cfg["num_hidden_layers"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    lay = kv_layout(path.name, cfg, n, kv, d, 2)
    sec = cfg.get("harp_pruning") or {}
    heads_total = cfg["num_attention_heads"] * n
    if sec.get("shapes"):
        removed = heads_total - sum(sec["shapes"]["num_attention_heads"])
    else:
        removed = cfg["num_attention_heads"] * len(sec.get("layers", {}))
    return {"params": parameters(path), "kv_bytes": lay.bytes_per_token,
            "heads_removed": removed, "heads_total": heads_total}


def kv_heads_per_layer(path: Path) -> list[int]:
    cfg = json.loads((path / "config.json").read_text())
    sec = cfg.get("harp_pruning") or {}
    if sec.get("shapes"):
        return list(sec["shapes"]["num_key_value_heads"])
    pruned = {int(k) for k in sec.get("layers", {})}
    return [0 if i in pruned else cfg["num_key_value_heads"]
            for i in range(cfg["num_hidden_layers"])]


PLOTTED = ["harp-top8", "flap-global", "wanda-sp-global", "amp-global"]


def plot(out_dir: Path, labels: dict[str, str], target: Path) -> None:
    """KV heads kept per layer for the methods at HARP P=8's head share (72 of 270 heads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.6))
    for k, variant in enumerate(PLOTTED):
        path = out_dir / variant
        if not (path / "config.json").is_file():
            continue
        heads = kv_heads_per_layer(path)
        ppl = json.loads((out_dir / f"{variant}.json").read_text())["perplexity"]
        xs = [i + (k - 1.5) * 0.2 for i in range(len(heads))]
        ax.bar(xs, heads, width=0.2, label=f"{labels[variant]}: ppl {ppl:,.1f}")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("KV heads kept (of 3)")
    ax.set_yticks([0, 1, 2, 3])
    ax.set_ylim(0, 4.3)
    ax.set_title("SmolLM2-135M, 24 of 90 KV groups removed: where each method cuts")
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    print(f"wrote {target}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--engine", type=Path, help="bench_engine_variants.py JSON")
    ap.add_argument("--plot", type=Path, help="write the KV-heads-per-layer plot here")
    args = ap.parse_args()
    engine = {}
    if args.engine and args.engine.is_file():
        engine = {r["variant"]: r for r in json.loads(args.engine.read_text())["table"]}
    dense_dir = models.prepare("smollm2-135m", progress=False)
    print("| model | heads removed | WikiText-2 ppl | parameters | KV bytes/token (bf16) "
          "| 4k prefill tok/s (x dense) |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant, label, eng in ROWS:
        ppl_file = args.out_dir / f"{variant}.json"
        path = dense_dir if variant == "dense" else args.out_dir / variant
        if not ppl_file.is_file() or not (path / "config.json").is_file():
            continue
        info = describe(path)
        ppl = json.loads(ppl_file.read_text())["perplexity"]
        e = engine.get(eng)
        speed = (f"{e['prefill_4096_tok_s']:.0f} ({e['prefill_4096_ratio']:.2f}x)" if e
                 else "-")
        print(f"| {label} | {info['heads_removed']}/{info['heads_total']} | {ppl:,.2f} | "
              f"{info['params'] / 1e6:.2f} M | {info['kv_bytes']:,} | {speed} |")

    if args.plot:
        plot(args.out_dir, {v: label for v, label, _ in ROWS}, args.plot)


if __name__ == "__main__":
    main()
