"""The single-method curves the plan frontier is drawn against (``--compare`` JSON), read
from the runs that measured them.

SmolLM2-135M-Instruct, WikiText-2 test, 8 windows x 2048 tokens (dense 19.13): HARP top-P
with searched alphas (``benchmarks/harp_table.sh``, section 2), Gate-Norm
(``benchmarks/gate_norm_table.sh``, section 5), the linear maps with ``--select damage``
(``benchmarks/linear_table.sh``, section 9) and, at P = 3 and 15 (10% and 50%) and for FLAP
at every point, ``benchmarks/single_method_ends.sh``. Each perplexity is the ``eval ppl`` JSON
of its row; a missing run is an error naming the script that makes it. KV saving and the
predicted 7k prefill speed-up come from the cost model (``harp_vllm.pruning.costs``); FLAP's
per-layer KV heads from its checkpoints. Prints the points as a table and writes the JSON::

    .venv/bin/python benchmarks/single_method_points.py out/plan/single_methods.json \
        [--harp-table out/harp-table] [--gn-table out/gn-table] \
        [--linear-table out/linear-table] [--ends out/single-ends]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoConfig

from harp_vllm import models
from harp_vllm.pruning import costs
from harp_vllm.spec import PruningSpec

# method -> [(P layers or FLAP's equal head share, table, row name, shape rule)]; the shape
# rule is "top"/"linear"/"removed" (every pruned layer alike) or "checkpoint" (FLAP's own)
POINTS = {
    "HARP (top P, searched alpha)": [(3, "ends", "harp3", "top"),
                                     (4, "harp", "harp-top4", "top"),
                                     (8, "harp", "harp-top8", "top"),
                                     (12, "harp", "harp-top12", "top")],
    "Gate-Norm (attention removed)": [(3, "ends", "gate-norm3", "removed"),
                                      (4, "gn", "gate-norm4", "removed"),
                                      (8, "gn", "gate-norm8", "removed"),
                                      (12, "gn", "gate-norm12", "removed")],
    "linear maps (--select damage)": [(3, "ends", "lin3", "linear"),
                                      (4, "linear", "lin4", "linear"),
                                      (8, "linear", "lin8-timed", "linear"),
                                      (12, "linear", "lin12", "linear"),
                                      (15, "ends", "lin15", "linear")],
    "FLAP (global, bias compensation)": [(p, "ends", f"flap{p}", "checkpoint")
                                         for p in (3, 4, 8, 12, 15)],
}
SCRIPTS = {"harp": "benchmarks/harp_table.sh", "gn": "benchmarks/gate_norm_table.sh",
           "linear": "benchmarks/linear_table.sh", "ends": "benchmarks/single_method_ends.sh"}


def measured_ppl(table: str, folder: Path, name: str) -> float:
    run = folder / f"{name}.json"
    if not run.is_file():
        raise SystemExit(f"missing run {run}: make it with `bash {SCRIPTS[table]} {folder}`")
    return float(json.loads(run.read_text())["perplexity"])


def shapes_for(cfg, p: int, how: str) -> list[costs.LayerShape]:
    n = cfg.num_hidden_layers
    dense = costs.dense_shape(cfg)
    if how in ("top", "linear", "removed"):  # HARP's fold costs what a rank n_kv*d_h map does
        kind = "removed" if how == "removed" else "linear"
        rank = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
        return [dense] * (n - p) + [costs.LayerShape(kind, rank=rank,
                                                     intermediate=cfg.intermediate_size)] * p
    path = Path(how)
    if not (path / "config.json").is_file():
        raise SystemExit(f"missing checkpoint {path} (benchmarks/single_method_ends.sh)")
    pruned = AutoConfig.from_pretrained(path)
    return costs.model_shapes(cfg, PruningSpec.from_config(pruned))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, nargs="?", default=Path("out/plan/single_methods.json"))
    ap.add_argument("--harp-table", type=Path, default=Path("out/harp-table"))
    ap.add_argument("--gn-table", type=Path, default=Path("out/gn-table"))
    ap.add_argument("--linear-table", type=Path, default=Path("out/linear-table"))
    ap.add_argument("--ends", type=Path, default=Path("out/single-ends"))
    args = ap.parse_args()
    folders = {"harp": args.harp_table, "gn": args.gn_table, "linear": args.linear_table,
               "ends": args.ends}
    cfg = AutoConfig.from_pretrained(models.prepare("smollm2-135m", progress=False))
    curves: dict = {"_source": "the eval ppl runs of " + ", ".join(
        f"{folders[t]} ({SCRIPTS[t]})" for t in folders) + " (WikiText-2 test, 8 x 2048)"}
    print("| method | P | KV saving | predicted 7k prefill speed-up | ppl (8 x 2048) | run |")
    print("| --- | --- | --- | --- | --- | --- |")
    for method, points in POINTS.items():
        rows = []
        for p, table, name, how in points:
            ppl = measured_ppl(table, folders[table], name)
            shapes = shapes_for(cfg, p, str(folders[table] / name) if how == "checkpoint"
                                else how)
            row = {"kv_saving": costs.summary(cfg, shapes)["kv_saving"], "ppl": round(ppl, 4),
                   "layers": p,
                   "prefill_speedup_7k": round(costs.predicted_speedup(cfg, shapes, 7168), 4)}
            rows.append(row)
            print(f"| {method} | {p} | {row['kv_saving']:.3f} | {row['prefill_speedup_7k']:.3f} "
                  f"| {ppl:.2f} | {folders[table] / name}.json |")
        curves[method] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(curves, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
