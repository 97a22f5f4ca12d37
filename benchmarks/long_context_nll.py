"""Perplexity by position on long windows through vLLM (the served path, plugin loaded), for
one model per run, and a table of several runs against the first: does distant context still
help a checkpoint whose layers see less of it (docs/results.md, Gemma 3 section)::

    PYTHONPATH=. .venv/bin/python benchmarks/long_context_nll.py run gemma3-270m \\
        --len 32767 --windows 2 --out out/gemma-long/dense.json
    PYTHONPATH=. .venv/bin/python benchmarks/long_context_nll.py report \\
        dense=out/gemma-long/dense.json plan30l=out/gemma-long/plan30l.json

Windows of WikiText-2 (``--split``, test by default: for reporting, not choosing), each
``--len`` tokens with the tokenizer's BOS first (as a served prompt starts); NLL of every
later token, summed per position bucket (``--buckets``: each bucket's first position).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from harp_vllm.evaluation.quality import bucket_nll, cut_windows, prompt_nlls
from harp_vllm.evaluation.quality_report import bucket_perplexity


def run(args: argparse.Namespace) -> None:
    from harp_vllm import models
    from harp_vllm.evaluation.data import load_text
    from harp_vllm.evaluation.tasks.backends import engine_env

    engine_env(args.kv_cache_gb)
    from vllm import LLM

    path = models.resolve(args.model)
    tok = models.load_tokenizer(path)
    ids = tok(load_text("wikitext2", args.split), add_special_tokens=False)["input_ids"]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    wins = [bos + w for w in cut_windows(ids, args.len - len(bos), args.windows)]
    buckets = tuple(int(b) for b in args.buckets.split(","))
    t0 = time.perf_counter()
    # Prompt logprobs hold a chunk's logits over the whole vocabulary (262k for Gemma 3):
    # chunks of 2,048 tokens keep that to 2 GiB.
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, seed=0,
              max_model_len=args.len + 1, max_num_batched_tokens=2048,
              enable_prefix_caching=False)
    nll = prompt_nlls(llm, wins)
    out = {"model": args.model, "split": args.split, "len": args.len, "windows": len(wins),
           "bos": bool(bos), "buckets": [bucket_nll(x, buckets) for x in nll],
           "seconds": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} ({out['seconds']:.0f} s)")


def report(specs: list[str]) -> None:
    runs = []
    for spec in specs:
        label, _, file = spec.partition("=")
        runs.append((label, json.loads(Path(file).read_text())))
    ref = runs[0][1]
    for _, r in runs[1:]:
        if (r["len"], r["windows"], r["split"]) != (ref["len"], ref["windows"], ref["split"]):
            raise SystemExit("runs differ in windows: compare runs of the same --len, "
                             "--windows and --split")
    edges = [(b["start"], b["end"] - 1) for b in ref["buckets"][0]]
    print("| model | " + " | ".join(f"tokens {a:,}-{b:,}" for a, b in edges) + " |")
    print("|---" * (len(edges) + 1) + "|")
    for label, r in runs:
        cells = []
        for i in range(len(edges)):
            p = bucket_perplexity(r, i)
            cells.append(f"{p:.2f}" if r is ref
                         else f"{p:.2f} ({p / bucket_perplexity(ref, i):.3f}x)")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\n({ref['windows']} windows of {ref['len']:,} tokens of WikiText-2 "
          f"{ref['split']}, BOS first: {ref['bos']})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("model")
    r.add_argument("--len", type=int, default=32767,
                   help="tokens per window, BOS included (32,767: Gemma 3's context, less one)")
    r.add_argument("--windows", type=int, default=2)
    r.add_argument("--split", default="test", choices=("validation", "test"))
    r.add_argument("--buckets", default="0,1024,4096,8192,16384")
    r.add_argument("--kv-cache-gb", type=float, default=4.0)
    r.add_argument("--out", required=True)
    p = sub.add_parser("report")
    p.add_argument("runs", nargs="+", help="LABEL=run.json, the first is the reference")
    a = ap.parse_args()
    run(a) if a.cmd == "run" else report(a.runs)
