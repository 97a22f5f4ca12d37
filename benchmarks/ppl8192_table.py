"""Section 9's "Perplexity at SmolLM2's full context (8192)" table of docs/results.md: dense and
the three P = 8 checkpoints of the linear table (the default linear maps, FLAP's 24 groups,
HARP top-8), WikiText-2 test on the first 2 windows of 8192 tokens beside their 8 x 2048
perplexity.

The checkpoints and their 8 x 2048 runs are ``benchmarks/linear_table.sh``'s rows (built here
with ``ROWS="lin8-timed flap8 harp8"`` when missing); each 8192 run is one
``harp-vllm eval ppl --seq-len 8192 --max-windows 2`` into ``OUT/NAME.8192.json``. Resumable;
prints the table from the JSONs::

    .venv/bin/python benchmarks/ppl8192_table.py [OUT]           # default out/linear-table
    .venv/bin/python benchmarks/ppl8192_table.py OUT --no-run     # print only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = [  # (linear_table.sh row, label)
    ("dense", "dense"),
    ("lin8-timed", "**linear P=8 (default)**"),
    ("flap8", "FLAP, 24 groups"),
    ("harp8", "HARP top-8"),
]


def load(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"missing {path}: run without --no-run")
    return json.loads(path.read_text())


def measure(out: Path, seq_len: int, windows: int) -> None:
    names = [n for n, _ in ROWS if n != "dense"]
    if not all((out / n / "config.json").is_file() and (out / f"{n}.json").is_file()
               for n in names) or not (out / "dense.json").is_file():
        env = {**os.environ, "ROWS": " ".join(names)}
        subprocess.run(["bash", str(ROOT / "benchmarks" / "linear_table.sh"), str(out)],
                       env=env, check=True)
    for name, _ in ROWS:
        path = out / f"{name}.{seq_len}.json"
        if path.is_file():
            continue
        model = "smollm2-135m" if name == "dense" else str(out / name)
        cmd = [sys.executable, "-m", "harp_vllm.cli", "eval", "ppl", "--model", model,
               "--seq-len", str(seq_len), "--max-windows", str(windows), "--out", str(path)]
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, nargs="?", default=Path("out/linear-table"))
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--no-run", action="store_true", help="print from the JSONs only")
    args = ap.parse_args()
    if not args.no_run:
        measure(args.out, args.seq_len, args.windows)
    long = {n: load(args.out / f"{n}.{args.seq_len}.json") for n, _ in ROWS}
    short = {n: load(args.out / f"{n}.json") for n, _ in ROWS}
    dense = long["dense"]["perplexity"]
    w = {r["windows"] for r in long.values()}
    s = {(r["windows"], r["seq_len"]) for r in short.values()}
    if len(w) != 1 or len(s) != 1:
        raise SystemExit(f"the runs differ in windows: {w} / {s}")
    (sw, sl), = s
    print(f"| model | ppl ({w.pop()} x {args.seq_len}) | x dense | ppl ({sw} x {sl}) |")
    print("|---|---|---|---|")
    for name, label in ROWS:
        ppl = long[name]["perplexity"]
        bold = "**" if label.startswith("**") else ""
        print(f"| {label} | {bold}{ppl:.2f}{bold} | {ppl / dense:.2f} | "
              f"{short[name]['perplexity']:.2f} |")


if __name__ == "__main__":
    main()
