"""Checks of `make compose-test` (scripts/compose_test.sh) against the running compose stack.

Standard library only: it runs with the host's python3, outside the project's virtualenv and
outside the containers. Each subcommand prints what it found and exits non-zero with a message
naming what is wrong.

  loadtest DIR PLAN_JSON            the load test's results.json: complete, zero failed
                                    requests, and the KV-cache capacity ratio equal to the
                                    checkpoint's KV bytes per token ratio within block rounding
                                    (not for sliding-window models: said, not checked)
  prometheus URL DASHBOARD          every scrape target up; harp_*, vllm:* and gateway series
                                    from the targets that export them; every metric the Grafana
                                    dashboard queries is one Prometheus really scraped
  backend-up URL NAME [0|1] SECS    wait until the gateway's /metrics reports
                                    harp_gateway_backend_up{backend=NAME} == value
"""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path


class CheckError(Exception):
    pass


def get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def prom(base: str, path: str, **params: str) -> object:
    url = base.rstrip("/") + path
    if params:
        url += "?" + urllib.parse.urlencode(params)
    body = json.loads(get(url))
    if body.get("status") != "success":
        raise CheckError(f"Prometheus {path}: {body}")
    return body["data"]


# -- load test ------------------------------------------------------------------------------

def check_loadtest(out_dir: str, plan_json: str) -> None:
    res = json.loads((Path(out_dir) / "results.json").read_text())
    if res.get("status") != "complete":
        raise CheckError(f"load test status {res.get('status')!r}: {res.get('message')}")
    reqs = {"dense": [0, 0], "pruned": [0, 0]}
    for run in res.get("runs", []):
        for q in run["requests"]:
            reqs[run["endpoint"]][0 if q["ok"] else 1] += 1
    for side, (ok, failed) in reqs.items():
        print(f"  {side}: {ok} requests ok, {failed} failed")
        if failed or not ok:
            raise CheckError(f"{side}: {failed} failed requests of {ok + failed}")
    info = {side: res["endpoints"][side].get("cache_info") or {} for side in ("dense", "pruned")}
    tokens = {s: int(info[s]["kv_cache_size_tokens"]) for s in info}
    blocks = {s: int(info[s]["num_gpu_blocks"]) for s in info}
    block = tokens["dense"] // blocks["dense"]
    costs = json.loads(Path(plan_json).read_text())["costs"]
    unwindowed = costs.get("kv_bytes_per_token_unwindowed", costs["kv_bytes_per_token_dense"])
    if unwindowed != costs["kv_bytes_per_token_dense"]:
        # Sliding-window layers (Gemma 3): vLLM's hybrid pool shares blocks between KV groups
        # of a size that depends on the layout, and its token count is not a capacity, so the
        # blocks cannot be compared with bytes per token. The engine tests check the capacity
        # (tests/test_gemma3.py); the load test's peak running requests show the admission.
        served = costs.get("kv_saving_served")
        print(f"  KV cache: hybrid pool (sliding windows): dense {blocks['dense']} blocks, "
              f"pruned {blocks['pruned']}; the plan's served saving at "
              f"{costs.get('kv_context')} tokens is {served} (capacity ratio "
              f"{1 / (1 - served):.4f}); not checked here" if served is not None else
              "  KV cache: hybrid pool (sliding windows): not checked here")
        return
    expected = costs["kv_bytes_per_token_dense"] / costs["kv_bytes_per_token"]
    ratio = tokens["pruned"] / tokens["dense"]
    # Each side rounds its capacity down to whole blocks: with the same KV memory, dense holds
    # x blocks' worth (db = floor(x)) and pruned floor(x * r), so pruned lies in
    # [db * r - 1, (db + 1) * r].
    lo, hi = blocks["dense"] * expected - 1.0, (blocks["dense"] + 1) * expected
    print(f"  KV-cache tokens: dense {tokens['dense']} ({blocks['dense']} blocks of {block}), "
          f"pruned {tokens['pruned']} ({blocks['pruned']} blocks): ratio {ratio:.4f}; "
          f"KV bytes per token {costs['kv_bytes_per_token_dense']} / "
          f"{costs['kv_bytes_per_token']} = {expected:.4f} (pruned blocks within block "
          f"rounding: {lo:.1f} .. {hi:.1f})")
    if not (lo - 1e-9 <= blocks["pruned"] <= hi + 1e-9):
        raise CheckError(f"KV-capacity ratio {ratio:.4f} is not the checkpoint's {expected:.4f} "
                         f"within block rounding ({blocks['pruned']} blocks, expected "
                         f"{lo:.1f} .. {hi:.1f})")


# -- Prometheus ---------------------------------------------------------------------------------

def dashboard_metrics(path: str) -> set[str]:
    """Metric names the dashboard's PromQL queries (histogram suffixes stripped)."""
    dash = json.loads(Path(path).read_text())
    exprs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(dash)
    names = set()
    for e in exprs:
        e = re.sub(r'"[^"]*"', '""', e)  # label values
        for m in re.finditer(r"\b((?:harp|vllm)[a-zA-Z0-9_:]*)", e):
            names.add(m.group(1))
    if not names:
        raise CheckError(f"no harp_* or vllm:* metric found in {path}")
    return names


def base_name(series: str) -> str:
    for suffix in ("_bucket", "_count", "_sum", "_created"):
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


def check_prometheus(url: str, dashboard: str) -> None:
    targets = prom(url, "/api/v1/targets")["activeTargets"]
    jobs = {}
    for t in targets:
        inst = t["labels"]["instance"]
        print(f"  target {t['labels']['job']}/{inst}: {t['health']}"
              + (f" ({t['lastError']})" if t.get("lastError") else ""))
        if t["health"] != "up":
            raise CheckError(f"scrape target {inst} is {t['health']}: {t.get('lastError')}")
        jobs.setdefault(t["labels"]["job"], []).append(inst)
    want = {"vllm": ["vllm-dense:8000", "vllm-harp:8000"], "gateway": ["gateway:8080"]}
    for job, insts in want.items():
        if sorted(jobs.get(job, [])) != sorted(insts):
            raise CheckError(f"job {job}: targets {jobs.get(job)}, expected {insts}")
    # Series per target, by prefix.
    need = {"vllm-dense:8000": ("harp_", "vllm:"), "vllm-harp:8000": ("harp_", "vllm:"),
            "gateway:8080": ("harp_gateway_",)}
    scraped: set[str] = set()
    for inst, prefixes in need.items():
        series = prom(url, "/api/v1/series", **{"match[]": f'{{instance="{inst}"}}'})
        names = {s["__name__"] for s in series}
        scraped |= {base_name(n) for n in names}
        for p in prefixes:
            got = sorted(n for n in names if n.startswith(p))
            print(f"  {inst}: {len(got)} {p}* series names (e.g. {', '.join(got[:3])})")
            if not got:
                raise CheckError(f"Prometheus has no {p}* series from {inst}")
    # Metadata (from # TYPE lines) names labelled metrics that have no sample yet, e.g. an error
    # counter before any error: the dashboard may query those too.
    meta = set(prom(url, "/api/v1/metadata"))
    dash = dashboard_metrics(dashboard)
    missing = sorted(n for n in dash if base_name(n) not in scraped and base_name(n) not in meta)
    no_sample = sorted(n for n in dash if base_name(n) not in scraped and n not in missing)
    if missing:
        raise CheckError("the Grafana dashboard queries metrics Prometheus never scraped: "
                         + ", ".join(missing))
    msg = f"  dashboard: all {len(dash)} metric names it queries were scraped"
    if no_sample:
        msg += f" ({len(no_sample)} declared, no sample yet: {', '.join(no_sample)})"
    print(msg)


# -- gateway --------------------------------------------------------------------------------

def backend_up(url: str, name: str, want: int, seconds: float) -> None:
    pat = re.compile(r'^harp_gateway_backend_up\{[^}]*backend="' + re.escape(name)
                     + r'"[^}]*\}\s+(\S+)$', re.M)
    deadline = time.monotonic() + seconds
    last = None
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        try:
            m = pat.search(get(url.rstrip("/") + "/metrics", timeout=5))
            last = float(m.group(1)) if m else None
        except OSError as e:
            last = f"unreachable: {e}"
        if last == want:
            print(f"  gateway: backend {name} up = {want} after {time.monotonic() - t0:.0f} s")
            return
        time.sleep(1)
    raise CheckError(f"gateway backend {name}: harp_gateway_backend_up stayed {last!r}, "
                     f"not {want}, for {seconds:.0f} s")


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["loadtest"] and len(argv) == 3:
            check_loadtest(argv[1], argv[2])
        elif argv[:1] == ["prometheus"] and len(argv) == 3:
            check_prometheus(argv[1], argv[2])
        elif argv[:1] == ["backend-up"] and len(argv) == 5:
            backend_up(argv[1], argv[2], int(argv[3]), float(argv[4]))
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except (CheckError, OSError, KeyError, ValueError) as e:
        print(f"check failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
