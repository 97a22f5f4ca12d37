"""Section 9's "What each choice does (P = 8)" table of docs/results.md: variants of the linear
fit at P = 8 (rank, calibration, fitting order, KL refinement, layer selection), WikiText-2
test perplexity on 8 x 2048.

Every row is a ``benchmarks/linear_table.sh`` row (its prune command and its ``eval ppl``),
built here with ``ROWS=...`` when its outputs are missing; the layers and the refinement's
time are read from the checkpoint and the prune report. Resumable; ``--only`` limits which
rows are built (the others print only if their runs exist)::

    .venv/bin/python benchmarks/linear_choices_table.py [OUT]        # default out/linear-table
    .venv/bin/python benchmarks/linear_choices_table.py OUT --only lin8-top,lin8-top-full
    .venv/bin/python benchmarks/linear_choices_table.py OUT --no-run  # print only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = [  # (linear_table.sh row, label; {layers}: the checkpoint's replaced layers)
    ("lin8-top", "top 8 layers ({layers}), rank 192, normed, dense order"),
    ("lin8-top-full", "top 8, full rank, dense order"),
    ("lin8-top-full-c2048", "top 8, full rank, 8 x 2048 calibration instead of 64 x 256"),
    ("lin8-top-full-res", "top 8, full rank, residual-target order"),
    ("lin8-top-res", "top 8, rank 192, residual-target order"),
    ("lin8-top-full-refine", "top 8, full rank, + 100 steps of KL refinement ({refine})"),
    ("lin8-full-d32", "damage-selected {{{layers}}} (full-rank damage, 32 windows), full rank, "
                      "dense"),
    ("lin8-full-d32-seq", "damage-selected {{{layers}}} (the same, 32 windows), full rank, "
                          "sequential order"),
    ("lin8", "damage-selected on 16 windows (rank 192), rank 192, normed, dense"),
    ("lin8-timed", "**default: damage-selected on 8 windows, rank 192, normed, dense**"),
]


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def layers(out: Path, name: str) -> str:
    """The replaced layers as ranges (22-29, 6-8,15)."""
    cfg = load(out / name / "config.json") or {}
    got = sorted(int(k) for k in ((cfg.get("harp_pruning") or {}).get("maps") or {}))
    parts: list[list[int]] = []
    for j in got:
        if parts and j == parts[-1][-1] + 1:
            parts[-1].append(j)
        else:
            parts.append([j])
    return ",".join(f"{p[0]}-{p[-1]}" if len(p) > 2 else ",".join(map(str, p)) for p in parts)


def refine(out: Path, name: str) -> str:
    r = ((load(out / f"{name}.prune.json") or {}).get("calibration") or {}).get("refine") or {}
    if not r:
        return "not run"
    mantissa, exponent = f"{r['lr']:e}".split("e")
    return f"lr {float(mantissa):g}e{int(exponent)}, {r['seconds']:.0f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, nargs="?", default=Path("out/linear-table"))
    ap.add_argument("--only", help="comma-separated rows to build (default: every row)")
    ap.add_argument("--no-run", action="store_true", help="print from the runs only")
    args = ap.parse_args()
    names = [n for n, _ in ROWS]
    want = args.only.split(",") if args.only else names
    if unknown := set(want) - set(names):
        raise SystemExit(f"unknown rows {sorted(unknown)}; rows: {', '.join(names)}")
    todo = [n for n in want if not (args.out / f"{n}.json").is_file()]
    if todo and not args.no_run:
        subprocess.run(["bash", str(ROOT / "benchmarks" / "linear_table.sh"), str(args.out)],
                       env={**os.environ, "ROWS": " ".join(todo)}, check=True)
    print("| choice | ppl (8 x 2048) |")
    print("|---|---|")
    for name, label in ROWS:
        res = load(args.out / f"{name}.json")
        if res is None:
            continue
        text = label.format(layers=layers(args.out, name), refine=refine(args.out, name))
        ppl = f"{res['perplexity']:.2f}"
        print(f"| {text} | {f'**{ppl}**' if text.startswith('**') else ppl} |")


if __name__ == "__main__":
    main()
