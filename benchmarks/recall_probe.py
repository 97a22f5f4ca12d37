"""Recall probe (issue 23, item 3): does a calibration probe see what a layout of sliding
windows does to distant recall? HF forward, no vLLM. For dense and each layout given, the
KL to dense, the NLL and the argmax accuracy at the positions that predict a recalled code's
digits (``harp_vllm.pruning.calibration.recall_probe``), on two long WikiText-2 validation
windows (between the planner's fit windows), planted as natural text or, with ``--repeat R``,
with each window's first R tokens tiled over its length.

    python benchmarks/recall_probe.py --repeat 24 0-1:1024,2-6:2048,8-10:2048,11:512
"""
from __future__ import annotations

import argparse
import time

import torch

from harp_vllm import models
from harp_vllm.pruning.calibration.logits import normed_head_logits
from harp_vllm.pruning.calibration.recall_probe import plant_recall
from harp_vllm.pruning.calibration.windows import load_calibration_text, unused_long_windows
from harp_vllm.pruning.reference import load_model, windowed


def parse(text: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for part in text.split(","):
        layers, w = part.split(":")
        lo, _, hi = layers.partition("-")
        for j in range(int(lo), int(hi or lo) + 1):
            out[j] = int(w)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("layouts", nargs="*", help="windows per layer, e.g. 0-1:1024,11:512")
    ap.add_argument("--repeat", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=7168)
    args = ap.parse_args()
    torch.set_num_threads(2)
    src = models.resolve("smollm2-135m")
    tok = models.load_tokenizer(src)
    text, _ = load_calibration_text()
    long = unused_long_windows(tok, text, 20, 1024, 0, 3, args.seq_len)[1:]
    planted = [plant_recall(tok, w, 3, i + 1, repeat=args.repeat) for i, w in enumerate(long)]
    model = load_model(src).eval()

    def logprobs(win: dict[int, int]) -> list[torch.Tensor]:
        out = []
        for ids, picks in planted:
            with torch.no_grad(), windowed(model, win):
                h = model.model(input_ids=ids[None], use_cache=False).last_hidden_state
                out.append(torch.log_softmax(normed_head_logits(model, h[0, picks]).float(), -1))
        return out

    dense = logprobs({})
    for name in ["dense", *args.layouts]:
        t0 = time.perf_counter()
        lps = dense if name == "dense" else logprobs(parse(name))
        kl = nll = acc = n = 0.0
        for (ids, picks), lp, d in zip(planted, lps, dense, strict=True):
            target = ids[picks + 1]
            nll += float(-lp[torch.arange(len(target)), target].sum())
            acc += float((lp.argmax(-1) == target).sum())
            kl += float((d.exp() * (d - lp)).sum())
            n += len(target)
        print(f"{name}: KL/token {kl / n:.4f}  NLL/token {nll / n:.3f}  accuracy {acc / n:.3f}"
              f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
