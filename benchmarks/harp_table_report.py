"""Markdown table from the JSON files that benchmarks/harp_table.sh writes.

Usage: .venv/bin/python benchmarks/harp_table_report.py [OUT_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VARIANTS = [
    ("harp-top", "HARP, top {P} layers, searched alpha"),
    ("alpha1-top", "top {P} layers, alpha = 1 (no rescaling)"),
    ("alpha0-top", "top {P} layers, alpha = 0 (attention sublayer dropped)"),
    ("harp-bottom", "HARP, lowest {P} layers (1..{P}), searched alpha"),
]


def alphas(out: Path, name: str) -> str:
    cfg = json.loads((out / name / "config.json").read_text())["harp_pruning"]
    if "fixed_alpha" in cfg["calibration"]:
        return "-"
    return " ".join(f"{k}:{v:g}" for k, v in sorted(cfg["layers"].items(),
                                                      key=lambda kv: -int(kv[0])))


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/harp-table")
    dense = json.loads((out / "dense.json").read_text())
    print(f"| variant | P | WikiText-2 test ppl ({dense['windows']} x {dense['seq_len']}) "
          "| vs dense | alphas (layer:alpha, top first) |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| dense | 0 | {dense['perplexity']:.3f} | 1.000 | - |")
    for p in (4, 8, 12):
        for key, label in VARIANTS:
            f = out / f"{key}{p}.json"
            if not f.is_file():
                continue
            r = json.loads(f.read_text())
            print(f"| {label.format(P=p)} | {p} | {r['perplexity']:.3f} | "
                  f"{r['perplexity'] / dense['perplexity']:.3f} | {alphas(out, key + str(p))} |")


if __name__ == "__main__":
    main()
