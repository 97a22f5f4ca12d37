"""Is a failed passkey a lost key or a changed answer format? Per trial, on the HF reference:
the first answer token's two likeliest choices (SmolLM2 opens the key with " ", or answers in
words with " the" / " a"), and the key's log-probability with the answer's opening given
(teacher-forced: retrieval apart from format). The trials are ``harp-vllm eval passkey``'s
(same seed, so the same keys and depths for the same lengths and count); docs/results.md
section 12, "A failed passkey is mostly the answer's format; windows alone at 50%".

    HARP_VLLM_DATA_DIR=../shared/data python benchmarks/passkey_answer_probe.py \\
        smollm2-135m out/smollm2-wgplan50s-hod --lengths 1024,2048 --trials 10
    # which part moves the answer: the same plan with its windows lifted past the prompt
    # (--lift-windows), and its sink logits silenced too (--silence-sinks)
    python benchmarks/passkey_answer_probe.py out/smollm2-wgplan50s-hod --lengths 2048 \\
        --lift-windows --silence-sinks
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from harp_vllm import models
from harp_vllm.evaluation.tasks.passkey import answer_cue, build_trials, parse_lengths
from harp_vllm.pruning.reference.pruned_model import load_model


def lifted(path: Path, into: Path) -> Path:
    """``path`` with every sliding window of its pruning section (whole or per KV group) set
    to the model's context less one: a copy of its config beside links to its files."""
    config = json.loads((path / "config.json").read_text())
    if "harp_pruning" not in config:  # dense: nothing to lift
        return path
    for f in path.iterdir():
        if f.name != "config.json":
            (into / f.name).symlink_to(f.resolve())
    spec, top = config["harp_pruning"], int(config["max_position_embeddings"]) - 1
    spec["windows"] = {k: top for k in spec.get("windows") or {}}
    for g in (spec.get("group_windows") or {}).values():
        g["window"] = top
    (into / "config.json").write_text(json.dumps(config))
    return into


def probe(model_name: str, lengths: list[int], trials: int, seed: int,
          lift_windows: bool = False, silence_sinks: bool = False) -> list[dict]:
    """One row per trial: length, depth, the two likeliest first tokens with their
    probabilities, the cued key's log-probability and whether every key digit is top-1."""
    path = models.resolve(model_name)
    tok = models.load_tokenizer(path)
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(lifted(Path(path), Path(tmp)) if lift_windows else path)
    if silence_sinks:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("self_attn.sinks"):
                    param.fill_(-1e4)
    rows = []
    for c in build_trials(tok, lengths, trials, seed):
        cue = answer_cue(tok, c.key)
        key_ids = tok(f" {c.key}", add_special_tokens=False)["input_ids"][len(cue):]
        ids = torch.tensor([c.prompt_ids + cue + key_ids])
        with torch.no_grad():
            logits = model(ids).logits[0].float()
        start = ids.shape[1] - len(key_ids)
        lp = torch.log_softmax(logits[start - 1:start - 1 + len(key_ids)], -1)
        target = torch.tensor(key_ids)
        first = torch.softmax(logits[len(c.prompt_ids) - 1], -1).topk(2)
        rows.append({"model": model_name, "length": c.length, "depth": round(c.depth, 3),
                     "first": [[tok.decode([int(i)]), round(float(p), 3)]
                               for p, i in zip(first.values, first.indices, strict=True)],
                     "key_logprob": round(float(lp.gather(1, target[:, None]).sum()), 4),
                     "key_top1": bool((lp.argmax(-1) == target).all())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="known names or checkpoint directories")
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lift-windows", action="store_true",
                    help="every window of the (pruned) models set past any prompt")
    ap.add_argument("--silence-sinks", action="store_true",
                    help="every sink logit set to -1e4 (no sink)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    lengths = parse_lengths(args.lengths)
    print("| model | tokens | first token ' ' (opens the key) | key top-1 cued | "
          "key log-prob cued |\n| --- | --- | --- | --- | --- |")
    table = []
    for name in args.models:
        rows = probe(name, lengths, args.trials, args.seed, args.lift_windows,
                     args.silence_sinks)
        for n in lengths:
            at = [r for r in rows if r["length"] == n]
            opens = sum(r["first"][0][0] == " " for r in at) / len(at)
            top1 = sum(r["key_top1"] for r in at) / len(at)
            klp = sum(r["key_logprob"] for r in at) / len(at)
            table.append(f"| {name} | {n} | {opens:.2f} | {top1:.2f} | {klp:.3f} |")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
