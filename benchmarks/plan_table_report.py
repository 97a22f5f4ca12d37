"""One row per plan from its ``plan.json`` (``harp-vllm plan --out DIR``): layout, KV saving
at the budget's context (the cost model's and, for windowed or sharing layouts, as vLLM
allocates it) and the WikiText-2 test perplexity the planner measured (docs/results.md
sections 10 and 12)::

    .venv/bin/python benchmarks/plan_table_report.py out/smollm2-wplan27 out/smollm2-wplan50
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plans", type=Path, nargs="+", help="plan output folders (with plan.json)")
    args = ap.parse_args()
    plans = []
    for d in args.plans:
        f = d / "plan.json"
        if not f.is_file():
            raise SystemExit(f"missing {f}: make it with harp-vllm plan ... --out {d}")
        plans.append((d.name, json.loads(f.read_text())))
    dense = {round(p["ppl_dense"], 3) for _, p in plans}
    if len(dense) != 1:
        raise SystemExit(f"the plans were measured against different dense values: {dense}")
    print("| plan | layout | KV saving at the context (cost model / as served) | "
          "WikiText-2 test 8 x 2,048 | calibration KL predicted / measured |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| dense | - | - | {dense.pop():.3f} | - |")
    for name, p in plans:
        c = p["costs"]
        served = c.get("kv_saving_served")
        windowed = "win" in p["layout"] or "share" in p["layout"]
        saving = f"{100 * c['kv_saving']:.1f}% / " + (
            f"{100 * served:.1f}%" if served is not None
            else "not modelled" if windowed else "the same (no windows or sharing)")
        print(f"| {name} | `{p['layout']}` | {saving} (at {p['budget']['context']:,}) | "
              f"{p['ppl']:.3f} ({p['ppl'] / p['ppl_dense']:.4f}x) | "
              f"{p['predicted_kl']:.3f} / {p['measured_kl']:.3f} |")


if __name__ == "__main__":
    main()
