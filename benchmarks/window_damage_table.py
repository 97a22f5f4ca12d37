"""Per-layer damage of the window candidates (whole layer and per KV group), from the
planner's statistics cache: the text KL on the long window of each candidate alone, as the
solver priced it (``plan-stats/windows-*.pt``, written by ``harp-vllm plan --windows ...
[--group-windows ...]``). Prints a markdown table (docs/results.md section 12, "Windows per KV
group, built and served").

    python benchmarks/window_damage_table.py --layers 0,3,7,11,12,18,19,23
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from harp_vllm.paths import cache_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default=None, help="comma list (default: every layer)")
    ap.add_argument("--names", default="win512,win1024,win2048,win2048k0,win2048k1,win2048k2")
    ap.add_argument("--file", type=Path, default=None,
                    help="a windows-*.pt file (default: the newest in the cache)")
    args = ap.parse_args(argv)
    path = args.file or max((cache_dir() / "plan-stats").glob("windows-*.pt"),
                            key=lambda p: p.stat().st_mtime)
    damage = torch.load(path, weights_only=False)
    names = args.names.split(",")
    layers = (sorted(damage) if args.layers is None
              else [int(j) for j in args.layers.split(",")])
    print(f"<!-- {path} -->")
    print("| layer | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for j in layers:
        row = damage.get(j, {})
        cells = [f"{row[n]:.4f}" if n in row else "" for n in names]
        print(f"| {j} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
