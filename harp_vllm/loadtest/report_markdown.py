"""The Markdown report of a load test (``report.md``)."""

from __future__ import annotations

from pathlib import Path

from .summary import KV_FULL, RATIO_METRICS, SIDES, med


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
    return " / ".join(_f(med(agg.get(f"{name}_p{p}_ms")), 0) for p in (50, 90, 99))


def _side_table(points: list[dict], side: str) -> list[str]:
    lines = ["| prompt tokens | concurrency | ok / failed | TTFT p50/p90/p99 ms | TPOT p50 ms "
             "| ITL p50/p90/p99 ms | E2E p50/p90/p99 ms | output tok/s | total tok/s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        a = p.get(side)
        if not a:
            continue
        lines.append(f"| {p['prompt_len']} | {p['concurrency']} | {a['ok']} / {a['failed']} | "
                     f"{_pcts(a, 'ttft')} | {_f(med(a.get('tpot_p50_ms')), 0)} | "
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
                tps = _f(med(a["total_tps"]))
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
