"""Per-request timeline of an A/B load test (``harp_vllm.loadtest``'s results.json): one panel
per side, one bar per request, from its start to its first token (queued and prefilled) and on
to its last token (decoding). Shows how many requests each server admitted at once and where
the time went, which a single throughput ratio hides.

    .venv/bin/python benchmarks/ab_timeline_plot.py out/ab-gemma-32k/results.json \
        docs/gemma/ab-32k-timeline.png [--prompt-len 32640]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def timelines(results: dict, prompt_len: int | None) -> dict[str, list[tuple[float, float, float]]]:
    """Per side, (start, first token, end) in seconds from the side's first request, for the
    sweep runs at ``prompt_len`` (every length when None)."""
    out: dict[str, list[tuple[float, float, float]]] = {}
    for run in results["runs"]:
        if run.get("scenario") != "sweep" or (prompt_len and run["prompt_len"] != prompt_len):
            continue
        reqs = [q for q in run["requests"] if q.get("ok")]
        if not reqs:
            continue
        t0 = min(q["start_time"] for q in reqs)
        out.setdefault(run["endpoint"], []).extend(
            (q["start_time"] - t0, q["start_time"] - t0 + q["ttft"],
             q["start_time"] - t0 + q["latency"]) for q in reqs)
    if not out:
        raise SystemExit(f"no ok sweep requests{f' at {prompt_len} tokens' if prompt_len else ''}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--prompt-len", type=int, default=None)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(args.results.read_text())
    lines = timelines(res, args.prompt_len)
    sides = [s for s in ("dense", "pruned") if s in lines]
    names = {s: res["endpoints"][s].get("model", s) for s in sides}
    end = max(e for s in sides for _, _, e in lines[s])
    fig, grid = plt.subplots(len(sides), 1, figsize=(8, 1.2 + 0.35 * sum(map(len, lines.values()))),
                             sharex=True, squeeze=False)
    axes = grid[:, 0]
    for ax, side in zip(axes, sides, strict=True):
        for i, (s, f, e) in enumerate(sorted(lines[side])):
            ax.barh(i, f - s, left=s, color="#c6dbef", edgecolor="#6baed6")
            ax.barh(i, e - f, left=f, color="#08519c")
        done = max(e for _, _, e in lines[side])
        ax.set_title(f"{side} ({names[side]}): {len(lines[side])} requests in {done:.0f} s",
                     fontsize=10)
        ax.set_ylabel("request")
        ax.set_xlim(0, end * 1.02)
        ax.invert_yaxis()
    axes[-1].set_xlabel(
        "seconds from the first request (light: queued + prefill; dark: decode)")
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
