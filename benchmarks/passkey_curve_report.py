"""Passkey accuracy by length for several models, from ``harp-vllm eval passkey`` runs, with
the paired difference to the first model (same seed, so the same prompts) and a plot
(docs/results.md, Gemma 3 section)::

    .venv/bin/python benchmarks/passkey_curve_report.py \\
        dense=out/gemma-pk/dense-short.json,out/gemma-pk/dense-16k.json \\
        plan30s=out/gemma-pk/plan30s-short.json,out/gemma-pk/plan30s-16k.json \\
        --plot docs/gemma/passkey.png

A model's runs are merged by length; a length measured by every model is compared trial by
trial, and refused unless the two runs hold the same keys in the same order. ``--cued``: the
table of the answers with their opening cued (``cued_correct``; runs since stop 45), and the
plot draws those solid and the plain answers dashed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harp_vllm.evaluation.quality_report import difference
from harp_vllm.evaluation.tasks.passkey import accuracy_by_length


def load(spec: str) -> tuple[str, dict[int, list[dict]], dict[str, dict], float]:
    """``label=a.json,b.json`` -> label, trial rows by length, their accuracy by length (with
    each trial's 0/1), seconds of all runs."""
    label, _, files = spec.partition("=")
    if not files:
        raise SystemExit(f"bad model {spec!r}: use LABEL=RUN.json[,RUN.json...]")
    rows: dict[int, list[dict]] = {}
    seconds = 0.0
    for f in files.split(","):
        path = Path(f)
        if not path.is_file():
            raise SystemExit(f"missing {path}: make it with harp-vllm eval passkey --out")
        run = json.loads(path.read_text())
        seconds += run["seconds"]
        for r in run["rows"]:
            rows.setdefault(r["length"], []).append(r)
    accuracy = accuracy_by_length([r for t in rows.values() for r in t], sorted(rows), items=True)
    return label, rows, accuracy, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="LABEL=RUN.json[,RUN.json...], reference first")
    ap.add_argument("--plot", type=Path, help="write the accuracy curves here (PNG)")
    ap.add_argument("--cued", action="store_true", help="score the cued answers")
    args = ap.parse_args()
    models = [load(s) for s in args.models]
    plain = {label: {n: a["accuracy"] for n, a in acc.items()} for label, _, acc, _ in models}
    if args.cued:
        for label, _, acc, _ in models:
            for n, a in acc.items():
                if "cued_items" not in a:
                    raise SystemExit(f"{label} at {n} tokens has no cued answers (a run from "
                                     "before stop 45): run it again")
                a["items"], a["accuracy"] = a["cued_items"], a["cued_accuracy"]
    ref_label, ref, ref_acc, _ = models[0]
    lengths = sorted(ref)
    head = "| model | " + " | ".join(f"{n:,} tokens" for n in lengths) + " | run time |"
    print(head)
    print("|" + " --- |" * (len(lengths) + 2))
    for label, rows, acc, seconds in models:
        cells = []
        for n in lengths:
            if n not in rows:
                cells.append("")
                continue
            hits = acc[str(n)]["items"]
            cell = f"{100 * acc[str(n)]['accuracy']:.0f}"
            if label != ref_label:
                if [r["key"] for r in rows[n]] != [r["key"] for r in ref[n]]:
                    raise SystemExit(f"{label} at {n} tokens has other prompts than "
                                     f"{ref_label}: run both with the same --seed and lengths")
                d = difference(hits, ref_acc[str(n)]["items"])
                cell += f" ({100 * d['diff']:+.0f} ± {100 * (d['se'] or 0):.0f})"
            cells.append(f"{cell} (n = {len(hits)})" if label == ref_label else cell)
        print(f"| {label} | " + " | ".join(cells) + f" | {seconds / 60:.0f} min |")
    if args.cued:
        key_logprob_table(models, lengths)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        for k, (label, rows, acc, _) in enumerate(models):
            xs = [n for n in lengths if n in rows]
            ys = [acc[str(n)]["accuracy"] for n in xs]
            color = "k" if k == 0 else f"C{k - 1}"
            width = 4 if k == 0 else 1.5  # the reference stays visible under equal curves
            ax.plot(xs, ys, marker="o", label=f"{label}, answer cued" if args.cued else label,
                    color=color, lw=width)
            if args.cued:
                ax.plot(xs, [plain[label][str(n)] for n in xs], marker="x", ls="--",
                        color=color, alpha=0.6, lw=width / 2, label=f"{label}, plain")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{round(n / 1024)}k" for n in lengths])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("passkey accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.legend()
        ax.set_title("passkey retrieval by context length")
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110)
        plt.close(fig)
        print(f"\n(plot: {args.plot})")


def key_logprob_table(models: list, lengths: list[int]) -> None:
    """Mean log-probability of the key's digits (cued, where the answer is the key), and each
    model's paired difference to the first over the trials both answered: below the
    accuracy's ceiling, how sure the retrieval is. Runs before the key's log-probability was
    recorded show as blank."""
    ref_label, ref = models[0][0], models[0][1]
    print("\nKey log-probability (nats, all digits; cued answers that are the key):\n")
    print("| model | " + " | ".join(f"{n:,} tokens" for n in lengths) + " |")
    print("|" + " --- |" * (len(lengths) + 1))
    for label, rows, _, _ in models:
        cells = []
        for n in lengths:
            lp = [r.get("cued_key_logprob") for r in rows.get(n, [])]
            own = [x for x in lp if x is not None]
            if not own:
                cells.append("")
                continue
            cell = f"{sum(own) / len(own):.3f} (n = {len(own)})"
            if label != ref_label:
                pairs = [(a, b.get("cued_key_logprob")) for a, b in zip(lp, ref[n], strict=True)]
                pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
                if pairs:
                    d = difference([a for a, _ in pairs], [b for _, b in pairs])
                    cell = (f"{sum(own) / len(own):.3f} ({d['diff']:+.3f} ± "
                            f"{d['se'] or 0:.3f}, n = {len(pairs)})")
            cells.append(cell)
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
