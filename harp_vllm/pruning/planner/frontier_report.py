"""The frontier report of ``harp-vllm plan --frontier``: a Markdown table and two pictures
(perplexity against KV saving and against the predicted 7k prefill speed-up, with the
single-method curves; each budget's per-layer layout)."""

from __future__ import annotations

from pathlib import Path

# Colour per choice family in the layout picture.
CHOICE_COLOURS = {"keep": "#d9d9d9", "drop1": "#9ecae1", "drop2": "#3182bd",
                  "drop1lin": "#a1d99b", "drop2lin": "#31a354", "linear": "#fdae6b",
                  "remove": "#e6550d"}


def _speed_key(context: int = 7168) -> str:
    return f"prefill@{context}"


def table(report: dict) -> str:
    """Markdown: one row per budget."""
    lines = ["| KV saving (budget) | KV saving (plan) | WikiText-2 test ppl | calib KL predicted "
             "/ measured | predicted prefill speed-up 4k / 7k | layers changed | layout |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for p in report["plans"]:
        c = p["costs"]
        sp = c["predicted_speedup"]
        changed = sum(x != "keep" for x in p["per_layer"])
        ppl = "-" if p["ppl"] is None else f"{p['ppl']:.2f}"
        served = (f" ({c['kv_saving_served']:.3f} served)" if "kv_saving_served" in c
                  else "")
        lines.append(
            f"| {p['budget']['kv_saving']:.4g} | {c['kv_saving']:.3f}{served} | {ppl} | "
            f"{p['predicted_kl']:.4f} / {p['measured_kl']:.4f} | "
            f"{sp['prefill@4096']:.3f} / {sp['prefill@7168']:.3f} | {changed} | "
            f"`{p['layout']}` |")
    return "\n".join(lines) + "\n"


def _family(name: str) -> str:
    return "linear" if name.startswith("linear") else name


def write_report(report: dict, out: Path) -> list[Path]:
    """frontier.md, frontier.png (two panels) and layouts.png under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    out = Path(out)
    written = [out / "frontier.md", out / "frontier.png", out / "layouts.png"]
    dense = report.get("ppl_dense")
    written[0].write_text(f"# Plan frontier: {report['model']}\n\nDense perplexity: "
                          f"{dense if dense is None else round(dense, 2)}\n\n" + table(report))
    plans = [p for p in report["plans"] if p["ppl"] is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    ax.plot([p["costs"]["kv_saving"] for p in plans], [p["ppl"] for p in plans], "o-",
            color="black", lw=2, label="plan (per-layer mixture)")
    for name, pts in report.get("compare", {}).items():
        pts = sorted(pts, key=lambda q: q["kv_saving"])
        ax.plot([q["kv_saving"] for q in pts], [q["ppl"] for q in pts], "s--", label=name)
    ax.set_xlabel("KV-cache saving (fraction of dense bytes per token)")
    ax.set_ylabel("WikiText-2 test perplexity")
    ax.set_yscale("log")
    if dense:
        ax.axhline(dense, color="grey", lw=0.8, ls=":", label="dense")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    key = _speed_key()
    ax.plot([p["costs"]["predicted_speedup"][key] for p in plans], [p["ppl"] for p in plans],
            "o-", color="black", lw=2, label="plan")
    for name, pts in report.get("compare", {}).items():
        pts = sorted((q for q in pts if "prefill_speedup_7k" in q),
                     key=lambda q: q["prefill_speedup_7k"])
        if pts:
            ax.plot([q["prefill_speedup_7k"] for q in pts], [q["ppl"] for q in pts], "s--",
                    label=name)
    ax.set_xlabel("predicted prefill speed-up at 7,168 tokens (cost model)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(written[1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(11, 0.5 + 0.45 * len(report["plans"])))
    for row, p in enumerate(report["plans"]):
        for j, name in enumerate(p["per_layer"]):
            ax.add_patch(plt.Rectangle((j, row), 0.95, 0.9,
                                       color=CHOICE_COLOURS.get(_family(name), "white")))
    n_layers = len(report["plans"][0]["per_layer"]) if report["plans"] else 0
    ax.set_xlim(0, n_layers)
    ax.set_ylim(0, len(report["plans"]))
    ax.set_yticks([r + 0.45 for r in range(len(report["plans"]))],
                  [f"{p['budget']['kv_saving']:.1%}" for p in report["plans"]])
    ax.set_xticks([j + 0.45 for j in range(n_layers)], [str(j) for j in range(n_layers)],
                  fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("KV budget")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in CHOICE_COLOURS.items()],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(written[2], dpi=120)
    plt.close(fig)
    return written
