"""The engine benchmark's prefill ratios beside a prediction calibrated on the dense model's
own timings (issue 25): the cost model prices every multiply-add the same; here the dense
model's seconds per prompt token at two or more lengths (one run's alternating rounds,
median per length) are fitted as ``a * weight MACs + b * attention MACs`` (least squares;
weight MACs per token do not change with the length, the attention core's grow with it),
and the pruned checkpoint's time is predicted with the same ``a`` and ``b``. The pruned
model's timings never enter the fit.

    .venv/bin/python benchmarks/prefill_cost_fit.py out/bench-gemma-s46.json
    # or figures read off a table: dense prefill tok/s per length, pruned tok/s per length
    .venv/bin/python benchmarks/prefill_cost_fit.py --pruned out/gemma-plan30s \\
        --dense-tok-s 8192=790.9,16384=683.2,32704=530.9 \\
        --pruned-tok-s 8192=836.8,16384=755.4,32704=622.9
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from harp_vllm.pruning import costs


def split_macs(cfg, shapes, n: int) -> tuple[float, float]:
    """(weight and LM-head MACs, attention-core MACs) per prompt token of an ``n``-token
    prefill."""
    total = costs.model_macs(cfg, shapes, n, "prefill")
    attention = sum(costs.attention_core_macs(cfg, s, n) for s in shapes)
    return total - attention, attention


def parse_pairs(text: str) -> dict[int, float]:
    return {int(k): float(v) for k, v in (p.split("=") for p in text.split(",") if p)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench", nargs="?", type=Path, help="bench_vllm_engine.py's JSON")
    ap.add_argument("--pruned", type=Path, help="the pruned checkpoint (default: the JSON's)")
    ap.add_argument("--dense-tok-s", help="length=tok/s,... (instead of a JSON)")
    ap.add_argument("--pruned-tok-s", help="length=tok/s,... (instead of a JSON)")
    args = ap.parse_args()
    if args.bench is not None:
        data = json.loads(args.bench.read_text())
        lengths = [int(n) for n in data["config"]["prefill"]]
        dense = {n: statistics.median(r["prefill_tok_s"][str(n)] for r in data["runs"]["dense"])
                 for n in lengths}
        pruned = {n: statistics.median(r["prefill_tok_s"][str(n)]
                                       for r in data["runs"]["pruned"]) for n in lengths}
        path = args.pruned or Path(data["pruned_model"])
    else:
        if not (args.pruned and args.dense_tok_s and args.pruned_tok_s):
            ap.error("give a bench JSON, or --pruned with --dense-tok-s and --pruned-tok-s")
        dense, pruned, path = parse_pairs(args.dense_tok_s), parse_pairs(args.pruned_tok_s), \
            args.pruned
        lengths = sorted(dense)
    if len(lengths) < 2:
        ap.error("the fit needs dense prefill timings at two or more lengths")
    found = costs.checkpoint_shapes(path)
    if found is None:
        ap.error(f"{path} is not a pruned checkpoint")
    cfg, shapes = found
    base = costs.dense_shapes(cfg)
    x = np.array([split_macs(cfg, base, n) for n in lengths])
    y = np.array([1.0 / dense[n] for n in lengths])
    (a, b), *_ = np.linalg.lstsq(x, y, rcond=None)
    print(f"dense fit: {a * 1e12:.3f} ps per weight MAC, {b * 1e12:.3f} ps per attention MAC "
          f"(attention / weight {b / a:.3f}); residual per length "
          + ", ".join(f"{n}: {(x[i] @ (a, b)) / y[i] - 1:+.1%}" for i, n in enumerate(lengths)))
    print(f"{'prompt':>7s} {'measured':>9s} {'MAC pred':>9s} {'meas/MAC':>9s} {'timed pred':>10s} "
          f"{'meas/timed':>10s}")
    for n in lengths:
        d, p = np.array(split_macs(cfg, base, n)), np.array(split_macs(cfg, shapes, n))
        mac = d.sum() / p.sum()
        timed = (d @ (a, b)) / (p @ (a, b))
        meas = pruned[n] / dense[n]
        print(f"{n:7d} {meas:9.3f} {mac:9.3f} {meas / mac:9.1%} {timed:10.3f} {meas / timed:10.1%}")


if __name__ == "__main__":
    main()
