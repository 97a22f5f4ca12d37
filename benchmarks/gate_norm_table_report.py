"""Markdown table from benchmarks/gate_norm_table.sh and benchmarks/harp_table.sh outputs.

Usage: .venv/bin/python benchmarks/gate_norm_table_report.py [GN_DIR] [HARP_DIR] [VARIANTS_JSON]
(VARIANTS_JSON: benchmarks/bench_engine_variants.py output; its names are <key><K>, e.g. gn8).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

L = 30


def ppl(path: Path) -> float | None:
    return json.loads(path.read_text())["perplexity"] if path.is_file() else None


def layers(ckpt: Path) -> str:
    sec = json.loads((ckpt / "config.json").read_text())["harp_pruning"]["layers"]
    return ",".join(str(k) for k in sorted(map(int, sec)))


def main() -> None:
    gn = Path(sys.argv[1] if len(sys.argv) > 1 else "out/gn-table")
    harp = Path(sys.argv[2] if len(sys.argv) > 2 else "out/harp-table")
    speed = {}
    if len(sys.argv) > 3 and Path(sys.argv[3]).is_file():
        speed = {r["variant"]: r for r in json.loads(Path(sys.argv[3]).read_text())["table"]}
    dense = json.loads((harp / "dense.json").read_text())
    print(f"| K | method | layers | WikiText-2 test ppl ({dense['windows']} x "
          f"{dense['seq_len']}) | KV capacity ratio | prefill 4k ratio | prefill 7k ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| 0 | dense | - | {dense['perplexity']:.2f} | 1.000 | 1.000 | 1.000 |")
    for k in (4, 8, 12):
        rows = [("Gate-Norm (attention removed)", gn / f"gate-norm{k}", "gn"),
                ("HARP top-P (searched alpha)", harp / f"harp-top{k}", "harp"),
                ("hybrid: Gate-Norm layers + HARP alpha", gn / f"hybrid{k}", "hybrid"),
                ("top-P, alpha = 0 (attention removed)", harp / f"alpha0-top{k}", "alpha0")]
        same_as_top = layers(gn / f"gate-norm{k}") == layers(harp / f"harp-top{k}")
        for label, ckpt, key in rows:
            p = ppl(ckpt.with_suffix(".json"))
            if p is None and key == "hybrid" and same_as_top:
                print(f"| {k} | {label} | = HARP top-P (Gate-Norm chose the top {k} layers) "
                      f"| = | = | = | = |")
                continue
            if p is None:
                continue
            s = speed.get(f"{key}{k}", {})
            sp = [f"{s[f'prefill_{n}_ratio']:.3f}" if f"prefill_{n}_ratio" in s else "-"
                  for n in (4096, 7168)]
            kv = f"{s['kv_ratio']:.3f}" if s else f"{L / (L - k):.3f} (L/(L-K))"
            print(f"| {k} | {label} | {layers(ckpt)} | {p:.2f} | {kv} | {sp[0]} | {sp[1]} |")
        rand = [ppl(gn / f"random{k}-s{s}.json") for s in range(3)]
        rand = [r for r in rand if r is not None]
        if rand:
            sets = "; ".join(layers(gn / f"random{k}-s{s}") for s in range(len(rand)))
            spread = f" (min {min(rand):.2f}, max {max(rand):.2f})"
            print(f"| {k} | random layers, attention removed (mean of {len(rand)} seeds) | "
                  f"{sets} | {statistics.mean(rand):.2f}{spread} | {L / (L - k):.3f} (L/(L-K)) "
                  f"| as Gate-Norm | as Gate-Norm |")


if __name__ == "__main__":
    main()
