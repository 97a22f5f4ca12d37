"""Capacity-bound HTTP A/B runs side by side: request throughput ratio against the KV-capacity
ratio, per run (issue 25's line: at least 90% of the capacity ratio, no failed request).

Each run is a ``harp_vllm.loadtest`` ``results.json`` (one prompt length, one repeat) and the
KV-capacity ratio of its two servers (the engine's pool ratio, or the cost model's served
ratio). Prints a markdown table (requests ok / failed, requests per minute, the throughput
ratio and its share of the capacity ratio, the output tokens' share of all tokens, peak
running) and, with ``--plot``, a bar chart of the shares with the 90% line.

    .venv/bin/python benchmarks/capacity_ab_summary.py \\
        "Gemma 32k, 64 out=out/ab-gemma-32k/results.json@1.4485" \\
        "Gemma 32k, 4,032 out=out/ab-gemma-32k-decode/results.json@1.4485" \\
        --plot docs/gemma/ab-capacity-share.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def side_stats(run: dict) -> dict:
    """The harness's own stats of the run (``vllm_bench.summarize_requests``: requests ok /
    failed, request rate over the run's duration, tokens) and its peak running sequences."""
    st = run["stats"]
    return {"ok": st["ok"], "failed": st["failed"], "req_per_min": 60.0 * st["request_rate"],
            "prompt_tokens": st["prompt_tokens"], "output_tokens": st["output_tokens"],
            "peak_running": (run.get("server") or {}).get("running_peak")}


def summarize(path: Path, capacity_ratio: float) -> dict:
    res = json.loads(path.read_text())
    sides = {r["endpoint"]: side_stats(r) for r in res["runs"] if r.get("stats")}
    if set(sides) != {"dense", "pruned"}:
        raise SystemExit(f"{path}: need one dense and one pruned run, got {sorted(sides)}")
    d, p = sides["dense"], sides["pruned"]
    ratio = p["req_per_min"] / d["req_per_min"]
    return {"dense": d, "pruned": p, "ratio": ratio, "capacity_ratio": capacity_ratio,
            "share": ratio / capacity_ratio,
            "output_share": d["output_tokens"] / (d["output_tokens"] + d["prompt_tokens"])}


def parse_spec(spec: str) -> tuple[str, Path, float]:
    try:
        label, rest = spec.split("=", 1)
        path, cap = rest.rsplit("@", 1)
        return label, Path(path), float(cap)
    except ValueError:
        raise SystemExit(f"expected LABEL=RESULTS.json@CAPACITY_RATIO, got {spec!r}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=RESULTS.json@CAPACITY_RATIO")
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    rows = [(label, summarize(path, cap)) for label, path, cap in map(parse_spec, args.runs)]
    print("| run | dense ok / failed, req/min | pruned ok / failed, req/min | peak running "
          "(dense / pruned) | output share of tokens | request throughput ratio | KV-capacity "
          "ratio | share |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for label, s in rows:
        d, p = s["dense"], s["pruned"]
        print(f"| {label} | {d['ok']} / {d['failed']}, {d['req_per_min']:.2f} | {p['ok']} / "
              f"{p['failed']}, {p['req_per_min']:.2f} | {d['peak_running']:.0f} / "
              f"{p['peak_running']:.0f} | {100 * s['output_share']:.1f}% | {s['ratio']:.3f} | "
              f"{s['capacity_ratio']:.4f} | **{100 * s['share']:.1f}%** |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 1.0 + 0.45 * len(rows)))
        labels = [label for label, _ in rows]
        shares = [100 * s["share"] for _, s in rows]
        ax.barh(range(len(rows)), shares, color=["#08519c" if v >= 90 else "#9ecae1"
                                                for v in shares])
        for i, v in enumerate(shares):
            ax.text(v + 0.5, i, f"{v:.0f}%", va="center", fontsize=9)
        ax.axvline(90, color="#cb181d", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(rows)), labels, fontsize=9)
        ax.invert_yaxis()
        ax.set_xlim(0, max(110, max(shares) + 8))
        ax.set_xlabel("request throughput ratio / KV-capacity ratio (%); dashed: issue 25's 90%")
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
