"""The ``loadtest`` command (``python -m harp_vllm.loadtest`` or ``harp-vllm loadtest``)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from harp_vllm.errors import UserError

from .scenarios import FULL, QUICK


def _csv(values: list[int]) -> str:
    return ",".join(map(str, values))


def _ints(text: str | None, what: str, default: list[int]) -> list[int]:
    """The comma-separated positive integers of an option, or ``default`` when not given."""
    if not text:
        return list(default)
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as e:
        raise UserError(f"{what} must be a comma-separated list of integers: {text!r}") from e
    if not vals or any(v <= 0 for v in vals):
        raise UserError(f"{what} must list positive integers: {text!r}")
    return vals


def _command_line() -> str:
    argv0 = sys.argv[0] if sys.argv else "loadtest"
    prog = ["python", "-m", "harp_vllm.loadtest"] if argv0.endswith("__main__.py") else [
        Path(argv0).name]
    return shlex.join([*prog, *sys.argv[1:]])


def loadtest(
    dense_url: Annotated[str, typer.Option(help="OpenAI-compatible base URL of the dense "
                                                "(baseline) server or its gateway route")],
    pruned_url: Annotated[str, typer.Option(help="base URL of the pruned (HARP) server")],
    out: Annotated[Path, typer.Option(help="output folder (results.json, report.md, PNGs)")
                   ] = Path("loadtest-results"),
    quick: Annotated[bool, typer.Option(help="a few seconds of load per point (smoke test); "
                                             "explicit options still win")] = False,
    prompt_lens: Annotated[str | None, typer.Option(
        help=f"prompt lengths in tokens (default: {_csv(FULL['prompt_lens'])})")] = None,
    concurrency: Annotated[str | None, typer.Option(
        help=f"concurrent requests (default: {_csv(FULL['concurrency'])})")] = None,
    output_len: Annotated[int | None, typer.Option(
        help=f"output tokens per request, EOS ignored (default: {FULL['output_len']})")] = None,
    requests_per_run: Annotated[int, typer.Option(
        help="requests per run (0: 2 x concurrency, at least 4; quick: = concurrency)")] = 0,
    repeats: Annotated[int | None, typer.Option(
        help=f"A/B repeats of every point (default: {FULL['repeats']})")] = None,
    capacity: Annotated[bool, typer.Option(help="run the capacity scenario")] = True,
    capacity_prompt_len: Annotated[int | None, typer.Option(
        help=f"capacity prompt length (default: {FULL['capacity_prompt_len']})")] = None,
    capacity_concurrency: Annotated[str | None, typer.Option(
        help=f"capacity concurrency (default: {_csv(FULL['capacity_concurrency'])})")] = None,
    capacity_waves: Annotated[int | None, typer.Option(
        help="requests per concurrency slot in the capacity scenario "
             f"(default: {FULL['capacity_waves']})")] = None,
    model_dense: Annotated[str | None, typer.Option(
        help="model name on the dense endpoint (default: the first it serves)")] = None,
    model_pruned: Annotated[str | None, typer.Option(
        help="model name on the pruned endpoint (default: the first it serves)")] = None,
    metrics_url_dense: Annotated[str | None, typer.Option(
        help="dense server's /metrics URL (default: <dense-url>/metrics)")] = None,
    metrics_url_pruned: Annotated[str | None, typer.Option(
        help="pruned server's /metrics URL (default: <pruned-url>/metrics)")] = None,
    tokenizer: Annotated[str | None, typer.Option(
        help="tokenizer dir or name (default: the dense model's root from /v1/models)")] = None,
    data: Annotated[str, typer.Option(help="prompt text: wikitext2 (local) or hub:wikitext2")
                    ] = "wikitext2",
    data_split: Annotated[str, typer.Option(help="split of --data")] = "test",
    data_file: Annotated[Path | None, typer.Option(help="prompt text from a UTF-8 file")
                         ] = None,
    run_timeout: Annotated[float, typer.Option(help="seconds before one run is abandoned")
                           ] = 1800.0,
    seed: Annotated[int, typer.Option(help="prompt sampling seed")] = 0,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    plots: Annotated[bool, typer.Option(help="write PNG plots")] = True,
) -> None:
    """A/B load test: the same long-context workload against a dense and a pruned endpoint."""
    # (Long: the Typer signature declares every option; the body only builds ``Config``. The
    # docstring above is the command's --help text.)
    from .ab_sequence import run_loadtest
    from .outputs import write_outputs
    from .scenarios import Config

    base = QUICK if quick else FULL
    try:
        cfg = Config(
            dense_url=dense_url, pruned_url=pruned_url, model_dense=model_dense,
            model_pruned=model_pruned, metrics_url_dense=metrics_url_dense,
            metrics_url_pruned=metrics_url_pruned, tokenizer=tokenizer, data=data,
            data_split=data_split, data_file=data_file,
            prompt_lens=_ints(prompt_lens, "--prompt-lens", base["prompt_lens"]),
            concurrency=_ints(concurrency, "--concurrency", base["concurrency"]),
            output_len=output_len or base["output_len"],
            requests_per_run=requests_per_run,
            repeats=repeats or base["repeats"], capacity=capacity,
            capacity_prompt_len=capacity_prompt_len or base["capacity_prompt_len"],
            capacity_concurrency=_ints(capacity_concurrency, "--capacity-concurrency",
                                       base["capacity_concurrency"]),
            capacity_waves=capacity_waves or base["capacity_waves"],
            run_timeout=run_timeout, seed=seed, quick=quick)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    command = _command_line()
    last = {"n": -1}

    def on_update(results: dict) -> None:  # keep a partial report on disk after every run
        if len(results["runs"]) != last["n"]:
            last["n"] = len(results["runs"])
            write_outputs(results, out, command, with_plots=False)

    results = run_loadtest(cfg, out, progress=progress, on_update=on_update)
    try:
        paths = write_outputs(results, out, command, with_plots=plots)
    except KeyboardInterrupt:
        paths = write_outputs(results, out, command, with_plots=False)
    for p in paths.values():
        typer.echo(f"wrote {p}")
    status = results["status"]
    if status == "complete":
        return
    typer.echo(f"error: {results['message']}" if status == "failed" else results["message"],
               err=True)
    raise typer.Exit(130 if status == "interrupted" else 1)


app = typer.Typer(add_completion=False)
app.command()(loadtest)


def main() -> None:  # pragma: no cover - console entry
    app()
