"""The PNG plots of a load test: the throughput ratio (with the cost model's prediction when
the pruned endpoint serves a local checkpoint), TTFT, and the capacity scenario."""

from __future__ import annotations

from pathlib import Path

from .summary import SIDES, kv_queued

PLOTS = {"throughput_ratio": "throughput_ratio.png", "ttft": "ttft.png",
         "capacity": "capacity.png"}


def predicted_ratios(summary: dict, prompt_lens: list[int]) -> dict[int, float]:
    """The cost model's pruned/dense request-throughput ratio per prompt length, when the
    pruned endpoint serves a local checkpoint directory (else empty)."""
    from harp_vllm.pruning.costs import checkpoint_shapes, request_speedup

    root = (summary.get("pruned_root") or "")
    found = checkpoint_shapes(root) if root else None
    if found is None:
        return {}
    cfg, shapes = found
    out_len = int(summary.get("output_len") or 1)
    return {n: request_speedup(cfg, shapes, n, out_len) for n in prompt_lens}


def plot(summary: dict, out_dir: Path) -> dict:
    """Write the PNG plots that have data; returns {name: path}. (Long: one short block per
    plot, kept together so the figures share their styling.)"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    sweep = [p for p in summary["points"] if p["scenario"] == "sweep"]
    concs = sorted({p["concurrency"] for p in sweep})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def series(c, getter):
        xs, ys, lo, hi = [], [], [], []
        for p in sweep:
            if p["concurrency"] != c:
                continue
            s = getter(p)
            if s is None:
                continue
            xs.append(p["prompt_len"])
            ys.append(s["median"])
            lo.append(s["median"] - s["min"])
            hi.append(s["max"] - s["median"])
        return xs, ys, [lo, hi]

    if any(p["ratio"]["total_tps"] for p in sweep):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, c in enumerate(concs):
            xs, ys, err = series(c, lambda p: p["ratio"]["total_tps"])
            if xs:
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=colors[i % 10],
                            label=f"concurrency {c}")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        pred = predicted_ratios(summary, sorted({p["prompt_len"] for p in sweep}))
        if pred:
            ax.plot(list(pred), list(pred.values()), "k--", lw=1.2,
                    label="cost model (harp_vllm.pruning.costs)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("pruned / dense total tokens/s")
        ax.set_title("Throughput ratio vs prompt length")
        ax.legend()
        fig.tight_layout()
        written["throughput_ratio"] = out_dir / PLOTS["throughput_ratio"]
        fig.savefig(written["throughput_ratio"], dpi=110)
        plt.close(fig)

    if sweep:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = False
        for i, c in enumerate(concs):
            # a marker per side too: with one prompt length the line styles do not show
            for side, ls, mk in (("dense", "-", "o"), ("pruned", "--", "s")):
                xs, ys, err = series(c, lambda p, s=side: (p.get(s) or {}).get("ttft_p50_ms"))
                if xs:
                    drawn = True
                    ax.errorbar(xs, ys, yerr=err, marker=mk, ls=ls, capsize=3,
                                color=colors[i % 10], label=f"{side}, concurrency {c}")
        if drawn:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("prompt tokens")
            ax.set_ylabel("TTFT p50 (ms)")
            ax.set_title("Time to first token vs prompt length")
            ax.legend(fontsize=8)
            fig.tight_layout()
            written["ttft"] = out_dir / PLOTS["ttft"]
            fig.savefig(written["ttft"], dpi=110)
        plt.close(fig)

    cap = [p for p in summary["points"] if p["scenario"] == "capacity"]
    if cap:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, side in enumerate(SIDES):
            pts = [(p["concurrency"], p[side]) for p in cap if side in p]
            xs = [c for c, a in pts if a["total_tps"]]
            ys = [a["total_tps"]["median"] for _, a in pts if a["total_tps"]]
            ax.plot(xs, ys, marker="o", color=colors[i], label=side)
            pre = [(c, a["total_tps"]["median"]) for c, a in pts
                   if a["total_tps"] and (a["server"]["preemptions"] or 0) > 0]
            que = [(c, a["total_tps"]["median"]) for c, a in pts
                   if a["total_tps"] and kv_queued(a["server"])]
            if que:
                ax.scatter([c for c, _ in que], [t for _, t in que], s=140,
                           facecolors="none", edgecolors=colors[i], label=f"{side}: queued for KV")
            if pre:
                ax.scatter([c for c, _ in pre], [t for _, t in pre], s=90, marker="x",
                           color=colors[i], label=f"{side}: preemptions")
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("total tokens/s")
        ax.set_title(f"Capacity at {cap[0]['prompt_len']}-token prompts")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written["capacity"] = out_dir / PLOTS["capacity"]
        fig.savefig(written["capacity"], dpi=110)
        plt.close(fig)
    return written
