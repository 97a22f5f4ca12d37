"""fp8 KV cache vs full precision, dense SmolLM2 vs HARP P=8, in vLLM's engine (issue 15).

Per model and KV-cache dtype (``auto`` = the model's fp32, ``fp8``): the engine's KV-cache
capacity in tokens at the same ``VLLM_CPU_KVCACHE_SPACE``, and the greedy tokens of the test
prompts (``PROMPTS``: the engine tests' six, 64 tokens each). The engine runs are
tests/probe.py's, started by path (nothing is imported from tests/). Reports capacity ratios and how
many greedy tokens the fp8 run shares with the same model at full precision (the common
prefix: after the first difference the continuations are different texts).

    flock /tmp/harp-heavy.lock .venv/bin/python benchmarks/bench_kv_fp8.py --out out/kv_fp8.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PROBE = Path(__file__).resolve().parents[1] / "tests" / "probe.py"

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The six prompts the measurements in docs/results.md were made on (the same text as the
# engine tests' prompts in tests/conftest.py; a benchmark imports nothing from tests/).
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "1, 1, 2, 3, 5, 8, 13,",
    "Robert Boulter is an English film, television and theatre actor. He had a guest starring "
    "role on the television series The Bill in 2000. This was followed by a starring role in "
    "the play Herons written by Simon Stephens, which was performed in 2001 at the Royal Court "
    "Theatre. He had a guest role in the television series Judge John Deed in 2002. In 2004 "
    "Boulter landed a role as Craig in the episode Teddy's Story of the television series The "
    "Long Firm; he starred alongside actors Mark Strong and Derek Jacobi.",
]


def run(model: Path, prompts: Path, out: Path, kv_dtype: str, tokens: int, kv_space: str
        ) -> dict:
    cmd = [sys.executable, str(PROBE), "--model", str(model),
           "--prompts", str(prompts), "--max-tokens", str(tokens), "--max-model-len", "2048",
           "--out", str(out)]
    if kv_dtype != "auto":
        cmd += ["--kv-cache-dtype", kv_dtype]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": kv_space, "TOKENIZERS_PARALLELISM": "false",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with out.with_suffix(".log").open("w") as log:
        subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    return json.loads(out.read_text()) if out.is_file() else {"ok": False}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--kv-space", default="2")
    ap.add_argument("--out", type=Path, default=Path("out/bench_kv_fp8.json"))
    args = ap.parse_args()
    from bench_vllm_engine import ensure_models

    from harp_vllm import models

    dense, pruned = ensure_models(None)
    tok = models.load_tokenizer(dense)
    work = args.out.with_suffix(".runs")
    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "prompts.json"
    prompts.write_text(json.dumps([tok(p)["input_ids"] for p in PROMPTS]))
    res: dict = {}
    for name, model in (("dense", dense), ("harp-p8", pruned)):
        for kv in ("auto", "fp8"):
            print(f"{name} kv={kv} ...", flush=True)
            res[(name, kv)] = run(model, prompts, work / f"{name}-{kv}.json", kv, args.tokens,
                                  args.kv_space)
    print(f"\nSmolLM2-135M fp32 weights, VLLM_CPU_KVCACHE_SPACE={args.kv_space} GiB, "
          f"{len(PROMPTS)} prompts x {args.tokens} greedy tokens")
    print(f"{'model':8s} {'KV dtype':8s} {'KV tokens':>10s} {'vs dense fp32':>13s} "
          f"{'same tokens as fp32':>20s}")
    table = []
    base = res[("dense", "auto")].get("kv_cache_tokens")
    for (name, kv), r in res.items():
        if not r.get("ok"):
            print(f"{name:8s} {kv:8s} failed: {r.get('error', 'see the log')}")
            table.append({"model": name, "kv_dtype": kv, "ok": False,
                          "error": r.get("error")})
            continue
        ref = res[(name, "auto")]
        same = [common_prefix(a["token_ids"], b["token_ids"])
                for a, b in zip(r["results"], ref.get("results", []), strict=False)]
        row = {"model": name, "kv_dtype": kv, "ok": True, "kv_cache_tokens":
               r["kv_cache_tokens"], "ratio_to_dense_fp32": r["kv_cache_tokens"] / base,
               "common_prefix": same, "identical_prompts": sum(s == args.tokens for s in same)}
        table.append(row)
        print(f"{name:8s} {kv:8s} {r['kv_cache_tokens']:10,d} "
              f"{row['ratio_to_dense_fp32']:13.3f} {sum(same):>10d}/{len(same) * args.tokens}"
              f" ({row['identical_prompts']}/{len(same)} identical)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"kv_space_gib": args.kv_space, "tokens": args.tokens,
                                    "table": table}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
