"""SmolLM2 HARP P=8 at pipeline parallel 2 vs 1 in vLLM's engine on this CPU (issue 15).

Each variant is one engine run in its own process (bench_vllm_engine's worker: KV-cache
capacity, single-prompt prefill throughput, decode throughput of concurrent requests), the
variants alternating for ``--rounds`` rounds; medians. Variants (threads as set per run):

* ``pp1-bind01``: one rank, ``VLLM_CPU_OMP_THREADS_BIND=0-1`` (both cores, two threads);
* ``pp1-auto``: one rank, ``auto`` (vLLM keeps a core for the engine loop: one thread);
* ``pp2``: ``--pipeline-parallel-size 2`` (mp executor), ``0|1`` (one core per stage),
  vLLM's default split by layer count (15 + 15 layers);
* ``pp2-balanced``: the same with ``VLLM_PP_LAYER_PARTITION=11,19``: 11 attention layers per
  stage (stage 1 also holds the 8 pruned layers).

    flock /tmp/harp-heavy.lock .venv/bin/python benchmarks/bench_parallel.py --out out/pp.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vllm_engine import engine_env, ensure_models, run_engine  # noqa: E402

VARIANTS = {
    "pp1-bind01": ({}, {"VLLM_CPU_OMP_THREADS_BIND": "0-1"}),
    "pp1-auto": ({}, {"VLLM_CPU_OMP_THREADS_BIND": "auto"}),
    "pp2": ({"pipeline_parallel_size": 2, "distributed_executor_backend": "mp"},
            {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}),
    "pp2-balanced": ({"pipeline_parallel_size": 2, "distributed_executor_backend": "mp"},
                     {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_PP_LAYER_PARTITION": "11,19"}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prefill", default="4096", help="prompt lengths (tokens)")
    ap.add_argument("--decode-requests", type=int, default=16)
    ap.add_argument("--decode-prompt", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--kv-space", default="2", help="VLLM_CPU_KVCACHE_SPACE in GiB (per rank)")
    ap.add_argument("--out", type=Path, default=Path("out/bench_parallel.json"))
    args = ap.parse_args()
    names = args.variants.split(",")
    _, pruned = ensure_models(None)
    lens = [int(x) for x in args.prefill.split(",")]
    work = args.out.with_suffix(".runs")
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            kwargs, env_extra = VARIANTS[name]
            cfg = dict(rounds=1, prefill=lens, decode_requests=args.decode_requests,
                       decode_prompt=args.decode_prompt, decode_tokens=args.decode_tokens,
                       engine_kwargs=kwargs)
            env = engine_env(args.kv_space)
            env.pop("VLLM_PP_LAYER_PARTITION", None)
            env.update(env_extra)
            print(f"round {r + 1}/{args.rounds}: {name} ...", flush=True)
            runs[name].append(run_engine(pruned, cfg, work / f"{name}-{r}.json", env))

    def med(name: str, get) -> float:
        return statistics.median(get(x) for x in runs[name])

    print(f"\nSmolLM2-135M HARP P=8 (fixed alphas) fp32, enforce_eager, "
          f"VLLM_CPU_KVCACHE_SPACE={args.kv_space} GiB per rank, median of {args.rounds}")
    head = " ".join(f"{f'prefill {n}':>13s}" for n in lens)
    print(f"{'variant':14s} {'KV tokens':>10s} {head} {'decode tok/s':>13s} {'start s':>8s}")
    table = []
    for name in names:
        row = {"variant": name, "engine_kwargs": VARIANTS[name][0], "env": VARIANTS[name][1],
               "kv_cache_tokens": med(name, lambda x: x["kv_cache_tokens"]),
               "decode_tok_s": med(name, lambda x: x["decode_tok_s"]),
               "startup_s": med(name, lambda x: x["startup_s"])}
        for n in lens:
            row[f"prefill_{n}_tok_s"] = med(name, lambda x, n=n: x["prefill_tok_s"][str(n)])
        table.append(row)
        cells = " ".join(f"{row[f'prefill_{n}_tok_s']:13.1f}" for n in lens)
        print(f"{name:14s} {row['kv_cache_tokens']:10,.0f} {cells} {row['decode_tok_s']:13.1f} "
              f"{row['startup_s']:8.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                    "model": str(pruned), "table": table, "runs": runs},
                                   indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
