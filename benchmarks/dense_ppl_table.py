"""Section 1 of docs/results.md: dense SmolLM2-135M-Instruct's WikiText-2 test perplexity at
2048 tokens on the whole split, the first 16 and the first 8 windows. Runs each
``harp-vllm eval ppl`` that has no JSON in OUT yet (resumable), then prints the table from the
three JSONs (wall time: the run's own ``seconds``)::

    .venv/bin/python benchmarks/dense_ppl_table.py [OUT]        # default out/dense-ppl
    .venv/bin/python benchmarks/dense_ppl_table.py OUT --no-run  # print only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROWS = [  # (JSON name, --max-windows or None for the whole split, label)
    ("full", None, "WikiText-2 test, whole split"),
    ("w16", 16, "WikiText-2 test, first 16 windows"),
    ("w8", 8, "WikiText-2 test, first 8 windows (the baseline of the pruning tables below)"),
]


def measure(out: Path, name: str, windows: int | None) -> None:
    path = out / f"{name}.json"
    if path.is_file():
        return
    cmd = [sys.executable, "-m", "harp_vllm.cli", "eval", "ppl", "--model", "smollm2-135m",
           "--seq-len", "2048", "--out", str(path)]
    if windows is not None:
        cmd += ["--max-windows", str(windows)]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, nargs="?", default=Path("out/dense-ppl"))
    ap.add_argument("--no-run", action="store_true", help="print from the JSONs only")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_run:
        for name, windows, _ in ROWS:
            measure(args.out, name, windows)
    print("| data | seq-len | windows (tokens scored) | perplexity | wall time |")
    print("| --- | --- | --- | --- | --- |")
    for name, _, label in ROWS:
        path = args.out / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"missing {path}: run without --no-run")
        r = json.loads(path.read_text())
        print(f"| {label} | {r['seq_len']} | {r['windows']} ({r['tokens_scored']:,}) | "
              f"**{r['perplexity']:.3f}** | {r['seconds']:,.0f} s |")


if __name__ == "__main__":
    main()
