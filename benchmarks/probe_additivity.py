"""Is the recall probe's damage additive over layers? Each given layout's probe KL alone (the
planner's probe windows: ``--recall-probe``'s defaults, SmolLM2 at 7,168 tokens, the HF
reference), one JSON line each (docs/results.md section 12, "Recall in the solver").

    HARP_VLLM_DATA_DIR=../shared/data python benchmarks/probe_additivity.py \\
        0:win2048 3:win2048 0-11:win2048 18:win2048 18:win2048k2
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from harp_vllm.pruning.jobs.plan_options import PlanOptions
from harp_vllm.pruning.jobs.plan_session import open_session
from harp_vllm.pruning.planner.choices import parse_layout
from harp_vllm.pruning.planner.scoring import layout_kl_parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("layouts", nargs="+", help="layouts (--layout text), each scored alone")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args(argv)
    # the settings of the 50% plans (their statistics cache is reused)
    opts = PlanOptions(model=args.model, out=Path("unused"), kv_saving=0.5,
                       windows="512,1024,2048", group_windows="2048", ridge=None,
                       held_out_damage=True, recall_probe=1.0, eval_windows=0)
    s = open_session(opts, progress=True)
    for text in args.layouts:
        t0 = time.perf_counter()
        kl = layout_kl_parts(s.model, parse_layout(text, s.cfg), s.stats, s.probe)["probe"]
        print(json.dumps({"layout": text, "probe_kl": round(kl, 4),
                          "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
