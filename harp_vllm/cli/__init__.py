"""The ``harp-vllm`` command line (Typer)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .output import run_guarded, write_json

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Prune LLM attention (HARP and friends) and serve the result with vLLM.")
models_app = typer.Typer(no_args_is_help=True, help="Prepare and list models.")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate models.")
app.add_typer(models_app, name="models")
app.add_typer(eval_app, name="eval")

@models_app.command("prepare")
def models_prepare(name: Annotated[str, typer.Argument(help="known model name")] = "smollm2-135m"
                   ) -> None:
    """Convert a known offline model (GGUF) into an fp32 HF directory in the cache."""
    from .. import models

    path = run_guarded(models.prepare, name)
    typer.echo(str(path))


@models_app.command("list")
def models_list() -> None:
    """Known models and whether they are prepared."""
    from .. import models

    for name, known in models.KNOWN_MODELS.items():
        path = models.prepared_dir(name)
        state = "prepared" if models.is_prepared(path) else "not prepared"
        typer.echo(f"{name}\t{state}\t{path}\t{known.description}")


@models_app.command("path")
def models_path(model: str) -> None:
    """Print the local HF directory a model name/path/hub id resolves to."""
    from .. import models

    typer.echo(str(run_guarded(models.resolve, model)))


def _load_eval_text(data: str, data_file: Path | None, split: str) -> tuple[str, str]:
    from ..evaluation import data as data_mod

    if data_file is not None:
        return data_mod.read_text_file(data_file), str(data_file)
    return data_mod.load_text(data, split), f"{data}:{split}"


@eval_app.command("ppl")
def eval_ppl(
    model: Annotated[str, typer.Option(help="known name, HF directory, .gguf file or hub id")],
    data: Annotated[str, typer.Option(help="wikitext2 (local files) or hub:wikitext2")] = (
        "wikitext2"),
    data_file: Annotated[Path | None, typer.Option(help="a UTF-8 text file instead")] = None,
    split: Annotated[str, typer.Option(help="dataset split")] = "test",
    seq_len: Annotated[int, typer.Option(help="window length in tokens")] = 2048,
    max_windows: Annotated[int | None, typer.Option(help="score at most K windows")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
    out: Annotated[Path | None, typer.Option(help="write the result as JSON here")] = None,
) -> None:
    """Perplexity (standard protocol: join rows with \\n\\n, tokenize once, windows of N)."""
    import torch

    from .. import models
    from ..evaluation.perplexity import evaluate_perplexity
    from ..pruning.reference import load_model

    if threads:
        torch.set_num_threads(threads)

    def _run() -> dict:
        text, source = _load_eval_text(data, data_file, split)
        path = models.resolve(model)
        tok = models.load_tokenizer(path)
        lm = load_model(path)
        res = evaluate_perplexity(lm, tok, text, seq_len, max_windows)
        return {"model": model, "model_path": str(path), "data": source, **res.to_dict()}

    payload = run_guarded(_run)
    typer.echo(f"{payload['model']} on {payload['data']}: perplexity {payload['perplexity']:.4f} "
               f"(seq-len {payload['seq_len']}, {payload['windows']} windows, "
               f"{payload['tokens_scored']} tokens scored, {payload['seconds']:.1f} s)")
    write_json(out, payload)


@app.command("prune")
def prune_cmd(
    model: Annotated[str, typer.Argument(help="known name, HF directory, .gguf or hub id")],
    out: Annotated[Path, typer.Option(help="output checkpoint directory")],
    method: Annotated[str, typer.Option(help="harp, gate-norm, hybrid, linear (layers) or amp, "
                                             "flap, wanda-sp (heads and MLP channels)")] = (
        "harp"),
    layers: Annotated[int | None, typer.Option(help="prune P layers")] = None,
    ratio: Annotated[float | None, typer.Option(help="layer methods: prune round(r * L) "
                                                     "layers; amp/flap/wanda-sp: share of "
                                                     "attention heads removed")] = None,
    mlp_ratio: Annotated[float, typer.Option(help="amp/flap/wanda-sp: share of MLP channels "
                                                  "removed")] = 0.0,
    allocation: Annotated[str | None, typer.Option(help="amp/flap/wanda-sp: uniform (same "
                                                        "count per layer) or global (default: "
                                                        "the method's own)")] = None,
    bias_compensation: Annotated[bool | None, typer.Option(
        "--bias-compensation/--no-bias-compensation",
        help="replace removed channels by their mean (default: on for flap only)")] = None,
    layer_list: Annotated[str | None, typer.Option(help="explicit layers, e.g. 22-29,31")] = None,
    position: Annotated[str, typer.Option(help="top, or bottom (layer 0 excluded)")] = "top",
    alpha: Annotated[float | None, typer.Option(help="fixed alpha for all layers (no search)")
                     ] = None,
    alpha_grid: Annotated[str, typer.Option(help="alpha candidates")] = (
        "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0"),
    calib_data: Annotated[str, typer.Option(help="wikitext2 (local) or hub:wikitext2")] = (
        "wikitext2"),
    calib_split: Annotated[str | None, typer.Option(help="default: validation (local), train "
                                                         "(hub)")] = None,
    calib_file: Annotated[Path | None, typer.Option(help="calibrate on a text file")] = None,
    calib_samples: Annotated[int | None, typer.Option(help="calibration windows (default 8 "
                                                           "for layer methods, else 128)")
                             ] = None,
    calib_seq_len: Annotated[int | None, typer.Option(help="tokens per calibration window "
                                                           "(default 256, else 128)")] = None,
    seed: Annotated[int, typer.Option(help="calibration sampling seed")] = 0,
    search: Annotated[str, typer.Option(help="fast or naive")] = "fast",
    rank: Annotated[str | None, typer.Option(help="linear: map rank, an integer or 'full' "
                                                  "(default: HARP's n_kv*head_dim)")] = None,
    map_input: Annotated[str, typer.Option("--input", help="linear: fit on the attention's "
                                           "normed input or the raw residual stream")] = (
        "normed"),
    ridge: Annotated[float, typer.Option(help="linear: ridge, relative to the mean input "
                                              "variance")] = 1e-3,
    fit_order: Annotated[str, typer.Option(help="linear: dense, sequential or residual")] = (
        "dense"),
    refine_steps: Annotated[int, typer.Option(help="linear: steps of joint KL refinement of "
                                                   "the maps (0: closed form only)")] = 0,
    select: Annotated[str | None, typer.Option(
        help="linear: damage (the P layers whose lone replacement costs the least calibration "
             "KL; default unless --layer-list/--position) or top (by --position)")] = None,
    select_windows: Annotated[int, typer.Option(
        help="linear: calibration windows --select damage scores the layers on")] = 8,
    eval_windows: Annotated[int, typer.Option(help="WikiText-2 test windows for the before/"
                                                   "after perplexity (0: skip)")] = 8,
    eval_seq_len: Annotated[int, typer.Option(help="evaluation window length")] = 2048,
    force: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
    report: Annotated[Path | None, typer.Option(help="write the run report as JSON")] = None,
) -> None:
    """Prune MODEL (HARP, Gate-Norm, the hybrid, AMP, FLAP or Wanda-sp); write a checkpoint."""
    import torch
    from rich.table import Table

    from ..pruning.jobs.prune_job import run_prune
    from ..pruning.jobs.prune_options import PruneOptions, parse_grid
    from ..pruning.jobs.prune_tables import alpha_table_rows, shape_table_rows

    if threads:
        torch.set_num_threads(threads)

    def _run() -> dict:
        opts = PruneOptions(
            model=model, out=out, method=method, layers=layers, ratio=ratio, layer_list=layer_list,
            position=position, alpha=alpha, grid=parse_grid(alpha_grid), calib_data=calib_data,
            calib_split=calib_split, calib_file=calib_file, calib_samples=calib_samples,
            calib_seq_len=calib_seq_len, seed=seed, search=search, eval_windows=eval_windows,
            eval_seq_len=eval_seq_len, force=force, mlp_ratio=mlp_ratio, allocation=allocation,
            bias_compensation=bias_compensation, rank=rank, map_input=map_input, ridge=ridge,
            fit_order=fit_order, refine_steps=refine_steps, select=select,
            select_windows=select_windows)
        return run_prune(opts)

    result = run_guarded(_run)
    if result["method"] == "linear":
        typer.echo(f"replaced layers {result['layers']} by linear maps "
                   f"({result['calibration']['input']} input, rank "
                   f"{result['calibration']['rank'] or 'full'}); parameters "
                   f"{result['params_before']:,} -> {result['params_after']:,}; KV bytes/token "
                   f"(bf16) {result['kv_bytes_per_token_before']:,} -> "
                   f"{result['kv_bytes_per_token_after']:,}")
    elif "shapes" in result:
        table = Table(title=f"{result['method']}: kept per layer ({model})")
        for col in ("layer", "heads", "KV heads", "MLP channels"):
            table.add_column(col, justify="right")
        for row in shape_table_rows(result["shapes"]):
            table.add_row(*row)
        Console().print(table)
        typer.echo(f"heads removed {result['heads_removed']}/{result['heads_total']}; "
                   f"parameters {result['params_before']:,} -> {result['params_after']:,}; "
                   f"KV bytes/token (bf16) {result['kv_bytes_per_token_before']:,} -> "
                   f"{result['kv_bytes_per_token_after']:,}")
    else:
        table = Table(title=f"{result['method']} alphas ({model})")
        for col in ("layer", "alpha", "calib ppl"):
            table.add_column(col, justify="right")
        for alpha_row in alpha_table_rows(result):
            table.add_row(*alpha_row)
        Console().print(table)
    if "ppl_before" in result:
        ev = result["eval"]
        typer.echo(f"WikiText-2 test perplexity (seq-len {ev['seq_len']}, {ev['windows']} "
                   f"windows): dense {result['ppl_before']:.4f} -> pruned "
                   f"{result['ppl_after']:.4f}")
    typer.echo(f"wrote {result['out']}")
    write_json(report, result)


from .serving_commands import register as _register_serving  # noqa: E402

_register_serving(app)

from .loadtest_commands import register as _register_loadtest  # noqa: E402

_register_loadtest(app)

from .stack_commands import register as _register_stack  # noqa: E402

_register_stack(app)

from .plan_commands import register as _register_plan  # noqa: E402

_register_plan(app)

from .tasks_commands import register as _register_tasks  # noqa: E402

_register_tasks(eval_app)


def main() -> None:  # pragma: no cover - console entry
    app()
