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

``launch`` (the tests' way to start vLLM) sends every run to a long-lived probe process
(``--serve``: one job per line on its standard input) started once per environment and test
session, so runs of the same environment pay for the probe's vLLM import once (a multi-process
engine's EngineCore and rank workers are still spawned fresh: vLLM's CPU platform spawns);
its memory is bounded (it exits after a job that leaves it above
``WORKER_MAX_RSS``, and the next job starts a new one). ``HARP_PROBE_WORKER=0``: a process
per run.

``--tensor-parallel-size`` / ``--pipeline-parallel-size`` run vLLM's multi-process executor
(``mp``; on CPU set ``VLLM_CPU_OMP_THREADS_BIND``, e.g. "0|1", one core list per rank), and
``--rank-info`` adds what every worker holds: its TP/PP rank, the decoder layers it builds
(pruned or not) and the KV-cache spec of each attention layer it registered (KV heads on
that rank, bytes per block), plus its number of KV-cache blocks.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import json
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Iterator
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


def shut_down(llm) -> None:
    """Stop ``llm``'s engine now (its EngineCore and rank workers, if any), not when it is
    collected: the long-lived probe worker goes on to the next job."""
    if llm is not None:
        llm.llm_engine.engine_core.shutdown()


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
                      "page_size_bytes": int(spec.page_size_bytes),
                      "sliding_window": getattr(spec, "sliding_window", None)}
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
    """``--model``'s run: one engine on ``args.model``, shut down after its measurements."""
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
    try:
        return _run_on(llm, args, prompts)
    finally:
        shut_down(llm)


def _run_on(llm, args: argparse.Namespace, prompts: list) -> dict:
    """``run``'s measurements on the started engine ``llm``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

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
        shut_down(llm)
        del llm
        cleanup_dist_env_and_memory()  # the next engine starts from a clean distributed state
    return {"ok": True, "runs": runs}


@contextlib.contextmanager
def family_added(module: str | None) -> Iterator[None]:
    """With ``module``: its ``FAMILY`` record is one of ``harp_vllm.families.FAMILIES`` during
    the block (its architecture registered with vLLM now: a long-lived worker registered the
    plugin's before), and its directory on ``PYTHONPATH`` (vLLM inspects a registered model
    class in a subprocess, which imports its module too); all as before afterwards."""
    if module is None:
        yield
        return
    import importlib

    from harp_vllm import families
    from harp_vllm.vllm_plugin import register

    mod = importlib.import_module(module)
    saved = families.FAMILIES, os.environ.get("PYTHONPATH")
    families.FAMILIES = (*saved[0], mod.FAMILY)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(Path(mod.__file__).resolve().parent), *([saved[1]] if saved[1] else [])])
    try:
        register()
        yield
    finally:
        families.FAMILIES = saved[0]
        if saved[1] is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved[1]


WORKER_MAX_RSS = 6 << 30  # bytes: a worker above this after a job exits (a fresh one follows)


def serve() -> int:
    """``--serve``: run the jobs of standard input one after another in this process. A job is
    a JSON line ``{"argv": probe flags, "cwd": dir, "log": file, "done": file}``: its stdout
    and stderr go to ``log``; ``done`` gets ``{"code": exit status}`` when it is over."""
    import psutil

    for line in sys.stdin:
        job = json.loads(line)
        code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        with open(job["log"], "w") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                os.chdir(job["cwd"])
                code = main(job["argv"])
            except BaseException:  # argparse's SystemExit too: reported, the worker goes on
                traceback.print_exc()
            finally:
                gc.collect()
                with _suppress():
                    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                    cleanup_dist_env_and_memory()
                _stop_children(psutil.Process())
                multiprocessing.active_children()  # reaps the engine's exited processes
                rss = psutil.Process().memory_info().rss
                print(f"probe worker: job done (exit {code}), RSS {rss >> 20} MiB",
                      file=sys.stderr)
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
        done = Path(job["done"])
        done.with_suffix(".tmp").write_text(json.dumps({"code": code}))
        done.with_suffix(".tmp").replace(done)
        if rss > WORKER_MAX_RSS:
            return 0  # memory that a finished engine left behind: a new worker takes over
    return 0


def _stop_children(me) -> None:
    """Kill what a job left running under this worker (an engine whose shutdown failed), but
    multiprocessing's resource tracker, which serves every job."""
    for child in me.children(recursive=True):
        with _suppress():
            if "resource_tracker" not in " ".join(child.cmdline()):
                child.kill()
                print(f"probe worker: killed a left-over child {child.pid}", file=sys.stderr)


def _suppress():
    import contextlib

    return contextlib.suppress(Exception)


class Worker:
    """A ``--serve`` probe process with a fixed environment (parent side)."""

    def __init__(self, env: dict[str, str]):
        import subprocess
        import tempfile

        self.home = Path(tempfile.mkdtemp(prefix="harp-probe-worker-"))
        self.log = open(self.home / "worker.log", "w")  # noqa: SIM115 (open while it runs)
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve"], cwd=self.home,
            env=env, stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT,
            text=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, argv: list[str], workdir: Path, timeout: float) -> int | None:
        """The job's exit status; None if the worker died first. Past ``timeout`` the worker
        is stopped and ``subprocess.TimeoutExpired`` raised (as ``subprocess.run`` does)."""
        import subprocess

        done = workdir / "done.json"
        done.unlink(missing_ok=True)
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(workdir),
                                          "log": str(workdir / "log.txt"),
                                          "done": str(done)}) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while not done.exists():
            if not self.alive():
                return None if not done.exists() else json.loads(done.read_text())["code"]
            if time.monotonic() > deadline:
                self.stop()
                raise subprocess.TimeoutExpired(self.proc.args, timeout)
            time.sleep(0.05)
        return json.loads(done.read_text())["code"]

    def stop(self) -> None:
        """End of input: an idle worker exits; one that does not within a second (a job
        running, or vLLM's exit handlers) is killed (every job's engine was shut down after it)."""
        import subprocess

        if self.alive():
            assert self.proc.stdin is not None
            with _suppress():
                self.proc.stdin.close()
            try:
                self.proc.wait(1)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


_WORKERS: dict[tuple, Worker] = {}
# Variables the test process changes on its own (pytest per test; OpenCV's import, through
# transformers, extends the library path): not a reason for another worker.
_NOT_KEYS = {"PYTEST_CURRENT_TEST", "LD_LIBRARY_PATH"}


@atexit.register
def _stop_workers() -> None:
    for w in _WORKERS.values():
        w.stop()
    _WORKERS.clear()


def launch(flags: list[str], workdir: Path, env: dict[str, str], timeout: float
           ) -> tuple[dict, str]:
    """Run this probe (the tests' way to start vLLM) with ``flags`` and
    ``--out workdir/result.json``, in ``workdir`` with exactly ``env``; returns (the result
    JSON, the run's stdout + stderr, also kept in ``workdir/log.txt``), run in this
    environment's probe worker (``Worker``; ``HARP_PROBE_WORKER=0``: a new process). A
    multi-process engine's EngineCore and rank workers are spawned fresh as ever (vLLM's CPU
    platform spawns), so the worker saves the probe's own vLLM import, also for them."""
    import subprocess

    out = workdir / "result.json"
    argv = [*flags, "--out", str(out)]
    if os.environ.get("HARP_PROBE_WORKER", "1") != "0":
        key = tuple(sorted((k, v) for k, v in env.items() if k not in _NOT_KEYS))
        if key not in _WORKERS or not _WORKERS[key].alive():
            _WORKERS[key] = Worker(env)
        worker = _WORKERS[key]
        code = worker.run(argv, workdir, timeout)
        log = (workdir / "log.txt").read_text(errors="replace")
        if code is None:  # the worker died during the job: its exit status and last words
            log += (f"\nprobe worker exited {worker.proc.returncode}; its log:\n"
                    + (worker.home / "worker.log").read_text(errors="replace")[-5000:])
        status = f"probe worker job ended {code}"
    else:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv],
                              cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=timeout)
        log = proc.stdout + "\n" + proc.stderr
        (workdir / "log.txt").write_text(log)
        status = f"probe exited {proc.returncode}"
    result = json.loads(out.read_text()) if out.is_file() else {
        "ok": False, "error": f"{status} without a result"}
    return result, log


KV_SPACE_GIB = 1  # VLLM_CPU_KVCACHE_SPACE of every engine the tests start


def engine_env(in_process: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test's engine run: this process's without the variables a run
    sets for itself, ``KV_SPACE_GIB`` of KV cache, no tokenizer threads, the in-process
    engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) when ``in_process``, then ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_PLUGINS",
                        "VLLM_CPU_OMP_THREADS_BIND", "VLLM_PP_LAYER_PARTITION")}
    env.update(VLLM_CPU_KVCACHE_SPACE=str(KV_SPACE_GIB), TOKENIZERS_PARALLELISM="false")
    if in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.update(extra or {})
    return env


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
    if in_process is None:
        in_process = tp * pp == 1
    env = engine_env(in_process)
    if tp * pp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % 2) for i in range(tp * pp))
    if not in_process:
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
    ap.add_argument("--add-family", metavar="MODULE",
                    help="a module of tests/ whose FAMILY record is added to "
                         "harp_vllm.families for this run (a family added by a record and a "
                         "plugin class: tests/qwen3_family.py)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if sum(map(bool, (args.model, args.models, args.try_models))) != 1:
        ap.error("one of --model, --models or --try-models is required")
    try:
        with family_added(args.add_family):
            result = (try_models(args) if args.try_models else run_models(args)
                      if args.models else run(args))
        code = 0
    except Exception as e:  # reported to the caller, which checks the message
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        code = 1
    Path(args.out).write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else main())
