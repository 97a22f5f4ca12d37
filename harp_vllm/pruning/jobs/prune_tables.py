"""The ``harp-vllm prune`` report as table rows for printing (alphas, or kept shapes)."""

from __future__ import annotations


def alpha_table_rows(report: dict) -> list[tuple[str, str, str]]:
    """(layer, alpha, calibration ppl at the chosen alpha) for printing, top layer first."""
    calib = report.get("calibration", {}).get("calib_ppl", {})
    grid = report.get("calibration", {}).get("grid")
    rows = []
    for k, a in sorted(report["alphas"].items(), key=lambda kv: -int(kv[0])):
        ppl = "-"
        if k in calib and grid:
            ppl = f"{calib[k][min(range(len(grid)), key=lambda i: abs(grid[i] - a))]:.3f}"
        rows.append((k, f"{a:.1f}", ppl))
    return rows

def shape_table_rows(shapes: dict[str, list[int]]) -> list[tuple[str, str, str, str]]:
    """(layer, heads, KV heads, MLP channels) for printing, top layer first."""
    rows = zip(shapes["num_attention_heads"], shapes["num_key_value_heads"],
               shapes["intermediate_size"], strict=True)
    return [(str(i), str(q), str(kv), str(m)) for i, (q, kv, m) in reversed(list(enumerate(rows)))]
