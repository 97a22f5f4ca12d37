"""Perplexity of dense and pruned checkpoints on the **dev** parts of the report's four domains
(HF forward, no vLLM): where a calibration default is chosen (issue 23: never on the report's
test columns). A plan calibrated on a domain's dev part is marked (*) in that column: its dev
figure is not a held-out one.

    python benchmarks/dev_domain_ppl.py DENSE PLAN [PLAN ...] [--windows 4] [--seq-len 1024]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from harp_vllm import models
from harp_vllm.evaluation.domains import DOMAINS, domain_text
from harp_vllm.evaluation.perplexity import perplexity
from harp_vllm.evaluation.quality import token_windows
from harp_vllm.pruning.reference import load_model


def calibrated_on(path: Path) -> set[str]:
    """The domains whose dev part a plan read (WikiText validation by default)."""
    plan = path / "plan.json"
    if not plan.is_file():
        return set()
    calib = json.loads(plan.read_text())["settings"]["calibration"]
    if "mix" in calib:
        return set(calib["mix"])
    if calib.get("dataset") == "wikitext2":
        return {"wikitext"}
    return set()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="dense model first, then checkpoints")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    a = ap.parse_args()
    torch.set_num_threads(2)
    paths = [models.resolve(m) for m in a.models]
    tok = models.load_tokenizer(paths[0])
    wins = {d: torch.tensor(token_windows(tok, domain_text(d, "dev", max_chars=a.seq_len
                                                           * a.windows * 8 + 20_000),
                                          a.seq_len, a.windows)) for d in DOMAINS}
    rows = []
    for p in paths:
        model = load_model(p).eval()
        nll = {d: perplexity(model, w, progress=False)[1] for d, w in wins.items()}
        rows.append((p, nll, calibrated_on(p)))
        print(f"{p.name}: " + ", ".join(f"{d} {math.exp(v):.3f}" for d, v in nll.items()),
              flush=True)
    dense = rows[0][1]
    common = [d for d in DOMAINS if not any(d in c for _, _, c in rows)]
    print(f"\n| model | {' | '.join(DOMAINS)} | geometric mean of the ratios on "
          f"{', '.join(common)} (no plan read them) |")
    print("| --- |" + " --- |" * (len(DOMAINS) + 1))
    for p, nll, calib in rows:
        cells = []
        for d in DOMAINS:
            r = math.exp(nll[d] - dense[d])
            cells.append(f"{math.exp(nll[d]):.2f}" if p == rows[0][0]
                         else f"{r:.3f}x" + (" (*)" if d in calib else ""))
        held = [nll[d] - dense[d] for d in common]
        mean = f"{math.exp(sum(held) / len(held)):.3f}x" if p != rows[0][0] and held else "-"
        print(f"| {p.name} | {' | '.join(cells)} | {mean} |")
    print(f"\n{a.windows} windows of {a.seq_len} tokens of each domain's dev part; (*) the plan "
          f"calibrated on that dev part.")


if __name__ == "__main__":
    main()
