"""``harp-vllm eval quality``: one long-context quality report for several models.

Each model is measured by :mod:`.quality` in its own process (one vLLM engine each); a
model's result is cached under ``OUT/runs/`` keyed by its files and the options, so adding a
checkpoint to a report re-measures only that checkpoint. The first model is the reference
(normally the dense model): every column gets the ratio (perplexity) or difference
(accuracy) to it with a **paired** standard error — over windows for perplexity, over items
and trials for tasks and passkey — since all models see the same windows and items.

Writes ``OUT/quality.json`` (everything), ``OUT/quality.md`` (one table) and
``OUT/quality.png`` (perplexity ratio by domain and by position, passkey by length).
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from .quality import SCHEMA as MODEL_SCHEMA
from .quality import QualityOptions, check_options

SCHEMA = "harp-vllm/quality-report/1"
RUN_KEY_VERSION = 4  # 2: passkey answers of 16 tokens (were 8); 3: passkey prompts start with BOS;
# 4: every passkey trial also asked with its answer cued
PRESETS: dict[str, dict[str, Any]] = {
    # what the issue asks: whole LAMBADA, 50 passkey trials per length (~35 min per model here)
    "full": {},
    # for iterating (~12 min per model here): the same columns on fewer items
    "quick": {"lambada_limit": 1000, "arc_limit": 500, "passkey_trials": 20},
}


def fingerprint(path: Path) -> str:
    """Hash of a model directory's config and of its weight files' names, sizes and mtimes."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.name == "config.json":
            h.update(f.read_bytes())
        elif f.suffix in (".safetensors", ".bin"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def run_key(path: Path, opts: QualityOptions) -> str:
    blob = json.dumps([RUN_KEY_VERSION, fingerprint(path), opts.to_dict()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def measure(model: str, label: str, opts: QualityOptions, runs_dir: Path, use_cache: bool,
            log: Any) -> dict[str, Any]:
    """One model's payload: from the cache when its files and options are unchanged."""
    from .. import models

    path = models.resolve(model)
    key = run_key(path, opts)
    cached = runs_dir / f"{key}.json"  # the same files and options are measured once
    if use_cache and cached.is_file():
        payload = json.loads(cached.read_text())
        if payload.get("run_key") == key and payload.get("schema") == MODEL_SCHEMA:
            log(f"{label}: cached ({cached})")
            return {**payload, "label": label, "cached": True}
    runs_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        opts_file, out_file = Path(tmp) / "options.json", Path(tmp) / "out.json"
        opts_file.write_text(json.dumps(opts.to_dict()))
        log(f"{label}: measuring {model}")
        proc = subprocess.run([sys.executable, "-m", "harp_vllm.evaluation.quality", model,
                               str(opts_file), str(out_file)])
        if not out_file.is_file():  # written whole (temp file, then rename) or not at all
            raise UserError(f"measuring {label} ({model}) failed (exit {proc.returncode}); "
                            "see the log above")
        if proc.returncode != 0:  # e.g. an abort in vLLM's teardown, after the result
            log(f"{label}: the measuring process exited {proc.returncode} after writing its "
                "result; the result is kept")
        payload = json.loads(out_file.read_text())
    payload["run_key"] = key
    tmp_file = cached.with_suffix(".tmp")
    tmp_file.write_text(json.dumps(payload) + "\n")
    tmp_file.replace(cached)
    return {**payload, "label": label, "cached": False}


# --- paired statistics ----------------------------------------------------------------------

def _mean_se(diffs: list[float]) -> tuple[float, float | None]:
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, None
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return mean, math.sqrt(var / n)


def ratio(model_nll: list[float], ref_nll: list[float]) -> dict[str, Any]:
    """Perplexity ratio exp(mean NLL difference) over paired windows, with its SE."""
    if len(model_nll) != len(ref_nll):
        raise UserError("models were measured on different windows (options differ)")
    d, se = _mean_se([a - b for a, b in zip(model_nll, ref_nll, strict=True)])
    r = math.exp(d)
    return {"ratio": r, "se": None if se is None else r * se}


def difference(model_items: list[float], ref_items: list[float]) -> dict[str, Any]:
    """Mean paired difference of per-item scores (model - reference), with its SE."""
    if len(model_items) != len(ref_items):
        raise UserError("models were scored on different items (options differ)")
    d, se = _mean_se([a - b for a, b in zip(model_items, ref_items, strict=True)])
    return {"diff": d, "se": se}


def _bucket_window_nll(long: dict[str, Any], i: int) -> list[float]:
    return [w[i]["nll_sum"] / w[i]["tokens"] for w in long["buckets"]]


def bucket_perplexity(long: dict[str, Any], i: int) -> float:
    """Perplexity of position bucket ``i`` pooled over a run's long windows (``buckets``:
    per window, the :func:`~harp_vllm.evaluation.quality.bucket_nll` sums)."""
    tokens = sum(w[i]["tokens"] for w in long["buckets"])
    return math.exp(sum(w[i]["nll_sum"] for w in long["buckets"]) / tokens)


def summarize(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """Every column of every model, with ratios/differences to the first (the reference)."""
    ref = payloads[0]
    rows = []
    for p in payloads:
        row: dict[str, Any] = {"label": p["label"], "model": p["model"], "path": p["path"],
                               "kv_cache_tokens": p.get("vllm_kv_cache_tokens"),
                               "seconds": p["seconds"], "perplexity": {}, "positions": {},
                               "tasks": {}, "passkey": {}}
        for d, col in p["perplexity"].items():
            row["perplexity"][d] = {"value": col["perplexity"],
                                    **ratio(col["window_mean_nll"],
                                            ref["perplexity"][d]["window_mean_nll"])}
        for d, col in p["positions"].items():
            buckets = []
            for i, b in enumerate(col["buckets"][0]):
                buckets.append({"start": b["start"], "end": b["end"],
                                "value": bucket_perplexity(col, i),
                                **ratio(_bucket_window_nll(col, i),
                                        _bucket_window_nll(ref["positions"][d], i))})
            row["positions"][d] = buckets
        for t, col in p["tasks"].items():
            entry: dict[str, Any] = {"n": col["n"]}
            for metric, items in col["items"].items():
                if metric == "perplexity":
                    entry["perplexity"] = {"value": col["metrics"].get("perplexity"),
                                           **ratio([-x for x in items],
                                                   [-x for x in ref["tasks"][t]["items"][metric]])}
                else:
                    entry[metric] = {"value": sum(items) / len(items),
                                     **difference(items, ref["tasks"][t]["items"][metric])}
            row["tasks"][t] = entry
        for length, col in (p.get("passkey") or {}).get("lengths", {}).items():
            ref_col = ref["passkey"]["lengths"][length]
            row["passkey"][length] = {"value": col["accuracy"], "n": col["trials"],
                                      **difference(col["items"], ref_col["items"])}
            if "cued_items" in col and "cued_items" in ref_col:
                row["passkey"][length]["cued"] = {
                    "value": col["cued_accuracy"],
                    **difference(col["cued_items"], ref_col["cued_items"])}
        rows.append(row)
    return {"schema": SCHEMA, "reference": ref["label"], "options": ref["options"],
            "models": rows}


# --- markdown and plot ----------------------------------------------------------------------

def _pm(x: float | None, digits: int) -> str:
    return "" if x is None else f" ± {x:.{digits}f}"


def markdown(summary: dict[str, Any]) -> str:
    """One table: a row per model, a column per measurement; ratios/differences to the
    reference with paired standard errors."""
    rows = summary["models"]
    ref = rows[0]
    opts = summary["options"]
    doms = list(ref["perplexity"])
    pos = list(ref["positions"])
    tasks = list(ref["tasks"])
    lengths = list(ref["passkey"])
    cued_lengths = [n for n in lengths if "cued" in ref["passkey"][n]]
    head = (["model", "KV tokens"] + [f"ppl {d}" for d in doms]
            + [f"ppl {d} {b['start']}-{b['end'] - 1}" for d in pos
               for b in ref["positions"][d]]
            + [f"{t} acc" for t in tasks] + ["lambada ppl"] * ("lambada_openai" in tasks)
            + [f"passkey {n}" for n in lengths]
            + [f"passkey {n} cued" for n in cued_lengths])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        is_ref = r is ref
        cells = [r["label"], str(r["kv_cache_tokens"] or "?")]
        for d in doms:
            c = r["perplexity"][d]
            cells.append(f"{c['value']:.2f}" if is_ref
                         else f"{c['value']:.2f} ({c['ratio']:.3f}x{_pm(c['se'], 3)})")
        for d in pos:
            for c in r["positions"][d]:
                cells.append(f"{c['value']:.2f}" if is_ref
                             else f"{c['ratio']:.3f}x{_pm(c['se'], 3)}")
        for t in tasks:
            c = r["tasks"][t]["acc"]
            cells.append(f"{100 * c['value']:.1f}" if is_ref else
                         f"{100 * c['value']:.1f} ({100 * c['diff']:+.1f}"
                         f"{_pm(None if c['se'] is None else 100 * c['se'], 1)})")
        if "lambada_openai" in tasks:
            c = r["tasks"]["lambada_openai"]["perplexity"]
            cells.append(f"{c['value']:.1f}" if is_ref
                         else f"{c['value']:.1f} ({c['ratio']:.2f}x)")
        cued = [r["passkey"][n].get("cued", {}) for n in cued_lengths]
        for c in [r["passkey"][n] for n in lengths] + cued:
            cells.append("" if not c else f"{100 * c['value']:.0f}" if is_ref else
                         f"{100 * c['value']:.0f} ({100 * c['diff']:+.0f}"
                         f"{_pm(None if c['se'] is None else 100 * c['se'], 0)})")
        lines.append("| " + " | ".join(cells) + " |")
    t = rows[0]["tasks"]
    notes = [
        "",
        f"Reference: {ref['label']} (first row: absolute values; other rows: value and, in "
        "brackets, the ratio (perplexity) or difference in points (accuracy) to the reference "
        "± its paired standard error).",
        f"Perplexity: {opts['short_windows']} windows of {opts['short_len']} tokens from each "
        "domain's report part (WikiText-2 test; Python stdlib, BoolQ passages, GSM8K problems: "
        "the parts no calibration reads). By position: "
        f"{opts['long_windows']} windows of {opts['long_len']} tokens per long domain, after "
        "the short ones; the ratio of each position bucket's perplexity.",
        "Tasks (lm-eval, zero-shot, through vLLM with the plugin): "
        + ", ".join(f"{k} n = {v['n']}" for k, v in t.items())
        + f"; passkey: {opts['passkey_trials']} trials per length: the greedy answer holds the "
        "key; cued: the same prompt with the answer's opening given (\" \"), every digit of "
        "the key the model's top token (retrieval apart from the answer's format).",
    ]
    return "\n".join(lines + notes) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Three panels: perplexity ratio per domain, by position, passkey accuracy by length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["models"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    doms = list(rows[0]["perplexity"])
    width = 0.8 / max(1, len(rows) - 1)
    for k, r in enumerate(rows[1:]):
        xs = [i + k * width for i in range(len(doms))]
        ys = [r["perplexity"][d]["ratio"] for d in doms]
        es = [r["perplexity"][d]["se"] or 0 for d in doms]
        ax.bar(xs, ys, width, yerr=es, label=r["label"])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(doms))], doms)
    ax.set_ylabel(f"perplexity / {rows[0]['label']}")
    ax.set_title("perplexity by domain")
    ax.legend(fontsize=8)
    ax = axes[1]
    styles = ["-", "--", ":", "-."]
    for k, r in enumerate(rows[1:]):  # colour: model (as in the bars); line style: domain
        for n, (d, buckets) in enumerate(r["positions"].items()):
            xs = [math.sqrt(max(1, b["start"]) * b["end"]) for b in buckets]
            ax.errorbar(xs, [b["ratio"] for b in buckets],
                        yerr=[b["se"] or 0 for b in buckets], marker="o", color=f"C{k}",
                        linestyle=styles[n % len(styles)], label=f"{r['label']} ({d})")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("token position (bucket centre)")
    ax.set_ylabel("perplexity ratio")
    ax.set_title("perplexity by position in long windows")
    ax.legend(fontsize=7)
    ax = axes[2]
    for k, r in enumerate(rows):
        lengths = list(r["passkey"])
        if lengths:
            color = "k" if k == 0 else f"C{k - 1}"
            ax.plot([int(n) for n in lengths], [r["passkey"][n]["value"] for n in lengths],
                    marker="o", label=r["label"], color=color)
            cued = [n for n in lengths if "cued" in r["passkey"][n]]
            if cued:
                ax.plot([int(n) for n in cued], [r["passkey"][n]["cued"]["value"] for n in cued],
                        marker="x", linestyle="--", color=color, alpha=0.7)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("passkey accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("passkey retrieval (dashed: answer cued)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_report(models: list[str], labels: list[str] | None, opts: QualityOptions, out: Path,
               use_cache: bool = True, log: Any = print) -> dict[str, Any]:
    """Measure (or reuse) every model, then write quality.json/.md/.png under ``out``."""
    check_options(opts)
    if not models:
        raise UserError("give at least one model (the first is the reference)")
    labels = labels or [Path(m).name if Path(m).exists() else m for m in models]
    if len(labels) != len(models):
        raise UserError(f"{len(labels)} labels for {len(models)} models")
    if len(set(labels)) != len(labels):
        raise UserError(f"labels must differ: {labels}")
    t0 = time.time()
    payloads = [measure(m, lab, opts, out / "runs", use_cache, log)
                for m, lab in zip(models, labels, strict=True)]
    summary = summarize(payloads)
    summary["seconds"] = time.time() - t0
    summary["seconds_measured"] = sum(p["seconds"] for p in payloads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "quality.md").write_text(markdown(summary))
    plot(summary, out / "quality.png")
    return summary
