"""Markdown tables from ``harp-vllm eval tasks`` result files.

``python -m harp_vllm.evaluation.tasks.report A.json B.json ...`` prints one table, a column per
file (label: the file's ``label`` field, else its model), rows grouped into generation and
discriminative tasks, each cell ``score ± standard error`` (accuracies in %).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .registry import DISCRIMINATIVE, GENERATION, TASKS

PRETTY = {
    "lambada_openai": "LAMBADA (OpenAI)", "gsm8k": "GSM8K", "triviaqa": "TriviaQA (sm_sub)",
    "arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "winogrande": "WinoGrande",
    "openbookqa": "OpenBookQA", "boolq": "BoolQ",
}


def fmt_metric(key: str, m: dict[str, Any] | None) -> str:
    if not m or m.get("value") is None:
        return "–"
    v, se = m["value"], m.get("stderr")
    if key.startswith("perplexity"):
        return f"{v:.2f}" + (f" ± {se:.2f}" if se is not None else "")
    return f"{100 * v:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def _label(p: dict[str, Any]) -> str:
    return str(p.get("label") or p.get("model"))


def _shots(t: dict[str, Any]) -> str:
    return "?" if t.get("num_fewshot") is None else str(t["num_fewshot"])


def markdown_table(payloads: list[dict[str, Any]], all_metrics: bool = False) -> str:
    """One Markdown table: rows task/metric (grouped by kind), a column per payload."""
    head = ["group", "task", "metric", "n", "shots", *(_label(p) for p in payloads)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind in (GENERATION, DISCRIMINATIVE):
        for name, info in TASKS.items():
            if info.kind != kind:
                continue
            entries = [p.get("tasks", {}).get(name) for p in payloads]
            if not any(entries):
                continue
            first = next(e for e in entries if e)
            keys = list(info.report) if all_metrics else list(info.report[:1])
            if name == "gsm8k" and not all_metrics:
                keys = list(info.report)  # strict and flexible differ a lot on small models
            for key in keys:
                metric = key.replace(",none", "").replace(",", " / ")
                ns = {e["n"] for e in entries if e}
                n = str(ns.pop()) if len(ns) == 1 else "varies"
                row = [kind, PRETTY.get(name, name), metric, n, _shots(first)]
                row += [fmt_metric(key, (e or {}).get("metrics", {}).get(key)) for e in entries]
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def load(paths: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(Path(p).read_text()) for p in paths]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    all_metrics = "--all-metrics" in args
    paths = [Path(a) for a in args if a != "--all-metrics"]
    if not paths:
        print("usage: python -m harp_vllm.evaluation.tasks.report [--all-metrics] RESULT.json ...",
              file=sys.stderr)
        return 2
    print(markdown_table(load(paths), all_metrics=all_metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
