"""The single-method curves the plan frontier is drawn against (``--compare`` JSON).

SmolLM2-135M-Instruct, WikiText-2 test, 8 windows x 2048 tokens (dense 19.13), as measured in
docs/results.md: HARP top-P with searched alphas and Gate-Norm (section 5; HARP P = 12 from
section 9), FLAP global allocation at HARP's head share and the linear maps with
``--select damage`` (section 9, ``benchmarks/linear_table.sh``); the points at P = 3 and 15
(10% and 50%) from ``benchmarks/single_method_ends.sh``. KV saving and the predicted 7k
prefill speed-up come from the cost model (``harp_vllm.pruning.costs``); FLAP's per-layer KV
heads are read from its checkpoints when they exist (``out/single-ends/flapP``, from that
script).

    .venv/bin/python benchmarks/single_method_points.py out/plan/single_methods.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import AutoConfig

from harp_vllm import models
from harp_vllm.pruning import costs
from harp_vllm.spec import PruningSpec

ENDS = "out/single-ends"  # benchmarks/single_method_ends.sh
# method -> [(P layers or FLAP's equal head share, perplexity, layers or checkpoint dir)]
MEASURED = {
    "HARP (top P, searched alpha)": [(3, 22.02, "top"), (4, 22.69, "top"), (8, 61.11, "top"),
                                     (12, 343.6, "top")],
    "Gate-Norm (attention removed)": [(3, 27.33, "removed"), (4, 27.88, "removed"),
                                      (8, 315.47, "removed"), (12, 3612.84, "removed")],
    "linear maps (--select damage)": [(3, 20.30, "linear"), (4, 20.92, "linear"),
                                      (8, 23.47, "linear"), (12, 27.72, "linear"),
                                      (15, 42.03, "linear")],
    "FLAP (global, bias compensation)": [(3, 22.72, f"{ENDS}/flap3"), (4, 26.16, f"{ENDS}/flap4"),
                                         (8, 37.96, f"{ENDS}/flap8"),
                                         (12, 64.88, f"{ENDS}/flap12"),
                                         (15, 146.15, f"{ENDS}/flap15")],
}


def shapes_for(cfg, p: int, how: str) -> list[costs.LayerShape] | None:
    n = cfg.num_hidden_layers
    dense = costs.dense_shape(cfg)
    if how in ("top", "linear", "removed"):  # HARP's fold costs what a rank n_kv*d_h map does
        kind = "removed" if how == "removed" else "linear"
        rank = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
        return [dense] * (n - p) + [costs.LayerShape(kind, rank=rank,
                                                     intermediate=cfg.intermediate_size)] * p
    path = Path(how)
    if not (path / "config.json").is_file():
        return None
    pruned = AutoConfig.from_pretrained(path)
    return costs.model_shapes(cfg, PruningSpec.from_config(pruned))


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/plan/single_methods.json")
    cfg = AutoConfig.from_pretrained(models.prepare("smollm2-135m", progress=False))
    n = cfg.num_hidden_layers
    curves: dict = {"_source": "docs/results.md sections 5, 9 and 10 (WikiText-2 test, 8 x 2048)"}
    for method, points in MEASURED.items():
        rows = []
        for p, ppl, how in points:
            row = {"kv_saving": round(p / n, 6), "ppl": ppl, "layers": p}
            shapes = shapes_for(cfg, p, how)
            if shapes is not None:
                row["kv_saving"] = costs.summary(cfg, shapes)["kv_saving"]
                row["prefill_speedup_7k"] = round(costs.predicted_speedup(cfg, shapes, 7168), 4)
            rows.append(row)
        curves[method] = rows
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(curves, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
