"""Run a model through vLLM's offline engine and write what it did as JSON.

Used by the tests (vLLM's ``LLM`` must be started from a ``__main__`` module on CPU, where
workers are spawned) and handy by hand::

    python tests/probe.py --model DIR --prompts prompts.json \\
        --max-tokens 32 --prompt-logprobs --out result.json

``prompts.json`` is a list of prompts, each a string or a list of token ids. Output: the
engine's KV-cache capacity (blocks x block size), and per prompt the greedy token ids and
(optionally) the log-probability of each prompt token given the ones before it. A failure
to start is written as ``{"ok": false, "error": ...}`` with exit status 1.

``--try-models FILE`` (a JSON list of model directories) instead starts an engine on each in
turn in this one process, with the in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
and writes per model whether vLLM accepted it and the error if not: one vLLM import and
plugin registration for many checkpoints that must be refused at load time.

``--models FILE`` (a JSON list of model directories) does a whole ``--model`` run on each in
turn in this one process (single rank, in process), with the same prompts and flags, and
writes ``{"ok": true, "runs": [result of each, in order]}``: one vLLM import for many small
engines.

``--tensor-parallel-size`` / ``--pipeline-parallel-size`` run vLLM's multi-process executor
(``mp``; on CPU set ``VLLM_CPU_OMP_THREADS_BIND``, e.g. "0|1", one core list per rank), and
``--rank-info`` adds what every worker holds: its TP/PP rank, the decoder layers it builds
(pruned or not) and the KV-cache spec of each attention layer it registered (KV heads on
that rank, bytes per block), plus its number of KV-cache blocks.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import traceback
from pathlib import Path

from harp_vllm.serving.kv_capacity import kv_groups


def kv_cache_tokens(llm) -> dict:
    cache = llm.llm_engine.vllm_config.cache_config
    blocks = int(cache.num_gpu_blocks or 0)
    return {"num_gpu_blocks": blocks, "block_size": int(cache.block_size),
            "kv_cache_tokens": blocks * int(cache.block_size), **kv_groups(llm)}


def make_llm(model: str, max_model_len: int, **kw):
    """vLLM's LLM, fp32, eager, no prefix caching unless ``kw`` says otherwise."""
    from vllm import LLM

    args = dict(dtype="float32", enforce_eager=True, enable_prefix_caching=False, seed=0)
    args.update(kw)
    return LLM(model=model, max_model_len=max_model_len, **args)


def engine_settings(llm) -> dict:
    cfg = llm.llm_engine.vllm_config
    return {"enforce_eager": bool(cfg.model_config.enforce_eager),
            "compilation_mode": getattr(cfg.compilation_config.mode, "name",
                                        str(cfg.compilation_config.mode)),
            "enable_prefix_caching": bool(cfg.cache_config.enable_prefix_caching),
            "enable_chunked_prefill": bool(cfg.scheduler_config.enable_chunked_prefill),
            "max_num_batched_tokens": int(cfg.scheduler_config.max_num_batched_tokens),
            "kv_cache_dtype": str(cfg.cache_config.cache_dtype)}


def worker_info(worker) -> dict:
    """Runs in each worker (``collective_rpc``): what this rank holds, as plain JSON."""
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

    runner = worker.model_runner
    model = runner.get_model()
    inner = getattr(model, "model", model)
    start, end = int(getattr(inner, "start_layer", 0)), int(getattr(inner, "end_layer", 0))
    attn = {}
    for name, spec in runner.get_kv_cache_spec().items():
        attn[name] = {"num_kv_heads": int(spec.num_kv_heads), "head_size": int(spec.head_size),
                      "block_size": int(spec.block_size),
                      "page_size_bytes": int(spec.page_size_bytes)}
    layers = {}
    for i in range(start, end):
        sa = getattr(inner.layers[i], "self_attn", None)
        layers[str(i)] = type(sa).__name__ if sa is not None else None
    cfg = getattr(runner, "kv_cache_config", None)
    return {"tp_rank": int(get_tensor_model_parallel_rank()),
            "pp_rank": int(get_pp_group().rank_in_group),
            "start_layer": start, "end_layer": end, "attention_modules": layers,
            "kv_cache_spec": attn,
            "num_blocks": None if cfg is None else int(cfg.num_blocks),
            "kv_cache_memory_bytes": worker.cache_config.kv_cache_memory_bytes}


def run(args: argparse.Namespace) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(Path(args.prompts).read_text()) if args.prompts else []
    kw: dict = {}
    if args.tensor_parallel_size > 1 or args.pipeline_parallel_size > 1:
        kw = {"tensor_parallel_size": args.tensor_parallel_size,
              "pipeline_parallel_size": args.pipeline_parallel_size,
              "distributed_executor_backend": "mp"}
    if args.vllm_defaults:  # vLLM's default compilation, prefix caching, chunked prefill
        kw.update(enforce_eager=False, enable_prefix_caching=True, enable_chunked_prefill=True)
    if args.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.kv_cache_dtype:
        kw["kv_cache_dtype"] = args.kv_cache_dtype
    llm = make_llm(args.model, args.max_model_len, **kw)
    out: dict = {"ok": True, **kv_cache_tokens(llm),
                 "architectures": list(llm.llm_engine.vllm_config.model_config.architectures),
                 "tensor_parallel_size": args.tensor_parallel_size,
                 "pipeline_parallel_size": args.pipeline_parallel_size,
                 **engine_settings(llm)}
    if args.rank_info:
        out["ranks"] = llm.collective_rpc(worker_info)
    if prompts:
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                                prompt_logprobs=0 if args.prompt_logprobs else None)
        inputs = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p
                  for p in prompts]
        results = []
        for r in llm.generate(inputs, params, use_tqdm=False):
            item = {"prompt_token_ids": list(r.prompt_token_ids),
                    "token_ids": list(r.outputs[0].token_ids),
                    "num_cached_tokens": getattr(r, "num_cached_tokens", None)}
            if args.prompt_logprobs:
                lps = []
                for tok, d in zip(r.prompt_token_ids, r.prompt_logprobs or [], strict=False):
                    lps.append(None if d is None else float(d[tok].logprob))
                item["prompt_logprobs"] = lps
            results.append(item)
        out["results"] = results
        if args.second_pass:  # again, without prompt logprobs: prefix-cache hits allowed
            again = SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                   ignore_eos=True)
            out["second_pass"] = [
                {"token_ids": list(r.outputs[0].token_ids),
                 "num_cached_tokens": getattr(r, "num_cached_tokens", None)}
                for r in llm.generate(inputs, again, use_tqdm=False)]
    return out


def run_models(args: argparse.Namespace) -> dict:
    """``run`` on each model of ``args.models`` in turn; a model that fails is recorded as
    ``{"ok": false, "error": ...}`` and the next one still runs."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    runs = []
    for model in json.loads(Path(args.models).read_text()):
        print(f"=== probe: {model}", file=sys.stderr, flush=True)
        try:
            runs.append({"model": model, **run(argparse.Namespace(**{**vars(args),
                                                                      "model": model}))})
        except Exception as e:
            traceback.print_exc()
            runs.append({"model": model, "ok": False, "error": f"{type(e).__name__}: {e}"})
        gc.collect()
        cleanup_dist_env_and_memory()  # the next engine starts from a clean distributed state
    return {"ok": True, "runs": runs}


def try_models(args: argparse.Namespace) -> dict:
    """Start an engine on each model of ``args.try_models`` in turn; record accepted/refused."""
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    runs = []
    for model in json.loads(Path(args.try_models).read_text()):
        llm = None
        try:
            llm = make_llm(model, args.max_model_len)
            runs.append({"model": model, "ok": True})
        except Exception as e:
            traceback.print_exc()
            runs.append({"model": model, "ok": False, "error": f"{type(e).__name__}: {e}"})
        del llm
        cleanup_dist_env_and_memory()  # the next engine starts from a clean distributed state
    return {"ok": True, "runs": runs}


def launch(flags: list[str], workdir: Path, env: dict[str, str], timeout: float
           ) -> tuple[dict, str]:
    """Run this probe in a subprocess (the tests' way to start vLLM) with ``flags`` and
    ``--out workdir/result.json``, in ``workdir`` with exactly ``env``; returns (the result
    JSON, the run's stdout + stderr, also kept in ``workdir/log.txt``)."""
    import subprocess

    out = workdir / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *flags, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout)
    log = proc.stdout + "\n" + proc.stderr
    (workdir / "log.txt").write_text(log)
    result = json.loads(out.read_text()) if out.is_file() else {
        "ok": False, "error": f"probe exited {proc.returncode} without a result"}
    return result, log


KV_SPACE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE of every engine run_engine starts


def run_engine(model: Path | list[Path], workdir: Path, prompts: list, *, tp: int = 1,
               pp: int = 1, max_model_len: int = 512, timeout: float = 1200,
               extra: tuple[str, ...] = (), in_process: bool | None = None
               ) -> tuple[dict, str]:
    """One engine run of this probe with per-rank information (``--rank-info``): 32 greedy
    tokens and the prompt logprobs of each of ``prompts``. A list of models: a ``--models``
    run, one engine after the other in one process (single rank, in process).

    A single-rank engine runs in process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: it starts
    fast) unless ``in_process`` is False; a parallel one runs vLLM's default multi-process
    engine with one worker per rank. ``extra``: more probe flags.
    """
    import os

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prompts.json").write_text(json.dumps(prompts))
    if isinstance(model, list):
        assert tp * pp == 1 and in_process is not False, "--models runs single-rank, in process"
        (workdir / "models.json").write_text(json.dumps([str(m) for m in model]))
        which = ["--models", str(workdir / "models.json")]
    else:
        which = ["--model", str(model)]
    flags = [*which, "--prompts", str(workdir / "prompts.json"),
             "--max-tokens", "32", "--max-model-len", str(max_model_len), "--prompt-logprobs",
             "--rank-info", "--tensor-parallel-size", str(tp), "--pipeline-parallel-size",
             str(pp), *extra]
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_PLUGINS",
                        "VLLM_CPU_OMP_THREADS_BIND", "VLLM_PP_LAYER_PARTITION")}
    env.update(VLLM_CPU_KVCACHE_SPACE=str(KV_SPACE_GIB), TOKENIZERS_PARALLELISM="false")
    if tp * pp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % 2) for i in range(tp * pp))
    if in_process is None:
        in_process = tp * pp == 1
    if in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    else:
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # --rank-info sends a function
    return launch(flags, workdir, env, timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--models", help="JSON file: list of model directories, each run in "
                                      "turn in this process like --model")
    ap.add_argument("--try-models", help="JSON file: list of model directories to start in "
                                         "turn, each recorded as accepted or refused")
    ap.add_argument("--prompts", help="JSON file: list of strings or token-id lists")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--prompt-logprobs", action="store_true")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--pipeline-parallel-size", type=int, default=1)
    ap.add_argument("--vllm-defaults", action="store_true",
                    help="no --enforce-eager (vLLM's default compilation), prefix caching and "
                         "chunked prefill on")
    ap.add_argument("--max-num-batched-tokens", type=int,
                    help="tokens per engine step (a smaller value splits long prompts)")
    ap.add_argument("--kv-cache-dtype", help="e.g. fp8")
    ap.add_argument("--second-pass", action="store_true",
                    help="generate the prompts again without prompt logprobs (prefix cache)")
    ap.add_argument("--rank-info", action="store_true",
                    help="per worker: ranks, layers, KV-cache specs (a callable sent to the "
                         "workers: needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 with "
                         "multiprocessing)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if sum(map(bool, (args.model, args.models, args.try_models))) != 1:
        ap.error("one of --model, --models or --try-models is required")
    try:
        result = (try_models(args) if args.try_models else run_models(args) if args.models
                  else run(args))
        code = 0
    except Exception as e:  # reported to the caller, which checks the message
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        code = 1
    Path(args.out).write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
