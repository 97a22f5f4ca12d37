"""The ``loadtest`` command (``python -m harp_vllm.loadtest`` or ``harp-vllm loadtest``)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from harp_vllm.errors import UserError


def _ints(text: str | None, what: str) -> list[int] | None:
    """The comma-separated positive integers of an option, or None when not given."""
    if not text:
        return None
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as e:
        raise UserError(f"{what} must be a comma-separated list of integers: {text!r}") from e
    if not vals or any(v <= 0 for v in vals):
        raise UserError(f"{what} must list positive integers: {text!r}")
    return vals


def _positive(value: int | None, what: str) -> int | None:
    if value is not None and value <= 0:
        raise UserError(f"{what} must be a positive integer: {value}")
    return value


def _command_line() -> str:
    argv0 = sys.argv[0] if sys.argv else "loadtest"
    prog = ["python", "-m", "harp_vllm.loadtest"] if argv0.endswith("__main__.py") else [
        Path(argv0).name]
    return shlex.join([*prog, *sys.argv[1:]])


PROFILE_HELP = "(default: the profile's)"


def loadtest(
    dense_url: Annotated[str | None, typer.Option(
        help="OpenAI-compatible base URL of the dense (baseline) server or its gateway route "
             "(required unless --comparison gives it)")] = None,
    pruned_url: Annotated[str | None, typer.Option(
        help="base URL of the pruned (HARP) server (required unless --comparison gives it)")
                          ] = None,
    out: Annotated[Path, typer.Option(help="output folder (results.json, report.md, PNGs)")
                   ] = Path("loadtest-results"),
    profile: Annotated[str | None, typer.Option(
        help="the load: a profile's name in loadtest/profiles (full, quick, long-7k, ...) or "
             "a .toml path (default: the comparison's profile, else full)")] = None,
    comparison: Annotated[Path | None, typer.Option(
        help="a dense vs pruned comparison file (loadtest/comparisons/*.toml): endpoints, "
             "models, /metrics URLs, profile; explicit options win over it")] = None,
    quick: Annotated[bool, typer.Option(help="the quick profile: a few seconds of load per "
                                             "point (smoke test); explicit options still win")
                     ] = False,
    prompt_lens: Annotated[str | None, typer.Option(
        help=f"prompt lengths in tokens, comma-separated {PROFILE_HELP}")] = None,
    concurrency: Annotated[str | None, typer.Option(
        help=f"concurrent requests, comma-separated {PROFILE_HELP}")] = None,
    output_len: Annotated[int | None, typer.Option(
        help=f"output tokens per request, EOS ignored {PROFILE_HELP}")] = None,
    requests_per_run: Annotated[int, typer.Option(
        help="requests per run (0: the profile's requests_per_slot x concurrency, at least "
             "its min_requests_per_run)")] = 0,
    repeats: Annotated[int | None, typer.Option(
        help=f"A/B repeats of every point {PROFILE_HELP}")] = None,
    capacity: Annotated[bool | None, typer.Option(
        "--capacity/--no-capacity", help=f"run the capacity scenario {PROFILE_HELP}")] = None,
    capacity_prompt_len: Annotated[int | None, typer.Option(
        help=f"capacity prompt length {PROFILE_HELP}")] = None,
    capacity_concurrency: Annotated[str | None, typer.Option(
        help=f"capacity concurrency, comma-separated {PROFILE_HELP}")] = None,
    capacity_waves: Annotated[int | None, typer.Option(
        help=f"requests per concurrency slot in the capacity scenario {PROFILE_HELP}")] = None,
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
    """A/B load test: the same long-context workload against a dense and a pruned endpoint.

    The load comes from a profile, the endpoints from options or a comparison file.

    An API key, if the endpoints need one: $OPENAI_API_KEY (never in the files).
    """
    # (Long: the Typer signature declares every option; the body only builds ``Config``. The
    # docstring above is the command's --help text.)
    from .ab_sequence import run_loadtest
    from .outputs import write_outputs
    from .scenario_files import Side, check_url, load_comparison, load_profile, profile_path
    from .scenarios import Config

    try:
        if quick and profile:
            raise UserError("give --quick or --profile, not both")
        comp = load_comparison(comparison) if comparison else None
        prof = (profile_path(profile) if profile else profile_path("quick") if quick
                else comp.profile if comp else profile_path("full"))
        load = load_profile(prof)
        flags = dict(
            prompt_lens=_ints(prompt_lens, "--prompt-lens"),
            concurrency=_ints(concurrency, "--concurrency"),
            output_len=_positive(output_len, "--output-len"),
            repeats=_positive(repeats, "--repeats"), capacity=capacity,
            capacity_prompt_len=_positive(capacity_prompt_len, "--capacity-prompt-len"),
            capacity_concurrency=_ints(capacity_concurrency, "--capacity-concurrency"),
            capacity_waves=_positive(capacity_waves, "--capacity-waves"))
        load.update({k: v for k, v in flags.items() if v is not None})
        dense = comp.dense if comp else Side(url="")
        pruned = comp.pruned if comp else Side(url="")
        urls = {}
        for opt, given, side in (("--dense-url", dense_url, dense),
                                 ("--pruned-url", pruned_url, pruned)):
            if not (given or side.url):
                raise UserError(f"{opt} is required (or a --comparison file that gives it)")
            urls[opt] = check_url(given, opt) if given else side.url
        for opt, given in (("--metrics-url-dense", metrics_url_dense),
                           ("--metrics-url-pruned", metrics_url_pruned)):
            if given:
                check_url(given, opt)
        cfg = Config(
            dense_url=urls["--dense-url"], pruned_url=urls["--pruned-url"],
            model_dense=model_dense or dense.model, model_pruned=model_pruned or pruned.model,
            metrics_url_dense=metrics_url_dense or dense.metrics_url,
            metrics_url_pruned=metrics_url_pruned or pruned.metrics_url,
            tokenizer=tokenizer or (comp.tokenizer if comp else None), data=data,
            data_split=data_split, data_file=data_file, **load,
            requests_per_run=requests_per_run, run_timeout=run_timeout, seed=seed,
            profile=str(prof), comparison=str(comparison) if comparison else None)
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
