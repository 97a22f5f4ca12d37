"""How strong should a windowed layer's sink logit be? HF forward, no vLLM (issues 23, 24).

vLLM adds a head's sink logit to every query's softmax, also before the window is full, where
the real first tokens are still in view: there the sink counts their mass twice (the windowed
27% plan with fitted sinks loses 2.7 LAMBADA points that the plan without sinks did not lose,
docs/results.md section 12). This sweeps an offset ``d`` subtracted from every fitted logit
(``s_h - d``; ``none`` is no sink) on a checkpoint's windows and sinks, and prints per offset:

- ``short KL``: KL(dense || model) per token on short validation windows (``--short-len``
  tokens, every query inside its window: what the sink costs at short contexts);
- ``recall NLL``: NLL per digit of the recall probe (``calibration/recall_probe.py``, facts
  planted in long validation windows and recalled at their end: development text);
- ``passkey NLL``: NLL per key token on passkey prompts (evaluation text: a diagnosis, never
  the choice).

``--per-layer`` also prints each layer's sink alone's short KL; ``--layers`` keeps the sinks of
some layers only (the rule ``--sink-max-short-kl`` applies in the planner).

    python benchmarks/sink_offset_sweep.py out/smollm2-wplan27s-all --offsets none,0,0.5,1
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from retrieval_heads import key_nll

from harp_vllm import models
from harp_vllm.evaluation.tasks.passkey import build_trials
from harp_vllm.pruning.calibration.logits import normed_head_logits
from harp_vllm.pruning.calibration.recall_probe import recall_windows
from harp_vllm.pruning.calibration.windows import (
    calibration_windows,
    load_calibration_text,
    unused_long_windows,
)
from harp_vllm.pruning.reference import decoder_layers, load_model
from harp_vllm.pruning.reference.sliding_windows import attach_window
from harp_vllm.pruning.reference.window_sinks import short_context_costs, sinks_added


@torch.no_grad()
def logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    hid = model.model(input_ids=ids, use_cache=False).last_hidden_state
    return torch.log_softmax(normed_head_logits(model, hid).float(), -1)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="a plan with --window-sinks (plan.json)")
    ap.add_argument("--offsets", default="none,0,0.5,1,2")
    ap.add_argument("--short", type=int, default=32, help="short validation windows")
    ap.add_argument("--short-len", type=int, default=256)
    ap.add_argument("--recall", type=int, default=2, help="long recall-probe windows")
    ap.add_argument("--passkey", type=int, default=4, help="passkey trials (diagnosis)")
    ap.add_argument("--length", type=int, default=7168)
    ap.add_argument("--layers", default=None,
                    help="sinks on these windowed layers only (comma list; default all)")
    ap.add_argument("--per-layer", action="store_true",
                    help="also print the short KL of each layer's sink alone (offset 0)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(2)
    plan = json.loads((args.checkpoint / "plan.json").read_text())
    windows = {j: int(c.removeprefix("win")) for j, c in enumerate(plan["per_layer"])
               if c.startswith("win")}
    fitted = {int(j): torch.tensor(v) for j, v in plan["window_sinks"]["logits"].items()}
    if args.layers:
        keep = {int(j) for j in args.layers.split(",")}
        fitted = {j: v for j, v in fitted.items() if j in keep}
    src = models.resolve(plan["model"])
    tok = models.load_tokenizer(src)
    model = load_model(src).eval()
    text, _ = load_calibration_text()
    # short windows from the validation text's start, long ones from its end (disjoint)
    short = calibration_windows(tok, text, args.short, args.short_len, seed=1)
    long = unused_long_windows(tok, text, 20, 1024, 0, 2 + args.recall, args.length)[2:]
    planted, picks = recall_windows(tok, long, needles=3, seed=7)
    trials = build_trials(tok, [args.length], args.passkey, 123)

    def measure(label: str, dense_short: torch.Tensor | None) -> dict:
        t0 = time.perf_counter()
        lp = torch.cat([logprobs(model, short[i:i + 8]) for i in range(0, len(short), 8)])
        kl = 0.0 if dense_short is None else float(
            (dense_short.exp() * (dense_short - lp)).sum(-1)[:, 1:].mean())
        nll = []
        for w, p in zip(planted, picks, strict=True):
            lpw = logprobs(model, w[None])[0]
            nll.append(-lpw[p, w[p + 1]])
        rec = float(torch.cat(nll).mean())
        pk, right = key_nll(model, tok, trials)
        row = {"offset": label, "short_kl": round(kl, 5), "recall_nll": round(rec, 4),
               "passkey_nll": round(pk, 4), "passkey_argmax": right,
               "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(row), flush=True)
        return row | {"_short": lp}

    dense = measure("dense", None)
    layers = decoder_layers(model)
    for j, w in windows.items():
        attach_window(layers[j].self_attn, w)
    rows = [{k: v for k, v in dense.items() if k != "_short"}]
    if args.per_layer:  # the planner's own measure (what --sink-max-short-kl caps)
        costs = short_context_costs(model, windows, fitted, short, args.short_len)
        for j, s in fitted.items():
            print(json.dumps({"layer": j, "sink_mean": round(float(s.mean()), 3),
                              "short_kl": round(costs[j], 5)}), flush=True)
    for off in args.offsets.split(","):
        if off == "none":
            row = measure("none", dense["_short"])
        else:
            d = float(off)
            with sinks_added(model, {j: s - d for j, s in fitted.items()}):
                row = measure(off, dense["_short"])
        rows.append({k: v for k, v in row.items() if k != "_short"})
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint), "rows": rows},
                                        indent=2) + "\n")
    print(f"{'offset':>8} {'short KL':>9} {'recall NLL':>10} {'passkey NLL':>11}")
    for r in rows:
        print(f"{r['offset']:>8} {r['short_kl']:9.5f} {r['recall_nll']:10.4f} "
              f"{r['passkey_nll']:11.4f}  ppl-equivalent x{math.exp(r['short_kl']):.4f}")


if __name__ == "__main__":
    main()
