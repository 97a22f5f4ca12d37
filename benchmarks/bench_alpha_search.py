"""Naive vs fast HARP alpha search on SmolLM2-135M, side by side in one run.

Prints both wall times, their ratio (naive / fast) and whether both chose the same alphas;
writes JSON. Usage:
    .venv/bin/python benchmarks/bench_alpha_search.py --layers 8 --samples 4 --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from harp_vllm import models
from harp_vllm.evaluation import data
from harp_vllm.pruning.calibration.windows import calibration_windows
from harp_vllm.pruning.methods.alpha_search import DEFAULT_GRID, fast_search, naive_search
from harp_vllm.pruning.reference import load_model
from harp_vllm.pruning.selection import select_layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("out/bench_alpha_search.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    path = models.resolve(args.model)
    tok = models.load_tokenizer(path)
    model = load_model(path)
    windows = calibration_windows(tok, data.load_text("wikitext2", "validation"), args.samples,
                                  args.seq_len)
    layers = select_layers(model.config.num_hidden_layers, count=args.layers)

    t0 = time.perf_counter()
    naive = naive_search(model, windows, layers, DEFAULT_GRID)
    t_naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = fast_search(model, windows, layers, DEFAULT_GRID)
    t_fast = time.perf_counter() - t0

    same = naive.alphas == fast.alphas
    result = {
        "model": args.model, "layers": layers, "samples": args.samples,
        "seq_len": args.seq_len, "grid": list(DEFAULT_GRID), "threads": torch.get_num_threads(),
        "naive_seconds": round(t_naive, 2), "fast_seconds": round(t_fast, 2),
        "ratio_naive_over_fast": round(t_naive / t_fast, 2), "same_alphas": same,
        "naive_alphas": {str(k): v for k, v in sorted(naive.alphas.items())},
        "fast_alphas": {str(k): v for k, v in sorted(fast.alphas.items())},
    }
    print(f"naive {t_naive:.1f} s | fast {t_fast:.1f} s | ratio {t_naive / t_fast:.2f}x | "
          f"same alphas: {same}")
    print("alphas (fast):", result["fast_alphas"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
