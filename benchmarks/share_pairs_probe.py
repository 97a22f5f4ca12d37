"""Cross-layer KV sharing pairs on a real model (issues 24/25): WikiText-2 perplexity of the
dense model, of each layout of sharing pairs unfitted (KVSharer-style) and refitted
(``pruning/methods/share_fit.py``: q and o, or o only with QK-norm), HF reference in fp32.
The refit reads ``--calib`` windows of 1,024 tokens of WikiText-2 validation; perplexity is on
``--split`` (validation to choose, test to report), ``--windows`` windows of ``--seq-len``.

    python benchmarks/share_pairs_probe.py gemma3-270m 17:11 17:5 --split validation
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from harp_vllm import models
from harp_vllm.evaluation.data import load_text
from harp_vllm.evaluation.perplexity import evaluate_perplexity
from harp_vllm.pruning.calibration.windows import calibration_windows
from harp_vllm.pruning.methods.share_fit import apply_fit, fit_shared
from harp_vllm.pruning.reference import decoder_layers, load_model, shared


def parse_pairs(text: str) -> dict[int, int]:
    """``"17:11,16:10"`` -> {17: 11, 16: 10} (layer: the earlier layer it shares)."""
    return {int(a): int(b) for a, b in (p.split(":") for p in text.split(",") if p)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("layouts", nargs="+", help="comma lists of LAYER:TARGET")
    ap.add_argument("--split", default="validation", choices=("validation", "test"))
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--local-steps", type=int, default=0,
                    help="QK-norm models: Adam steps of local reconstruction on q and o")
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    src = models.prepare(args.model, progress=False)
    tok = models.load_tokenizer(src)
    calib = calibration_windows(tok, load_text("wikitext2", "validation"), args.calib, 1024, 0)
    text = load_text("wikitext2", args.split)
    model = load_model(src)
    t0 = time.perf_counter()

    def ppl() -> float:
        return round(evaluate_perplexity(model, tok, text, args.seq_len,
                                         max_windows=args.windows, progress=False).perplexity, 3)

    out: dict = {"model": args.model, "split": args.split, "seq_len": args.seq_len,
                 "local_steps": args.local_steps, "lr": args.lr, "windows": args.windows,
                 "calib": list(calib.shape), "dense": ppl(), "runs": []}
    print(json.dumps({"dense": out["dense"]}), flush=True)
    for layout in args.layouts:
        pairs = parse_pairs(layout)
        run: dict = {"layout": layout}
        with shared(model, pairs):
            run["unfitted"] = ppl()
        saved = {i: (decoder_layers(model)[i].self_attn.q_proj.weight.clone(),
                     decoder_layers(model)[i].self_attn.o_proj.weight.clone()) for i in pairs}
        fits = {i: fit_shared(model, i, j, calib, local_steps=args.local_steps, lr=args.lr)
                for i, j in pairs.items()}
        run["output_error"] = {i: {k: round(v, 4) for k, v in f.output_error.items()}
                               for i, f in fits.items()}
        for i, f in fits.items():
            apply_fit(model, i, f)
        with shared(model, pairs):
            run["refitted"] = ppl()
        with torch.no_grad():  # the dense weights back for the next layout
            for i, (q, o) in saved.items():
                decoder_layers(model)[i].self_attn.q_proj.weight.copy_(q)
                decoder_layers(model)[i].self_attn.o_proj.weight.copy_(o)
        run["seconds"] = round(time.perf_counter() - t0, 1)
        out["runs"].append(run)
        print(json.dumps(run), flush=True)
    print(json.dumps(out, indent=1))
