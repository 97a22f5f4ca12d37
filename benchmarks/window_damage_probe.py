"""Probe (issue 24): the damage of a sliding window of W tokens in each SmolLM2 layer alone,
as KL(dense || windowed) per token on long windows of WikiText-2 validation (the planner's
damage measure, at positions sampled over the whole window), in the HF forward. JSON lines.

    python benchmarks/window_damage_probe.py --seq 4096 --windows 2 --w 512,1024,2048
"""
import argparse
import json
import time

import torch

from harp_vllm import models
from harp_vllm.evaluation.domains import domain_text
from harp_vllm.evaluation.quality import token_windows
from harp_vllm.pruning.calibration.damage import record_dense, suffix_kl
from harp_vllm.pruning.reference import load_model, windowed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--w", default="512,1024,2048")
    ap.add_argument("--positions", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(2)
    path = models.resolve("smollm2-135m")
    tok = models.load_tokenizer(path)
    model = load_model(path).eval()
    n = model.config.num_hidden_layers
    wins = torch.tensor(token_windows(tok, domain_text("wikitext", "dev"), args.seq,
                                      args.windows))
    t = time.time()
    rec = record_dense(model, wins, list(range(n)), batch=1, positions=args.positions)
    print(json.dumps({"record_s": round(time.time() - t, 1)}), flush=True)
    for w in map(int, args.w.split(",")):
        for j in range(n):
            with windowed(model, {j: w}):
                kl = suffix_kl(model, rec, j)
            print(json.dumps({"layer": j, "W": w, "kl": round(kl, 5),
                              "elapsed": round(time.time() - t)}), flush=True)


if __name__ == "__main__":
    main()
