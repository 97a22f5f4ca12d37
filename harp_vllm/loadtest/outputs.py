"""Everything a load test writes: ``results.json`` (raw, with every request and the
summary), ``report.md`` and the PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from .report_markdown import markdown
from .report_plots import plot
from .summary import summarize


def write_outputs(results: dict, out_dir: Path, command: str | None = None,
                  with_plots: bool = True) -> dict:
    """Write results.json, report.md and (optionally) the plots; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    plots = {}
    if with_plots:
        try:
            plots = plot(summary, out_dir)
        except Exception as e:  # a plotting problem must not lose the measurements
            results.setdefault("notes", []).append(f"plots not written: {e}")
    payload = dict(results, summary=summary, command=command)
    paths = {"json": out_dir / "results.json", "report": out_dir / "report.md"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
    tmp.replace(paths["json"])
    paths["report"].write_text(markdown(results, summary, command, plots), encoding="utf-8")
    return {**paths, **{k: Path(v) for k, v in plots.items()}}
