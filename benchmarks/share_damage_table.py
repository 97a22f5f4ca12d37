"""Cross-layer KV sharing as a planner candidate: per layer, the calibration KL per token (to
dense, only that layer changed) of sharing each offered target, beside the other candidates
that save the layer's whole KV cache or most of it, and the refit's relative attention-output
error. Read from the plan statistics cache that ``harp-vllm plan --share-targets K`` filled
(``$HARP_VLLM_CACHE/plan-stats``; nothing is measured here)::

    .venv/bin/python benchmarks/share_damage_table.py [STATS.pt] \\
        [--columns linearfull,drop2lin,win2048]

Without STATS.pt: the cached file of WikiText-2 validation calibration with the most sharing
candidates scored (ties: the newest). Prints a markdown table, then per layer which target
the damage prefers and how often the nearest one wins.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from harp_vllm.paths import cache_dir
from harp_vllm.pruning.planner.statistics import share_key

CALIBRATION = {"dataset": "wikitext2", "split": "validation"}


def shares_scored(raw: dict) -> int:
    return sum(name.startswith("share") for per in (raw.get("damage") or {}).values()
               for name in per)


def find_stats() -> Path:
    folder = cache_dir() / "plan-stats"
    best: tuple[int, float, Path] | None = None
    for path in folder.glob("*.pt"):
        if path.name.startswith("windows-"):
            continue
        raw = torch.load(path, weights_only=False)
        if raw.get("settings", {}).get("calibration") != CALIBRATION:
            continue
        n = shares_scored(raw)
        if n and (best is None or (n, path.stat().st_mtime) > best[:2]):
            best = (n, path.stat().st_mtime, path)
    if best is None:
        raise SystemExit(f"no cached statistics in {folder} score a sharing candidate (run "
                         "harp-vllm plan smollm2-135m --kv-saving 0.5 --share-targets 2 ...)")
    return best[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stats", nargs="?", type=Path)
    ap.add_argument("--columns", default="linearfull,drop2lin,win2048")
    args = ap.parse_args(argv)
    path = args.stats or find_stats()
    raw = torch.load(path, weights_only=False)
    damage: dict[int, dict[str, float]] = raw["damage"]
    fits = raw["extra"].get("share_fits", {})
    columns = [c for c in args.columns.split(",") if c]
    depth = max((j - int(n[5:]) for j, per in damage.items() for n in per
                 if n.startswith("share")), default=0)
    print(f"statistics: {path}  (held-out damage maps: "
          f"{raw['settings'].get('damage_maps') == 'held-out'})\n")
    head = [f"share j-{d}" for d in range(1, depth + 1)]
    print("| layer | " + " | ".join(head + columns + ["output error j-1 (shared / q / q+o)"])
          + " |")
    print("| --- " * (1 + len(head) + len(columns) + 1) + "|")
    nearest_wins, compared = 0, 0
    for j in sorted(damage):
        per = damage[j]
        cells = [f"{per[f'share{j - d}']:.4f}" if f"share{j - d}" in per else ""
                 for d in range(1, depth + 1)]
        cells += [f"{per[c]:.4f}" if c in per else "" for c in columns]
        err = fits.get(share_key(j, j - 1), {}).get("output_error", {})
        cells.append(" / ".join(f"{err[k]:.2f}" for k in ("shared", "q", "q+o") if k in err))
        if not any(cells[:depth]):
            continue
        offered = {d: per[f"share{j - d}"] for d in range(1, depth + 1)
                   if f"share{j - d}" in per}
        if len(offered) > 1:
            compared += 1
            nearest_wins += min(offered, key=offered.__getitem__) == 1
        print(f"| {j} | " + " | ".join(cells) + " |")
    print(f"\nthe nearest target (j-1) has the lower damage in {nearest_wins} of {compared} "
          f"layers offered two or more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
