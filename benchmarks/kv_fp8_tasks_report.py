"""Table of benchmarks/kv_fp8_tasks.sh: task accuracy at fp8 vs full-precision KV cache.

Per model and KV dtype: LAMBADA acc and perplexity, ARC-Easy acc and acc_norm, each with
lm-eval's standard error; then per model the fp8 - full-precision difference on the same
items, with the paired standard error (from the per-item scores: std of the per-item
differences / sqrt(n)) and the number of items whose score changed.

    .venv/bin/python benchmarks/kv_fp8_tasks_report.py [OUT_DIR]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

MODELS = (("dense", "dense"), ("harp-p8", "HARP P = 8"), ("linear-p8", "linear P = 8"))
COLUMNS = (("lambada_openai", "acc"), ("lambada_openai", "perplexity"),
           ("arc_easy", "acc"), ("arc_easy", "acc_norm"))


def metric(payload: dict, task: str, name: str) -> tuple[float, float | None, int]:
    t = payload["tasks"][task]
    m = t["metrics"][f"{name},none"]
    return m["value"], m["stderr"], t["n"]


def per_item(out: Path, run: str, task: str, name: str) -> dict[int, float] | None:
    f = out / f"{run}.samples" / f"{task}.jsonl"
    if not f.is_file():
        return None
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return {r["doc_id"]: float(r[name]) for r in rows if name in r}


def paired(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int, int]:
    ids = sorted(set(a) & set(b))
    d = [b[i] - a[i] for i in ids]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n), sum(x != 0 for x in d), n


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/kv-fp8-tasks")
    runs = {f"{m}-{kv}": json.loads((out / f"{m}-{kv}.json").read_text())
            for m, _ in MODELS for kv in ("auto", "fp8") if (out / f"{m}-{kv}.json").is_file()}
    print("| model | KV dtype | n (LAMBADA / ARC-E) | LAMBADA acc | LAMBADA ppl | ARC-Easy acc "
          "| ARC-Easy acc_norm |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for m, label in MODELS:
        for kv in ("auto", "fp8"):
            p = runs.get(f"{m}-{kv}")
            kvname = "fp32 (auto)" if kv == "auto" else "fp8"
            if p is None:
                print(f"| {label} | {kvname} | not run | | | | |")
                continue
            if p.get("kv_cache_dtype", "auto") != kv:
                raise SystemExit(f"{m}-{kv}.json was run with {p.get('kv_cache_dtype')}")
            cells, ns = [], []
            for task, name in COLUMNS:
                v, se, n = metric(p, task, name)
                ns.append(n)
                fmt = ".2f" if name == "perplexity" else ".3f"
                cells.append(f"{v:{fmt}} ± {se:{fmt}}" if se is not None else f"{v:{fmt}}")
            print(f"| {label} | {kvname} | {ns[0]} / {ns[2]} | " + " | ".join(cells) + " |")
    engine = {r: p.get("engine_kv_cache_dtype") for r, p in runs.items()}
    print(f"\nKV-cache dtype the engine reported: {engine}\n")
    print("| model | LAMBADA acc fp8 - fp32 | LAMBADA ppl fp8 - fp32 | ARC-Easy acc fp8 - fp32 "
          "| ARC-Easy acc_norm fp8 - fp32 |")
    print("| --- | --- | --- | --- | --- |")
    for m, label in MODELS:
        a, b = runs.get(f"{m}-auto"), runs.get(f"{m}-fp8")
        if a is None or b is None:
            print(f"| {label} | not run | | | |")
            continue
        cells = []
        for task, name in COLUMNS:
            va, vb = metric(a, task, name)[0], metric(b, task, name)[0]
            if name == "perplexity":
                cells.append(f"{vb - va:+.2f} ({(vb / va - 1) * 100:+.1f} %)")
                continue
            ia = per_item(out, f"{m}-auto", task, name)
            ib = per_item(out, f"{m}-fp8", task, name)
            if ia and ib:
                d, se, changed, n = paired(ia, ib)
                cells.append(f"{d:+.3f} ± {se:.3f} ({changed}/{n} items changed)")
            else:
                cells.append(f"{vb - va:+.3f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
