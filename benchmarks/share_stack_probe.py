"""Sharing layers alone and stacked, on the planner's re-scoring record with the recall probe
(docs/results.md section 14, "Sharing on long windows and stacked"): per layout, the KL to
dense on the short damage windows (and the sum of its layers' single damages), on the long
text windows and on the probe windows. Needs the statistics cache of the section's
``--share-targets 2 --ridge held-out --held-out-damage`` plan (the refits)::

    PYTHONPATH=. flock /tmp/harp-heavy.lock .venv/bin/python benchmarks/share_stack_probe.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from harp_vllm.pruning.jobs.plan_options import PlanOptions
from harp_vllm.pruning.jobs.plan_session import open_session
from harp_vllm.pruning.planner.choices import parse_layout
from harp_vllm.pruning.planner.scoring import layout_kl_parts

LAYOUTS = ["1:share0", "3:share2", "11:share10", "5:share4,7:share6,9:share8",
           "3:share2,5:share4,7:share6,9:share8,11:share10"]


def main() -> int:
    t0 = time.perf_counter()
    s = open_session(PlanOptions(model="smollm2-135m", out=Path("/tmp/unused"),
                                 layout=",".join(LAYOUTS[-1:] + ["1:share0"]),
                                 recall_probe=1.0, eval_windows=0, ridge=None,
                                 held_out_damage=True), progress=False)
    print(f"session ready in {time.perf_counter() - t0:.0f} s", flush=True)
    for text in LAYOUTS:
        lay = parse_layout(text, s.cfg)
        long = layout_kl_parts(s.model, lay, s.stats, s.held_out)
        short = layout_kl_parts(s.model, lay, s.stats, s.rec)
        alone = sum(s.stats.damage[j][c.name] for j, c in lay.items())
        print(f"{text}: short {short['text']:.3f} (sum of singles {alone:.3f}); long text "
              f"{long['text']:.3f}, probe {long['probe']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
