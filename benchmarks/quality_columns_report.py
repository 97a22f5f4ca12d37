"""A quality report (``harp-vllm eval quality``'s ``quality.json``) transposed: one column per
model, one row per measurement, absolute values (docs/results.md section 12)::

    .venv/bin/python benchmarks/quality_columns_report.py out/quality-quick/quality.json \\
        [--models smollm2-135m,smollm2-wplan27]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DOMAINS = ("wikitext", "python", "boolq", "gsm8k")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path)
    ap.add_argument("--models", help="labels to show, comma-separated (default: all)")
    args = ap.parse_args()
    if not args.report.is_file():
        raise SystemExit(f"missing {args.report}: make it with harp-vllm eval quality")
    rows = json.loads(args.report.read_text())["models"]
    if args.models:
        by_label = {r["label"]: r for r in rows}
        wanted = args.models.split(",")
        if missing := [m for m in wanted if m not in by_label]:
            raise SystemExit(f"{args.report} has no model {missing}; it has {list(by_label)}")
        rows = [by_label[m] for m in wanted]

    def col(r: dict) -> list[str]:
        ppl = r["perplexity"]
        wiki = [b["value"] for b in r["positions"]["wikitext"]]
        lam, arc = r["tasks"]["lambada_openai"], r["tasks"]["arc_easy"]
        return [" / ".join(f"{ppl[d]['value']:.2f}" for d in DOMAINS),
                " / ".join(f"{v:.2f}" for v in wiki),
                f"{100 * lam['acc']['value']:.1f} / {lam['perplexity']['value']:.1f}",
                f"{100 * arc['acc']['value']:.1f}",
                " / ".join(f"{100 * v['value']:.0f}" for v in r["passkey"].values())]

    ref = rows[0]
    buckets = " / ".join(f"{b['start']}-{b['end']}" for b in ref["positions"]["wikitext"])
    labels = [f"ppl {' / '.join(DOMAINS)}", f"ppl wikitext by position {buckets}",
              f"LAMBADA acc ({ref['tasks']['lambada_openai']['n']:,} items) / ppl",
              f"ARC-Easy acc ({ref['tasks']['arc_easy']['n']})",
              f"passkey {' / '.join(ref['passkey'])} "
              f"({next(iter(ref['passkey'].values()))['n']} trials each)"]
    cols = [col(r) for r in rows]
    print("| | " + " | ".join(r["label"] for r in rows) + " |")
    print("| --- " * (len(rows) + 1) + "|")
    for i, label in enumerate(labels):
        print(f"| {label} | " + " | ".join(c[i] for c in cols) + " |")


if __name__ == "__main__":
    main()
