"""Aggregate the runs (medians over repeats, paired pruned/dense ratios) and write the outputs:
``results.json`` (raw, with every request), ``report.md`` and PNG plots."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

SIDES = ("dense", "pruned")
RATIO_METRICS = ("total_tps", "output_tps", "ttft_p50_ms", "tpot_p50_ms", "e2el_p50_ms")
KV_FULL = 0.9  # a server "queues for KV" when requests wait while its KV cache is this full
PLOTS = {"throughput_ratio": "throughput_ratio.png", "ttft": "ttft.png",
         "capacity": "capacity.png"}


def _spread(values: list) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def _sum(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) if vals else None


def _max(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def aggregate_side(runs: list[dict]) -> dict:
    """Median and spread over repeats of each stat; server deltas summed, peaks maxed."""
    keys = [k for k in runs[0]["stats"] if k not in ("ok", "failed")]
    agg: dict[str, Any] = {
        "runs": len(runs),
        "ok": sum(r["stats"]["ok"] for r in runs),
        "failed": sum(r["stats"]["failed"] for r in runs),
    }
    for k in keys:
        agg[k] = _spread([r["stats"][k] for r in runs])
    srv = [r["server"] for r in runs]
    agg["server"] = {
        "preemptions": _sum([s.get("preemptions") for s in srv]),
        "prefix_cache_hits": _sum([s.get("prefix_cache_hits") for s in srv]),
        "generation_tokens": _sum([s.get("generation_tokens") for s in srv]),
        "prompt_tokens": _sum([s.get("prompt_tokens") for s in srv]),
        "waiting_peak": _max([s.get("waiting_peak") for s in srv]),
        "running_peak": _max([s.get("running_peak") for s in srv]),
        "kv_cache_usage_peak": _max([s.get("kv_cache_usage_peak") for s in srv]),
    }
    return agg


def _ratio(a, b):
    if a is None or b is None or a == 0:
        return None
    return b / a


def summarize(results: dict) -> dict:
    """Per (scenario, prompt length, concurrency): each side's aggregate and paired ratios."""
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for run in results.get("runs", []):
        key = (run["scenario"], run["prompt_len"], run["concurrency"])
        groups[key][run["endpoint"]].append(run)
    points = []
    for (scenario, plen, conc), sides in sorted(groups.items()):
        pt: dict[str, Any] = {"scenario": scenario, "prompt_len": plen, "concurrency": conc}
        for side in SIDES:
            if sides.get(side):
                pt[side] = aggregate_side(sides[side])
        by_rep = {side: {r["repeat"]: r["stats"] for r in sides.get(side, [])} for side in SIDES}
        reps = sorted(set(by_rep["dense"]) & set(by_rep["pruned"]))
        pt["ratio"] = {m: _spread([_ratio(by_rep["dense"][r][m], by_rep["pruned"][r][m])
                                   for r in reps]) for m in RATIO_METRICS}
        pt["pairs"] = len(reps)
        points.append(pt)
    summary = {"points": points, "checks": checks(results),
               "pruned_root": results.get("endpoints", {}).get("pruned", {}).get("root"),
               "output_len": results.get("config", {}).get("output_len")}
    summary["capacity"] = capacity_summary([p for p in points if p["scenario"] == "capacity"])
    return summary


def checks(results: dict) -> dict:
    """Client-side validation: ok requests got exactly their tokens; server counters agree."""
    out = {}
    out_len = results.get("config", {}).get("output_len")
    for side in SIDES:
        runs = [r for r in results.get("runs", []) if r["endpoint"] == side]
        reqs = [q for r in runs for q in r["requests"]]
        ok = [q for q in reqs if q["ok"]]
        srv_gen = [r["server"].get("generation_tokens") for r in runs]
        srv_prompt = [r["server"].get("prompt_tokens") for r in runs]
        out[side] = {
            "requests": len(reqs), "ok": len(ok), "failed": len(reqs) - len(ok),
            "ok_with_exact_output_tokens": sum(q["output_tokens"] == out_len for q in ok),
            "client_output_tokens": sum(q["output_tokens"] for q in ok),
            "client_prompt_tokens": sum(q["prompt_tokens"] for q in ok),
            "server_generation_tokens": None if None in srv_gen else sum(srv_gen),
            "server_prompt_tokens": None if None in srv_prompt else sum(srv_prompt),
        }
    return out


def capacity_summary(points: list[dict]) -> dict:
    """Largest concurrency each side runs with every request ok and no preemption/queueing."""
    res = {}
    for side in SIDES:
        rows = [(p["concurrency"], p[side]) for p in points if side in p]
        best_np = best_nq = None
        for conc, agg in rows:
            clean = agg["failed"] == 0
            if clean and (agg["server"]["preemptions"] or 0) == 0:
                best_np = (conc, agg)
            if clean and (agg["server"]["preemptions"] or 0) == 0 and \
                    not kv_queued(agg["server"]):
                best_nq = (conc, agg)
        res[side] = {
            "max_concurrency_without_preemption": best_np[0] if best_np else None,
            "total_tps_there": _med(best_np[1]["total_tps"]) if best_np else None,
            "max_concurrency_without_kv_queueing": best_nq[0] if best_nq else None,
            "total_tps_without_kv_queueing": _med(best_nq[1]["total_tps"]) if best_nq else None,
            "tested": [c for c, _ in rows],
        }
    return res


def kv_queued(server: dict) -> bool:
    """Requests waited while the KV cache was (nearly) full: queueing for KV capacity."""
    return (server.get("waiting_peak") or 0) > 0 and \
        (server.get("kv_cache_usage_peak") or 0) >= KV_FULL


def _med(s: dict | None):
    return None if s is None else s["median"]


# ---------------------------------------------------------------------------- markdown

def _f(v, digits=1, pct=False) -> str:
    if v is None:
        return "n/a"
    if pct:
        return f"{100 * v:.0f}%"
    return f"{v:,.{digits}f}"


def _sp(s: dict | None, digits=1) -> str:
    if s is None:
        return "n/a"
    if s["n"] > 1:
        return f"{s['median']:,.{digits}f} [{s['min']:,.{digits}f}–{s['max']:,.{digits}f}]"
    return f"{s['median']:,.{digits}f}"


def _pcts(agg: dict, name: str) -> str:
    return " / ".join(_f(_med(agg.get(f"{name}_p{p}_ms")), 0) for p in (50, 90, 99))


def _side_table(points: list[dict], side: str) -> list[str]:
    lines = ["| prompt tokens | concurrency | ok / failed | TTFT p50/p90/p99 ms | TPOT p50 ms "
             "| ITL p50/p90/p99 ms | E2E p50/p90/p99 ms | output tok/s | total tok/s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        a = p.get(side)
        if not a:
            continue
        lines.append(f"| {p['prompt_len']} | {p['concurrency']} | {a['ok']} / {a['failed']} | "
                     f"{_pcts(a, 'ttft')} | {_f(_med(a.get('tpot_p50_ms')), 0)} | "
                     f"{_pcts(a, 'itl')} | {_pcts(a, 'e2el')} | "
                     f"{_sp(a['output_tps'])} | {_sp(a['total_tps'])} |")
    return lines


def _server_table(points: list[dict]) -> list[str]:
    lines = ["| prompt tokens | concurrency | side | preemptions | peak waiting | peak running "
             "| peak KV-cache use | prefix-cache hit tokens |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for p in points:
        for side in SIDES:
            if side not in p:
                continue
            s = p[side]["server"]
            lines.append(f"| {p['prompt_len']} | {p['concurrency']} | {side} | "
                         f"{_f(s['preemptions'], 0)} | {_f(s['waiting_peak'], 0)} | "
                         f"{_f(s['running_peak'], 0)} | {_f(s['kv_cache_usage_peak'], pct=True)} "
                         f"| {_f(s['prefix_cache_hits'], 0)} |")
    return lines


def markdown(results: dict, summary: dict, command: str | None = None,
             plots: dict | None = None) -> str:
    """The Markdown report (long: one section after another, in the order they are read)."""
    cfg = results.get("config", {})
    status = results.get("status")
    L = ["# HARP load test: dense vs pruned", ""]
    if status != "complete":
        L += [f"**Partial report — run {status}: {results.get('message') or ''}**", ""]
    if command:
        L += ["Command:", "", "```", command, "```", ""]
    L += [f"Started {results.get('started')}, finished {results.get('finished')}. "
          f"Prompts: {cfg.get('data_file') or cfg.get('data')} text, exact token counts "
          f"(tokenizer `{results.get('tokenizer')}`), a unique prefix per request; "
          f"{cfg.get('output_len')} output tokens (ignore_eos, temperature "
          f"{cfg.get('temperature')}), streaming completions. Runs alternate dense, pruned for "
          f"each point; {cfg.get('repeats')} repeat(s). Values are medians over repeats; "
          "[min–max] shows the spread. TPOT is a request's (latency - TTFT) / (output "
          "tokens - 1); ITL is the gap between streamed chunks as the client saw them (chunks "
          "that arrive together give near-zero gaps on a busy client).", ""]
    eps = results.get("endpoints", {})
    if eps:
        L += ["| side | URL | model | KV-cache tokens | KV-cache blocks | KV-cache bytes |",
              "|---|---|---|---:|---:|---:|"]
        for side in SIDES:
            e = eps.get(side)
            if e:
                ci = e.get("cache_info") or {}
                L.append(f"| {side} | {e['url']} | {e['model']} | "
                         f"{ci.get('kv_cache_size_tokens', 'n/a')} | "
                         f"{ci.get('num_gpu_blocks', 'n/a')} | "
                         f"{ci.get('kv_cache_memory_bytes', 'n/a')} |")
        L.append("")
    for note in results.get("notes", []):
        L.append(f"- note: {note}")
    if results.get("notes"):
        L.append("")
    sweep = [p for p in summary["points"] if p["scenario"] == "sweep"]
    if sweep:
        L += ["## Pruned / dense ratios", "",
              "Median of the paired per-repeat ratios [min–max]. Throughput above 1 and "
              "latency below 1 favour the pruned model.", "",
              "| prompt tokens | concurrency | total tok/s | output tok/s | TTFT p50 | TPOT p50 "
              "| E2E p50 |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for p in sweep:
            r = p["ratio"]
            L.append(f"| {p['prompt_len']} | {p['concurrency']} | " + " | ".join(
                _sp(r[m], 2) for m in RATIO_METRICS) + " |")
        L += ["", "## Dense", "", *_side_table(sweep, "dense"), "",
              "## Pruned", "", *_side_table(sweep, "pruned"), "",
              "## Server metrics", "",
              "From each server's `/metrics`: counter deltas summed over the runs of a point, "
              "gauges sampled every 0.5 s during the runs (peak).", "",
              *_server_table(sweep), ""]
    cap = [p for p in summary["points"] if p["scenario"] == "capacity"]
    if cap:
        L += ["## Capacity", "",
              f"Prompts of {cap[0]['prompt_len']} tokens at rising concurrency "
              f"({cfg.get('capacity_waves')} request(s) per concurrency slot); both servers "
              "should have the same KV-cache budget (see the table above). \"Queueing for KV\" "
              f"means requests waited while the KV cache was at least {KV_FULL:.0%} full.", "",
              "| concurrency | dense total tok/s | dense preemptions | dense peak waiting "
              "| dense peak KV | pruned total tok/s | pruned preemptions | pruned peak waiting "
              "| pruned peak KV | ratio tok/s |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
              "---:|"]
        for p in cap:
            cells = []
            for side in SIDES:
                a = p.get(side)
                if not a:
                    cells += ["n/a"] * 4
                    continue
                s = a["server"]
                tps = _f(_med(a["total_tps"]))
                if a["failed"]:
                    tps += f" ({a['failed']} failed)"
                cells += [tps, _f(s["preemptions"], 0), _f(s["waiting_peak"], 0),
                          _f(s["kv_cache_usage_peak"], pct=True)]
            cells.append(_sp(p["ratio"]["total_tps"], 2))
            L.append(f"| {p['concurrency']} | " + " | ".join(cells) + " |")
        L.append("")
        for side in SIDES:
            c = summary["capacity"][side]
            L.append(f"- {side}: largest concurrency without preemption "
                     f"{c['max_concurrency_without_preemption'] or 'none'} "
                     f"({_f(c['total_tps_there'])} tok/s); without queueing for KV "
                     f"{c['max_concurrency_without_kv_queueing'] or 'none'} "
                     f"({_f(c['total_tps_without_kv_queueing'])} tok/s); tested "
                     f"{', '.join(map(str, c['tested']))}.")
        L.append("")
    ch = summary["checks"]
    L += ["## Checks", ""]
    for side in SIDES:
        c = ch[side]
        L.append(f"- {side}: {c['requests']} requests, {c['ok']} ok, {c['failed']} failed; "
                 f"{c['ok_with_exact_output_tokens']} ok requests got exactly "
                 f"{cfg.get('output_len')} output tokens; output tokens counted by the client "
                 f"{c['client_output_tokens']}, by the server "
                 f"{_f(c['server_generation_tokens'], 0)}.")
    L.append("")
    if plots:
        L += ["## Plots", ""]
        for name, path in plots.items():
            L.append(f"![{name}]({Path(path).name})")
        L.append("")
    return "\n".join(L)


# ---------------------------------------------------------------------------- plots

def predicted_ratios(summary: dict, prompt_lens: list[int]) -> dict[int, float]:
    """The cost model's pruned/dense request-throughput ratio per prompt length, when the
    pruned endpoint serves a local checkpoint directory (else empty)."""
    from harp_vllm.pruning.costs import checkpoint_shapes, request_speedup

    root = (summary.get("pruned_root") or "")
    found = checkpoint_shapes(root) if root else None
    if found is None:
        return {}
    cfg, shapes = found
    out_len = int(summary.get("output_len") or 1)
    return {n: request_speedup(cfg, shapes, n, out_len) for n in prompt_lens}


def plot(summary: dict, out_dir: Path) -> dict:
    """Write the PNG plots that have data; returns {name: path}. (Long: one short block per
    plot, kept together so the figures share their styling.)"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = {}
    sweep = [p for p in summary["points"] if p["scenario"] == "sweep"]
    concs = sorted({p["concurrency"] for p in sweep})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    def series(c, getter):
        xs, ys, lo, hi = [], [], [], []
        for p in sweep:
            if p["concurrency"] != c:
                continue
            s = getter(p)
            if s is None:
                continue
            xs.append(p["prompt_len"])
            ys.append(s["median"])
            lo.append(s["median"] - s["min"])
            hi.append(s["max"] - s["median"])
        return xs, ys, [lo, hi]

    if any(p["ratio"]["total_tps"] for p in sweep):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, c in enumerate(concs):
            xs, ys, err = series(c, lambda p: p["ratio"]["total_tps"])
            if xs:
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=colors[i % 10],
                            label=f"concurrency {c}")
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        pred = predicted_ratios(summary, sorted({p["prompt_len"] for p in sweep}))
        if pred:
            ax.plot(list(pred), list(pred.values()), "k--", lw=1.2,
                    label="cost model (harp_vllm.pruning.costs)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("pruned / dense total tokens/s")
        ax.set_title("Throughput ratio vs prompt length")
        ax.legend()
        fig.tight_layout()
        written["throughput_ratio"] = out_dir / PLOTS["throughput_ratio"]
        fig.savefig(written["throughput_ratio"], dpi=110)
        plt.close(fig)

    if sweep:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = False
        for i, c in enumerate(concs):
            for side, ls in (("dense", "-"), ("pruned", "--")):
                xs, ys, err = series(c, lambda p, s=side: (p.get(s) or {}).get("ttft_p50_ms"))
                if xs:
                    drawn = True
                    ax.errorbar(xs, ys, yerr=err, marker="o", ls=ls, capsize=3,
                                color=colors[i % 10], label=f"{side}, concurrency {c}")
        if drawn:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("prompt tokens")
            ax.set_ylabel("TTFT p50 (ms)")
            ax.set_title("Time to first token vs prompt length")
            ax.legend(fontsize=8)
            fig.tight_layout()
            written["ttft"] = out_dir / PLOTS["ttft"]
            fig.savefig(written["ttft"], dpi=110)
        plt.close(fig)

    cap = [p for p in summary["points"] if p["scenario"] == "capacity"]
    if cap:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, side in enumerate(SIDES):
            pts = [(p["concurrency"], p[side]) for p in cap if side in p]
            xs = [c for c, a in pts if a["total_tps"]]
            ys = [a["total_tps"]["median"] for _, a in pts if a["total_tps"]]
            ax.plot(xs, ys, marker="o", color=colors[i], label=side)
            pre = [(c, a["total_tps"]["median"]) for c, a in pts
                   if a["total_tps"] and (a["server"]["preemptions"] or 0) > 0]
            que = [(c, a["total_tps"]["median"]) for c, a in pts
                   if a["total_tps"] and kv_queued(a["server"])]
            if que:
                ax.scatter([c for c, _ in que], [t for _, t in que], s=140,
                           facecolors="none", edgecolors=colors[i], label=f"{side}: queued for KV")
            if pre:
                ax.scatter([c for c, _ in pre], [t for _, t in pre], s=90, marker="x",
                           color=colors[i], label=f"{side}: preemptions")
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("total tokens/s")
        ax.set_title(f"Capacity at {cap[0]['prompt_len']}-token prompts")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written["capacity"] = out_dir / PLOTS["capacity"]
        fig.savefig(written["capacity"], dpi=110)
        plt.close(fig)
    return written


# ---------------------------------------------------------------------------- all outputs

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
