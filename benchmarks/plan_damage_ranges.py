"""Section 12's per-layer damage table of docs/results.md: per group of layers, the range of the
calibration KL per token (to dense, only that layer changed) of each candidate, read from the
plan statistics cache that ``harp-vllm plan --windows 512,1024,2048`` filled
(``$HARP_VLLM_CACHE/plan-stats``; nothing is measured here)::

    .venv/bin/python benchmarks/plan_damage_ranges.py [STATS.pt] \\
        [--groups 0-2,3-11,12-29] [--columns drop1lin,linearfull,win512,win1024,win2048]

Without STATS.pt: the one cached file of WikiText-2 validation calibration whose damage has
every column (the statistics of section 12's plans); several such files are an error naming
them. Values have two significant digits; a range whose ends print alike is one value.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from harp_vllm.paths import cache_dir

CALIBRATION = {"dataset": "wikitext2", "split": "validation"}


def layer_groups(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.append((int(a), int(b or a)))
    return out


def find_stats(columns: list[str]) -> Path:
    folder = cache_dir() / "plan-stats"
    found = []
    for path in sorted(folder.glob("*.pt")):
        raw = torch.load(path, weights_only=False)
        damage = raw.get("damage") or {}
        if raw.get("settings", {}).get("calibration") == CALIBRATION and damage and all(
                c in per for per in damage.values() for c in columns):
            found.append(path)
    if len(found) != 1:
        raise SystemExit(f"{len(found)} cached statistics in {folder} have WikiText-2 "
                         f"validation damage for {', '.join(columns)}: "
                         f"{[p.name for p in found]}; name one (or run harp-vllm plan "
                         "smollm2-135m --kv-saving 0.27 --windows 512,1024,2048)")
    return found[0]


def sig2(x: float) -> str:
    """``x`` with two significant digits, as a plain decimal."""
    if x == 0:
        return "0"
    text = f"{float(f'{x:.2g}'):.10f}".rstrip("0")
    return text.rstrip(".")


def span(values: list[float]) -> str:
    lo, hi = sig2(min(values)), sig2(max(values))
    return lo if lo == hi else f"{lo}-{hi}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stats", type=Path, nargs="?")
    ap.add_argument("--groups", default="0-2,3-11,12-29")
    ap.add_argument("--columns", default="drop1lin,linearfull,win512,win1024,win2048")
    args = ap.parse_args()
    columns = args.columns.split(",")
    path = args.stats or find_stats(columns)
    raw = torch.load(path, weights_only=False)
    damage = raw["damage"]
    s = raw["settings"]
    long = [json.loads(k) for k in (raw.get("extra") or {}).get("long_damage", {})]
    print(f"{path.name}: {s['damage_windows']} x {s['fit_seq_len']} windows, "
          f"{s['positions']} positions; long windows {long}", file=sys.stderr)
    print("| layers | " + " | ".join(columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for a, b in layer_groups(args.groups):
        cells = [span([damage[j][c] for j in range(a, b + 1)]) for c in columns]
        print(f"| {a}-{b} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
