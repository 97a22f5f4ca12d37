"""Prefill throughput of several pruned checkpoints against dense SmolLM2 in vLLM's engine.

One engine run per checkpoint and pass (each in its own process, the real multi-process
engine, same VLLM_CPU_KVCACHE_SPACE); dense runs first and last so drift shows; every row is
the median of its runs (``--repeats N`` passes, alternating dense and variants). Prints
KV-cache tokens, single-prompt prefill throughput and (``--decode-requests N``) decode
throughput of N concurrent requests at ``--decode-prompt`` tokens of context (prefix caching on:
the prompts are prefilled once, then decode time = a full run minus a 1-token run, both with
the prompts in the cache, so the long prefill does not drown the decode time), with ratios
to dense beside the cost model's predicted ratio (``harp_vllm.pruning.costs``), and writes
JSON. Used for the Gate-Norm / HARP / hybrid table, the head-level table and the plan's engine check
(docs/results.md):

    .venv/bin/python benchmarks/bench_engine_variants.py --out out/variants.json \\
        gn8=out/gn-table/gate-norm8 harp8=out/harp-table/harp-top8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vllm_engine import engine_env, run_engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+", help="NAME=CHECKPOINT_DIR")
    ap.add_argument("--prefill", default="4096,7168", help="prompt lengths (tokens)")
    ap.add_argument("--kv-space", default="2", help="VLLM_CPU_KVCACHE_SPACE in GiB (all)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="passes over dense + variants (then dense once more); medians")
    ap.add_argument("--decode-requests", type=int, default=0,
                    help="concurrent requests of the decode test (0: no decode test)")
    ap.add_argument("--decode-prompt", type=int, default=4096, help="their prompt length")
    ap.add_argument("--decode-tokens", type=int, default=32, help="tokens each generates")
    ap.add_argument("--out", type=Path, default=Path("out/bench_engine_variants.json"))
    args = ap.parse_args()
    from harp_vllm import models

    variants = dict(v.split("=", 1) for v in args.variants)
    for name, path in variants.items():
        if not (Path(path) / "config.json").is_file():
            raise SystemExit(f"{name}: no checkpoint at {path}")
    dense = str(models.prepare("smollm2-135m", progress=False))
    lens = [int(x) for x in args.prefill.split(",")]
    cfg = dict(rounds=1, prefill=lens, decode_requests=args.decode_requests,
               decode_prompt=args.decode_prompt if args.decode_requests else 1,
               decode_tokens=args.decode_tokens if args.decode_requests else 1,
               decode_cached=bool(args.decode_requests))
    decode_ctx = args.decode_prompt + args.decode_tokens // 2
    env = engine_env(args.kv_space)
    work = args.out.with_suffix(".runs")
    work.mkdir(parents=True, exist_ok=True)
    order = [("dense", dense), *variants.items()] * max(1, args.repeats) + [("dense", dense)]
    runs: dict[str, list[dict]] = {}
    for i, (name, path) in enumerate(order):
        print(f"[{i + 1}/{len(order)}] {name} ...", flush=True)
        runs.setdefault(name, []).append(run_engine(Path(path), cfg, work / f"{i}-{name}.json",
                                                    env))

    def med(name: str, key) -> float:
        return statistics.median(key(r) for r in runs[name])

    kv = lambda r: r["kv_cache_tokens"]  # noqa: E731
    pre = {n: (lambda r, n=n: r["prefill_tok_s"][str(n)]) for n in lens}
    bind = env.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    print(f"\nVLLM_CPU_KVCACHE_SPACE={args.kv_space} GiB, VLLM_CPU_OMP_THREADS_BIND={bind}, "
          f"dense = median of {len(runs['dense'])} runs")
    head = " ".join(f"{f'{n} tok/s':>12s} {'ratio':>6s} {'pred':>6s}" for n in lens)
    if args.decode_requests:
        head += f" {'decode tok/s':>12s} {'ratio':>6s} {'pred':>6s}"
    print(f"{'variant':12s} {'KV tokens':>10s} {'ratio':>6s} {head}")
    table = []
    path_of = lambda name: dense if name == "dense" else variants[name]  # noqa: E731
    for name in ["dense", *variants]:
        row = {"variant": name, "kv_cache_tokens": med(name, kv),
               "kv_ratio": med(name, kv) / med("dense", kv)}
        cells = []
        for n in lens:
            v = med(name, pre[n])
            row[f"prefill_{n}_tok_s"] = v
            row[f"prefill_{n}_ratio"] = v / med("dense", pre[n])
            row[f"prefill_{n}_predicted"] = predicted(path_of(name), n, "prefill")
            cells.append(f"{v:12.1f} {row[f'prefill_{n}_ratio']:6.3f} "
                         f"{row[f'prefill_{n}_predicted']:6.3f}")
        if args.decode_requests:
            v = med(name, lambda r: r["decode_tok_s"])
            row["decode_tok_s"] = v
            row["decode_ratio"] = v / med("dense", lambda r: r["decode_tok_s"])
            row["decode_predicted"] = predicted(path_of(name), decode_ctx, "decode")
            cells.append(f"{v:12.1f} {row['decode_ratio']:6.3f} {row['decode_predicted']:6.3f}")
        table.append(row)
        print(f"{name:12s} {row['kv_cache_tokens']:10,.0f} {row['kv_ratio']:6.3f} "
              + " ".join(cells))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"kv_space_gib": args.kv_space, "threads_bind": bind,
                                    "decode": {"requests": args.decode_requests,
                                               "prompt": args.decode_prompt,
                                               "tokens": args.decode_tokens},
                                    "variants": variants, "table": table, "runs": runs},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")


def predicted(path: str, context: int, phase: str) -> float:
    """The cost model's speed-up of the checkpoint at ``path`` over its dense model."""
    from harp_vllm.pruning import costs

    found = costs.checkpoint_shapes(path)
    if found is None:
        raise SystemExit(f"no checkpoint at {path}")
    return costs.predicted_speedup(*found, context, phase)


if __name__ == "__main__":
    main()
