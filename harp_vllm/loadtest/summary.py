"""The runs of a load test aggregated: per point (scenario, prompt length, concurrency) each
side's medians and spread over repeats, the paired pruned/dense ratios, the client/server token
checks and the capacity scenario's limits."""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

SIDES = ("dense", "pruned")
RATIO_METRICS = ("total_tps", "output_tps", "ttft_p50_ms", "tpot_p50_ms", "e2el_p50_ms")
KV_FULL = 0.9  # a server "queues for KV" when requests wait while its KV cache is this full


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
            "total_tps_there": med(best_np[1]["total_tps"]) if best_np else None,
            "max_concurrency_without_kv_queueing": best_nq[0] if best_nq else None,
            "total_tps_without_kv_queueing": med(best_nq[1]["total_tps"]) if best_nq else None,
            "tested": [c for c, _ in rows],
        }
    return res


def kv_queued(server: dict) -> bool:
    """Requests waited while the KV cache was (nearly) full: queueing for KV capacity."""
    return (server.get("waiting_peak") or 0) > 0 and \
        (server.get("kv_cache_usage_peak") or 0) >= KV_FULL


def med(s: dict | None):
    """The median of a spread (``None`` when there is none)."""
    return None if s is None else s["median"]
