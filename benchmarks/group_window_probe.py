"""Would a window per KV group (DuoAttention's split: some groups of a layer keep their whole
context, the others a sliding window) keep the recall that whole-layer windows lose? A probe on
the HF reference, before any serving code: the planner's own re-scoring record (two long
WikiText-2 validation windows, plus ``--recall-probe``'s two windows with facts planted early
and recalled at their end) scored with layers 0-11 windowed as whole layers, or with one KV
group of each kept whole, or with sharing / maps in their place for comparison::

    PYTHONPATH=. flock /tmp/harp-heavy.lock .venv/bin/python benchmarks/group_window_probe.py

Prints, per variant, the KV saving at 7,168 tokens (the cost model's bytes: a group windowed
to W keeps min(W, N) tokens), the text KL per sampled position and the probe KL per recalled
digit (both to dense; the planner's numbers for the same record, ``plan.json`` ``kl_parts``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from harp_vllm.pruning.calibration.damage import suffix_kl_parts
from harp_vllm.pruning.jobs.plan_options import PlanOptions
from harp_vllm.pruning.jobs.plan_session import open_session
from harp_vllm.pruning.reference import decoder_layers
from harp_vllm.pruning.reference.sliding_windows import narrowed, window_mask


def head_mask(window: int, groups: list[int], heads: int, per_group: int, q_len: int,
              k_len: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask [1, heads, q_len, k_len]: the query heads of ``groups`` see their
    last ``window`` tokens, the others every earlier token."""
    full = window_mask(k_len, q_len, k_len, dtype)
    win = window_mask(window, q_len, k_len, dtype)
    mask = full.expand(1, heads, q_len, k_len).clone()
    for g in groups:
        mask[:, g * per_group:(g + 1) * per_group] = win[0]
    return mask


@contextlib.contextmanager
def group_windows(model: Any, spec: dict[int, tuple[int, list[int]]]) -> Iterator[None]:
    """Temporarily window the KV ``groups`` of each layer of ``spec`` (layer -> (W, groups))."""
    cfg = model.config
    heads, per = cfg.num_attention_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    handles = []

    def hook_for(window: int, groups: list[int]):
        def hook(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            t = x.shape[1]
            mask = head_mask(window, groups, heads, per, t, t, x.dtype)
            kwargs["attention_mask"] = narrowed(mask, kwargs.get("attention_mask"))
            return args, kwargs
        return hook

    try:
        for j, (w, groups) in spec.items():
            attn = decoder_layers(model)[j].self_attn
            handles.append(attn.register_forward_pre_hook(hook_for(w, groups), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def saving(cfg: Any, spec: dict[int, tuple[int, list[int]]], n: int) -> float:
    """KV saving at ``n`` tokens: a windowed group keeps min(W, n) of n tokens."""
    kv = cfg.num_key_value_heads
    saved = sum(len(g) / kv * (1 - min(w, n) / n) for w, g in spec.values())
    return saved / cfg.num_hidden_layers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0-11")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--keep", default=None,
                    help="comma list of the KV groups to try keeping whole (default: each)")
    args = ap.parse_args(argv)
    a, _, b = args.layers.partition("-")
    layers = list(range(int(a), int(b or a) + 1))
    t0 = time.perf_counter()
    # the planner's session for an explicit layout: the same record as its re-scoring
    s = open_session(PlanOptions(model="smollm2-135m", out=Path("/tmp/unused"),
                                 layout=f"{layers[0]}:win{args.window}", recall_probe=1.0,
                                 eval_windows=0, ridge=None, held_out_damage=True),
                     progress=False)
    cfg, model, rec = s.cfg, s.model, s.held_out
    kv = cfg.num_key_value_heads
    n = s.context
    w = args.window
    variants: dict[str, dict[int, tuple[int, list[int]]]] = {
        f"win{w}, whole layers": {j: (w, list(range(kv))) for j in layers}}
    keeps = range(kv) if args.keep is None else [int(g) for g in args.keep.split(",")]
    for keep in keeps:
        variants[f"win{w}, group {keep} kept whole"] = {
            j: (w, [g for g in range(kv) if g != keep]) for j in layers}
    if args.keep is None:
        variants[f"win{w}, one group windowed (group 0)"] = {j: (w, [0]) for j in layers}
    print(f"session ready in {time.perf_counter() - t0:.0f} s; layers {args.layers}, "
          f"{len(rec.picks)} record batches, context {n}\n")
    print("| variant | KV saving at 7,168 | text KL | probe KL |")
    print("| --- | --- | --- | --- |")
    with torch.no_grad():
        for name, spec in variants.items():
            with group_windows(model, spec):
                parts = suffix_kl_parts(model, rec, min(spec))
            print(f"| {name} | {saving(cfg, spec, n):.1%} | {parts['text']:.4f} | "
                  f"{parts['probe']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
