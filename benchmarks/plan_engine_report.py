"""The engine check of a plan against dense (docs/results.md section 10) from the JSON files of
``benchmarks/bench_engine_variants.py``: the table (medians, each run, the ratios, per-pass
ratios against the dense runs either side, the cost model's prediction) and the pooled lines
(every invocation's runs together)::

    .venv/bin/python benchmarks/plan_engine_report.py --variant plan27 \\
        --decode out/plan2/engine-decode.json \\
        out/plan2/engine-prefill.json out/plan2/engine-fast.json

The first positional file is the prefill invocation the table's columns come from; the
``--decode`` file has the decode test (``--decode-requests``); every file's prefill runs are
pooled. In each invocation the runs alternate dense and the variants, dense first and last, so
the variant's i-th run sits between dense runs i and i + 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from harp_vllm.pruning import costs


def load(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"missing {path}: run benchmarks/bench_engine_variants.py --out {path}")
    return json.loads(path.read_text())


def prefill_runs(bench: dict, name: str, n: int) -> list[float]:
    return [r["prefill_tok_s"][str(n)] for r in bench["runs"][name]
            if str(n) in r["prefill_tok_s"]]


def per_pass(bench: dict, name: str, key) -> list[float]:
    """The variant's runs, each over the mean of the dense runs either side of it."""
    dense = [key(r) for r in bench["runs"]["dense"]]
    return [key(r) / ((dense[i] + dense[i + 1]) / 2)
            for i, r in enumerate(bench["runs"][name])]


def fmt_runs(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prefill", type=Path, help="the prefill invocation's JSON (table columns)")
    ap.add_argument("more", type=Path, nargs="*", help="further invocations (pooled only)")
    ap.add_argument("--decode", type=Path, required=True, help="the decode invocation's JSON")
    ap.add_argument("--variant", default="plan27")
    args = ap.parse_args()
    name = args.variant
    main_run, dec = load(args.prefill), load(args.decode)
    others = [load(p) for p in args.more]
    path = main_run["variants"][name]
    found = costs.checkpoint_shapes(path)
    if found is None:
        raise SystemExit(f"no checkpoint at {path} (the variant {name!r} of {args.prefill})")
    cfg, shapes = found
    lens = [int(k[len("prefill_"):-len("_tok_s")]) for k in main_run["table"][0]
            if k.startswith("prefill_") and k.endswith("_tok_s")]
    pred = {n: costs.predicted_speedup(cfg, shapes, n, "prefill") for n in lens}
    row = {r["variant"]: r for r in dec["table"]}
    pred_decode = row[name]["decode_predicted"]
    kv_pred = 1 / (1 - costs.summary(cfg, shapes)["kv_saving"])

    def kv(bench: dict, who: str) -> float:
        return statistics.median(r["kv_cache_tokens"] for r in bench["runs"][who])

    med = {who: {n: statistics.median(prefill_runs(main_run, who, n)) for n in lens}
           for who in ("dense", name)}
    dec_runs = {who: [r["decode_tok_s"] for r in dec["runs"][who]] for who in ("dense", name)}
    dec_med = {who: statistics.median(v) for who, v in dec_runs.items()}
    head = " | ".join(f"prefill {n // 1024}k (tok/s)" for n in lens)
    print(f"| | KV-cache tokens | {head} | decode, {dec['decode']['requests']} x "
          f"{dec['decode']['prompt'] // 1024}k context (tok/s) |")
    print("| --- " * (3 + len(lens)) + "|")
    for who, label in (("dense", f"dense (median of {len(main_run['runs']['dense'])} runs)"),
                       (name, f"{name} (median of {len(main_run['runs'][name])} runs)")):
        cells = [f"{med[who][n]:.1f} ({fmt_runs(prefill_runs(main_run, who, n))})"
                 for n in lens]
        print(f"| {label} | {kv(main_run, who):,.0f} | {' | '.join(cells)} | "
              f"{dec_med[who]:.1f} ({fmt_runs(dec_runs[who])}) |")
    kv_ratio = kv(main_run, name) / kv(main_run, "dense")
    ratios = {n: med[name][n] / med["dense"][n] for n in lens}
    dec_ratio = dec_med[name] / dec_med["dense"]
    print(f"| measured ratio (medians) | **{kv_ratio:.3f}** | "
          + " | ".join(f"**{ratios[n]:.3f}**" for n in lens) + f" | **{dec_ratio:.3f}** |")
    passes = {n: per_pass(main_run, name, lambda r, n=n: r["prefill_tok_s"][str(n)])
              for n in lens}
    print("| measured ratio, each pass against the dense runs either side (median) | | "
          + " | ".join(f"{', '.join(f'{x:.3f}' for x in passes[n])} "
                       f"(**{statistics.median(passes[n]):.3f}**)" for n in lens) + " | |")
    print(f"| cost model's prediction | {kv_pred:.3f} | "
          + " | ".join(f"{pred[n]:.3f}" for n in lens) + f" | {pred_decode:.3f} |")
    print(f"| measured / predicted | {kv_ratio / kv_pred:.3f} | "
          + " | ".join(f"**{ratios[n] / pred[n]:.2f}** (per-pass median "
                       f"{statistics.median(passes[n]) / pred[n]:.2f})" for n in lens)
          + f" | **{dec_ratio / pred_decode:.2f}** |")

    print("\nAll invocations pooled:")
    benches = [main_run, dec, *others]
    for n in lens:
        dense = [v for b in benches for v in prefill_runs(b, "dense", n)]
        plan = [v for b in benches if name in b["runs"] for v in prefill_runs(b, name, n)]
        pooled = statistics.median(plan) / statistics.median(dense)
        each = [x / pred[n] for b in benches if name in b["runs"]
                if prefill_runs(b, name, n)
                for x in per_pass(b, name, lambda r, n=n: r["prefill_tok_s"][str(n)])]
        mid = 100 * statistics.median(each)
        print(f"- {n // 1024}k: dense {statistics.median(dense):.1f} over {len(dense)} runs, "
              f"{name} {statistics.median(plan):.1f} over {len(plan)}: {pooled:.3f}, "
              f"{100 * pooled / pred[n]:.1f}% of the predicted {pred[n]:.3f}; single passes "
              f"against the dense runs either side {100 * min(each):.0f}% to "
              f"{100 * max(each):.0f}% of the prediction (median {mid:.1f}% of {len(each)})")
    first = {who: [r["decode_first_prefill_s"] for r in dec["runs"][who]]
             for who in ("dense", name)}
    batched = statistics.median(first["dense"]) / statistics.median(first[name])
    n = dec["decode"]["prompt"]
    pred_n = costs.predicted_speedup(cfg, shapes, n, "prefill")
    print(f"- the decode test's batched prefill of {dec['decode']['requests']} x {n:,}-token "
          f"prompts: dense {' / '.join(f'{s:.1f}' for s in first['dense'])} s, {name} "
          f"{' / '.join(f'{s:.1f}' for s in first[name])} s: {batched:.3f}, "
          f"{100 * batched / pred_n:.0f}% of the predicted {pred_n:.3f}")
    for b, p in zip(others, args.more, strict=True):
        for v in b["variants"]:
            r = {x["variant"]: x for x in b["table"]}[v]
            cells = ", ".join(f"{r[f'prefill_{k}_ratio']:.3f} ({k // 1024}k, predicted "
                              f"{r[f'prefill_{k}_predicted']:.3f}: "
                              f"{100 * r[f'prefill_{k}_ratio'] / r[f'prefill_{k}_predicted']:.1f}%)"
                              for k in lens if f"prefill_{k}_ratio" in r)
            print(f"- {p}: {v} {cells}")


if __name__ == "__main__":
    main()
