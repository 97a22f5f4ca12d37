"""How much of each passkey prompt vLLM's prefix cache serves after ``passkey_on``'s warm-up,
on a model with sliding windows (Gemma 3): the filler warm-up prompts one by one, then passkey
trials one by one and in a batch, each with vLLM's ``num_cached_tokens`` and its time::

    PYTHONPATH=. .venv/bin/python benchmarks/passkey_prefix_cache_probe.py gemma3-270m 8192

``--single`` warms with one longest prompt instead (the earlier warm-up), for comparison.
"""

from __future__ import annotations

import argparse
import time

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("length", type=int)
    ap.add_argument("--single", action="store_true", help="one longest warm-up prompt")
    args = ap.parse_args()
    from harp_vllm import models
    from harp_vllm.evaluation.tasks.backends import engine_env
    from harp_vllm.evaluation.tasks.passkey import build_trials, longest_filler, warm_up_lengths

    engine_env(4)
    from vllm import LLM, SamplingParams

    path = models.resolve(args.model)
    tok = models.load_tokenizer(path)
    warm = longest_filler(tok, args.length)
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, seed=0,
              max_model_len=args.length + 64, enable_prefix_caching=True)
    one = SamplingParams(temperature=0.0, max_tokens=1)

    def run(label: str, prompts: list[list[int]]) -> None:
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], one, use_tqdm=False)
        print(f"{label}: prompt tokens {[len(p) for p in prompts]}, cached "
              f"{[o.num_cached_tokens for o in outs]}, {time.perf_counter() - t:.2f} s",
              flush=True)

    for n in [len(warm)] if args.single else warm_up_lengths(len(warm)):
        run(f"warm-up {n}", [warm[:n]])
    for c in build_trials(tok, [args.length], 4, 0):
        run(f"trial at depth {c.depth:.3f}", [c.prompt_ids])
    run("6 trials at once", [c.prompt_ids for c in build_trials(tok, [args.length], 6, 1)])
