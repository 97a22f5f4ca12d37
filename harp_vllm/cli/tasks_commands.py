"""``harp-vllm eval tasks``: downstream tasks on lm-evaluation-harness through vLLM."""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import UserError
from .output import fail, write_json


def exit_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C: the default action ends this process at once, without
    the exit hooks that stop the in-process vLLM engine's EngineCore/Worker processes, which
    were then left running."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def register(eval_app: typer.Typer) -> None:
    """Add the ``tasks`` command to the ``eval`` sub-app."""

    @eval_app.command("tasks")
    def eval_tasks(
        model: Annotated[str, typer.Option(
            help="vllm backend: known name, HF directory (dense or HARP-pruned) or hub id; "
                 "openai backend: the served model name")],
        tasks: Annotated[str, typer.Option(
            help="comma list of lambada_openai, gsm8k, triviaqa, arc_easy, arc_challenge, "
                 "winogrande, openbookqa, boolq; or all / generation / discriminative")] = "all",
        limit: Annotated[list[str] | None, typer.Option(
            help="score the first N items: N for every task, TASK=N for one (repeatable); "
                 "0 = all")] = None,
        num_fewshot: Annotated[list[str] | None, typer.Option(
            help="few-shot examples: K, or TASK=K (repeatable); default: lm-eval's task "
                 "default (0, gsm8k 5)")] = None,
        backend: Annotated[str, typer.Option(
            help="vllm (in-process engine with the HARP plugin) or openai (a running "
                 "server; needs --base-url)")] = "vllm",
        base_url: Annotated[str | None, typer.Option(
            help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (implies "
                 "--backend openai)")] = None,
        tokenizer: Annotated[str | None, typer.Option(
            help="openai backend: tokenizer dir/hub id (default: resolve --model)")] = None,
        api_key: Annotated[str | None, typer.Option(
            help="openai backend: Bearer key", envvar="HARP_EVAL_API_KEY")] = None,
        data: Annotated[str, typer.Option(
            help="local (files in the shared data dir) or hub (lm-eval's own tasks and hub "
                 "datasets)")] = "local",
        max_model_len: Annotated[int, typer.Option(help="context length (tokens)")] = 4096,
        kv_cache_gb: Annotated[float, typer.Option(
            help="VLLM_CPU_KVCACHE_SPACE in GiB, unless already set")] = 2.0,
        kv_cache_dtype: Annotated[str, typer.Option(
            help="vllm backend: KV-cache dtype, auto (the model's) or fp8; with the openai "
                 "backend it is the server's setting")] = "auto",
        max_gen_toks: Annotated[int, typer.Option(help="generation cap per item")] = 256,
        num_concurrent: Annotated[int, typer.Option(
            help="openai backend: concurrent requests")] = 4,
        seed: Annotated[int, typer.Option(help="engine and few-shot sampling seed")] = 1234,
        label: Annotated[str | None, typer.Option(
            help="column label in tables (default: the model)")] = None,
        out: Annotated[Path | None, typer.Option(help="write the result JSON here")] = None,
        samples_out: Annotated[Path | None, typer.Option(
            help="write per-item prompts, outputs and scores as DIR/TASK.jsonl")] = None,
    ) -> None:
        """Task quality (lm-eval's prompts and metrics) through the vLLM serving path."""
        from ..evaluation.tasks.registry import parse_task_list
        from ..evaluation.tasks.report import markdown_table
        from ..evaluation.tasks.runner import EvalOptions, parse_per_task, run_tasks

        try:
            names = parse_task_list(tasks)
            lim, task_lim = parse_per_task(limit, "limit")
            shots, task_shots = parse_per_task(num_fewshot, "num-fewshot")
            opts = EvalOptions(
                model=model, tasks=names, backend="openai" if base_url else backend,
                base_url=base_url, tokenizer=tokenizer, api_key=api_key, data=data, limit=lim,
                task_limits=task_lim, num_fewshot=shots, task_fewshot=task_shots,
                max_model_len=max_model_len, kv_cache_gb=kv_cache_gb,
                kv_cache_dtype=kv_cache_dtype, seed=seed,
                max_gen_toks=max_gen_toks, num_concurrent=num_concurrent, samples_out=samples_out,
                command=shlex.join(["harp-vllm", *sys.argv[1:]]))
            if opts.backend == "vllm":
                exit_on_sigterm()
            payload = run_tasks(opts, log=lambda m: typer.echo(m, err=True))
        except UserError as e:
            fail(str(e), e.exit_code)
        if label:
            payload["label"] = label
        typer.echo(markdown_table([payload], all_metrics=True))
        typer.echo(f"({payload['seconds']:.0f} s, of which {payload['seconds_engine_start']:.0f}"
                   f" s to start the backend)")
        write_json(out, payload)

    @eval_app.command("passkey")
    def eval_passkey(
        model: Annotated[str, typer.Option(
            help="known name or HF directory (dense or pruned)")],
        lengths: Annotated[str, typer.Option(help="prompt lengths in tokens")] = (
            "1024,2048,4096,7168"),
        trials: Annotated[int, typer.Option(help="trials per length")] = 50,
        seed: Annotated[int, typer.Option(help="keys and depths seed")] = 0,
        kv_cache_gb: Annotated[float, typer.Option(
            help="VLLM_CPU_KVCACHE_SPACE in GiB, unless already set")] = 2.0,
        out: Annotated[Path | None, typer.Option(help="write the result JSON here")] = None,
    ) -> None:
        """Passkey retrieval: a 5-digit key hidden at a random depth, by context length (the
        plain greedy answer, and the answer with its opening cued)."""
        from ..evaluation.tasks.passkey import parse_lengths, run_passkey

        try:
            exit_on_sigterm()
            payload = run_passkey(model, parse_lengths(lengths), trials, seed, kv_cache_gb)
        except UserError as e:
            fail(str(e), e.exit_code)
        typer.echo("| tokens | trials | passkey accuracy | answer cued |\n"
                   "| --- | --- | --- | --- |")
        for length, row in payload["accuracy"].items():
            typer.echo(f"| {length} | {row['trials']} | {row['accuracy']:.2f} | "
                       f"{row['cued_accuracy']:.2f} |")
        write_json(out, payload)


    @eval_app.command("quality")
    def eval_quality(
        models: Annotated[list[str], typer.Argument(
            help="known names or HF directories; the first is the reference (normally dense)")],
        out: Annotated[Path, typer.Option(help="report folder (runs cached in OUT/runs)")] = (
            Path("out/quality")),
        label: Annotated[list[str] | None, typer.Option(
            help="a label per model, in order (default: folder or model name)")] = None,
        preset: Annotated[str, typer.Option(
            help="full (whole LAMBADA, 50 passkey trials per length) or quick")] = "full",
        lambada_limit: Annotated[int | None, typer.Option(
            help="LAMBADA items (0 = all 5,153)")] = None,
        arc_limit: Annotated[int | None, typer.Option(help="ARC-Easy items (0 = all)")] = None,
        passkey_trials: Annotated[int | None, typer.Option(
            help="passkey trials per length (0 = no passkey)")] = None,
        passkey_lengths: Annotated[str | None, typer.Option(
            help="passkey prompt lengths, e.g. 1024,2048,4096,7168")] = None,
        short_windows: Annotated[int | None, typer.Option(
            help="perplexity windows per domain")] = None,
        short_len: Annotated[int | None, typer.Option(
            help="tokens per perplexity window (default 2048)")] = None,
        long_windows: Annotated[int | None, typer.Option(
            help="long windows per long domain (0 = no position buckets)")] = None,
        long_len: Annotated[int | None, typer.Option(
            help="tokens per long window (default 8191)")] = None,
        kv_cache_gb: Annotated[float | None, typer.Option(
            help="VLLM_CPU_KVCACHE_SPACE in GiB, unless already set")] = None,
        no_cache: Annotated[bool, typer.Option(
            "--no-cache", help="measure every model again")] = False,
    ) -> None:
        """Long-context quality report: perplexity per domain and by position, LAMBADA,
        ARC-Easy and passkey, through vLLM with the plugin; ratios to the first model."""
        from ..evaluation.quality import QualityOptions
        from ..evaluation.quality_report import PRESETS, run_report
        from ..evaluation.tasks.passkey import parse_lengths

        try:
            if preset not in PRESETS:
                raise UserError(f"unknown --preset {preset!r}; use {' or '.join(PRESETS)}")
            kw: dict[str, Any] = dict(PRESETS[preset])
            for name, value in (("lambada_limit", lambada_limit), ("arc_limit", arc_limit),
                                ("passkey_trials", passkey_trials),
                                ("short_windows", short_windows), ("short_len", short_len),
                                ("long_windows", long_windows), ("long_len", long_len),
                                ("kv_cache_gb", kv_cache_gb)):
                if value is not None:
                    if value < 0:
                        raise UserError(f"--{name.replace('_', '-')} must not be negative")
                    kw[name] = (value or None) if name.endswith("limit") else value
            if passkey_lengths is not None:
                kw["passkey_lengths"] = tuple(parse_lengths(passkey_lengths))
            summary = run_report(models, label, QualityOptions(**kw), out,
                                 use_cache=not no_cache, log=lambda m: typer.echo(m, err=True))
        except UserError as e:
            fail(str(e), e.exit_code)
        typer.echo((out / "quality.md").read_text())
        typer.echo(f"({summary['seconds']:.0f} s; wrote {out}/quality.json, quality.md, "
                   "quality.png)")
