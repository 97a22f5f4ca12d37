"""``harp-vllm plan``: per-layer pruning under a KV (and speed) budget, or the frontier."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the ``plan`` command to the top-level app."""

    @app.command("plan")
    def plan_cmd(
        model: Annotated[str, typer.Argument(help="known name, HF directory or hub id")],
        out: Annotated[Path, typer.Option(help="checkpoint directory (a plan) or report "
                                               "directory (--frontier)")],
        kv_saving: Annotated[float | None, typer.Option(
            help="at least this share of the dense KV bytes per token saved, e.g. 0.27 (at "
                 "--context as vLLM allocates them when a layer is windowed: the model's own "
                 "windows or --windows)")] = None,
        speedup: Annotated[float | None, typer.Option(
            help="also a predicted prefill speed-up of at least this at --context tokens "
                 "(cost model)")] = None,
        context: Annotated[int | None, typer.Option(
            help="context length the budgets are stated at (KV bytes of windowed layers, "
                 "the speed budget); default the model's own (harp-vllm models list: "
                 "32,768 for gemma3-270m, 7,168 for smollm2-135m and any other model)")] = None,
        layout: Annotated[str | None, typer.Option(
            help="no search: an explicit layout, e.g. 7:linear192,28-29:remove,3:drop1 (the "
                 "'layout' of a plan.json)")] = None,
        frontier: Annotated[bool, typer.Option(help="sweep --budgets; write a table and "
                                                    "plots to --out")] = False,
        budgets: Annotated[str, typer.Option(help="--frontier: KV savings")] = (
            "0.1,0.2,0.27,0.3,0.4,0.5"),
        compare: Annotated[Path | None, typer.Option(
            help="--frontier: JSON of single-method curves {method: [{kv_saving, ppl}]} for "
                 "the plot")] = None,
        ranks: Annotated[str | None, typer.Option(
            help="linear-map ranks offered (integers or 'full'); default full, 192,full with "
                 "--speedup")] = None,
        candidates: Annotated[str | None, typer.Option(
            help="candidate kinds offered per layer: drop (FLAP KV-group cuts), droplin (KV "
                 "groups cut, a fitted map in their place), linear (maps), remove, window "
                 "(sliding-window attention, sizes from --windows), group-window (the same "
                 "with one KV group kept whole, sizes from --group-windows, else "
                 "--windows), share (cross-layer KV "
                 "sharing, targets from --share-targets); default droplin,linear,remove (+ "
                 "window with --windows, share with --share-targets), and drop with "
                 "--speedup")] = None,
        share_targets: Annotated[int | None, typer.Option(
            help="offer cross-layer KV sharing: each layer may attend over the keys and "
                 "values of one of its K nearest earlier layers of its kind (kept whole), "
                 "its q/o refitted; e.g. 2")] = None,
        windows: Annotated[str | None, typer.Option(
            help="offer sliding windows of these sizes (tokens), e.g. 512,1024,2048: each "
                 "candidate is then priced on --long-seq-len windows")] = None,
        group_windows: Annotated[str | None, typer.Option(
            help="offer windows of these sizes (tokens, e.g. 2048) on all KV groups of a "
                 "layer but one, kept whole (winWkG, each group in turn: DuoAttention's "
                 "retrieval heads per KV group; Llama family)")] = None,
        window_sinks: Annotated[bool, typer.Option(
            help="give every windowed layer of the plan per-head sink logits (vLLM's sinks), "
                 "fitted in closed form on the first long window, in place of the first "
                 "tokens the window drops (Llama family)")] = False,
        sink_offset: Annotated[float | None, typer.Option(
            help="with --window-sinks: subtract this from every fitted sink logit (vLLM adds "
                 "the sink also before the window is full, where the real first tokens are "
                 "still seen; a lower logit changes short contexts less); default "
                 "0")] = None,
        sink_max_short_kl: Annotated[float | None, typer.Option(
            help="with --window-sinks: a layer keeps its sink only if the sink alone changes "
                 "short prompts (KL per token to dense on the first 256 tokens of the damage "
                 "windows) by at most this; default 1e-3")] = None,
        sink_over_cap: Annotated[str | None, typer.Option(
            help="with --window-sinks: a layer whose sink costs short prompts more than "
                 "--sink-max-short-kl gets none (drop), keeps it lowered by the smallest "
                 "offset that meets the cap (lower), or, with --kv-saving, is not offered "
                 "that window at all (no-window: every layer's sink priced before the "
                 "solve); default drop")] = None,
        long_seq_len: Annotated[int | None, typer.Option(
            help="with windows: tokens per long window (default --context), cut from the "
                 "calibration text between the fits' windows")] = None,
        long_damage_windows: Annotated[int, typer.Option(
            help="with windows: long windows each window candidate's damage is measured "
                 "on")] = 1,
        long_rescore_windows: Annotated[int, typer.Option(
            help="with windows: more long windows the best layouts are re-scored on")] = 2,
        long_positions: Annotated[int, typer.Option(
            help="with windows: sampled positions per long window")] = 1024,
        recall_probe: Annotated[float, typer.Option(
            help="re-score the best layouts on long windows (--long-rescore-windows) plus "
                 "this weight times the KL on a recall probe: facts planted early in more "
                 "long windows of the calibration text and recalled at their end (0: "
                 "off)")] = 0.0,
        recall_repeat: Annotated[int, typer.Option(
            help="with --recall-probe: every other probe window repeats its first this many "
                 "tokens (text that says the same thing again and again)")] = 24,
        recall_windows: Annotated[int, typer.Option(
            help="with --recall-probe: probe windows")] = 2,
        recall_depths: Annotated[str | None, typer.Option(
            help="with --recall-probe: one fact at each of these fractions of a probe window "
                 "(comma list, e.g. 0.1,0.5,0.8,0.9: recalled from 6k, 3.5k, 1.4k and 0.7k "
                 "tokens back at 7k), in place of 3 facts at random in its first "
                 "half")] = None,
        probe_prices: Annotated[bool, typer.Option(
            help="with --recall-probe: each candidate's price is its text damage plus the "
                 "weight times its damage on the probe, measured for the candidates the "
                 "solver takes until its layout is priced throughout (cached)")] = False,
        retrieval_floor: Annotated[str | None, typer.Option(
            help="with --recall-probe: plan once per fraction (comma list, e.g. 0,0.5,0.8), "
                 "each layout keeping at least that fraction of the dense model's retrieval "
                 "mass (the attention the probe's answers pay to keys beyond the largest "
                 "window, per KV group); the best measured plan wins")] = None,
        retrieval_beyond: Annotated[int | None, typer.Option(
            help="with --retrieval-floor: count the mass on keys further back than this "
                 "(tokens; default the largest window offered, where every window keeps none "
                 "of it; a smaller one credits a window W with the mass within W)")] = None,
        calib_file: Annotated[Path | None, typer.Option(
            help="calibrate on a text file (default: WikiText-2 validation)")] = None,
        calib_mix: Annotated[str | None, typer.Option(
            help="calibrate on the dev parts of several domains, e.g. "
                 "wikitext,python,boolq,gsm8k (windows interleaved)")] = None,
        calib_self: Annotated[bool, typer.Option(
            help="calibrate on text sampled from the dense model itself (self-calibration, "
                 "arXiv 2410.17170): no external data; cached")] = False,
        calib_samples: Annotated[int, typer.Option(help="calibration windows for the maps and "
                                                        "FLAP's statistics")] = 16,
        calib_seq_len: Annotated[int, typer.Option(help="tokens per calibration window")] = 1024,
        damage_windows: Annotated[int, typer.Option(help="of those, windows each candidate's "
                                                         "KL is measured on")] = 4,
        rescore_windows: Annotated[int, typer.Option(
            help="windows disjoint from every fit the best layouts are re-scored on, every "
                 "position (0: the damage windows)")] = 4,
        held_out_damage: Annotated[bool, typer.Option(
            help="measure the maps' damage with maps fitted without the damage windows (not "
                 "flattered by the fit; the written maps use every window)")] = False,
        positions: Annotated[int, typer.Option(help="sampled positions per window for the "
                                                    "KL")] = 128,
        ridge: Annotated[str, typer.Option(
            help="the linear and group maps' ridge (relative to the mean input variance), or "
                 "'held-out': each map's from a grid by 4-fold cross-validated error")
                         ] = "1e-3",
        top_k: Annotated[int, typer.Option(help="best layouts re-scored as whole models")] = 8,
        rounds: Annotated[int, typer.Option(
            help="solve rounds: each corrects the best layout's estimates to their in-context "
                 "damage and solves again")] = 1,
        seed: Annotated[int, typer.Option(help="calibration sampling seed")] = 0,
        eval_windows: Annotated[int, typer.Option(help="WikiText-2 test windows (0: skip)")
                                ] = 8,
        eval_seq_len: Annotated[int, typer.Option(help="evaluation window length")] = 2048,
        cache: Annotated[bool, typer.Option("--cache/--no-cache", help="reuse the per-layer "
                                                                       "statistics")] = True,
        force: Annotated[bool, typer.Option(help="replace an existing output directory")
                         ] = False,
        threads: Annotated[int | None, typer.Option(help="torch threads")] = None,
    ) -> None:
        """Choose each layer's attention (keep, fewer KV groups with or without a fitted map
        for the removed ones, linear map, removed, a sliding window, an earlier layer's KV
        cache shared) under a
        KV budget by an exact MILP over per-layer calibration damage; write the checkpoint
        and plan.json, or with --frontier a sweep of budgets."""
        import torch

        from ..errors import UserError
        from ..pruning.jobs.plan_job import run_frontier, run_plan
        from ..pruning.jobs.plan_options import PlanOptions, parse_ridge
        from .output import run_guarded

        if threads:
            torch.set_num_threads(threads)

        def _run() -> dict:
            try:
                sweep = tuple(float(x) for x in budgets.split(",") if x.strip())
            except ValueError:
                raise UserError(f"bad --budgets {budgets!r} (use e.g. 0.1,0.27,0.4)") from None
            opts = PlanOptions(
                model=model, out=out, kv_saving=kv_saving, speedup=speedup, context=context,
                layout=layout, frontier=frontier, budgets=sweep, compare=compare, ranks=ranks,
                calib_file=calib_file, calib_mix=calib_mix, calib_self=calib_self,
                candidates=candidates,
                windows=windows, share_targets=share_targets, group_windows=group_windows,
                window_sinks=window_sinks, sink_offset=sink_offset,
                sink_max_short_kl=sink_max_short_kl, sink_over_cap=sink_over_cap,
                long_seq_len=long_seq_len,
                long_damage_windows=long_damage_windows,
                long_rescore_windows=long_rescore_windows, long_positions=long_positions,
                recall_probe=recall_probe, recall_repeat=recall_repeat,
                recall_windows=recall_windows, probe_prices=probe_prices,
                retrieval_floor=retrieval_floor, recall_depths=recall_depths,
                retrieval_beyond=retrieval_beyond,
                calib_samples=calib_samples,
                calib_seq_len=calib_seq_len, damage_windows=damage_windows,
                rescore_windows=rescore_windows, held_out_damage=held_out_damage,
                positions=positions, ridge=parse_ridge(ridge), top_k=top_k, rounds=rounds,
                seed=seed,
                eval_windows=eval_windows, eval_seq_len=eval_seq_len, use_cache=cache,
                force=force)
            return run_frontier(opts) if frontier else run_plan(opts)

        result = run_guarded(_run)
        if frontier:
            from ..pruning.planner.frontier_report import table

            typer.echo(table(result))
            typer.echo(f"wrote {result['out']}/frontier.md, frontier.png, layouts.png, "
                       f"frontier.json")
            return
        c, n = result["costs"], result["context"]
        typer.echo(f"layout: {result['layout']}")
        at = f" at {c['kv_context']:,} tokens" if "kv_context" in c else ""
        typer.echo(f"KV bytes/token (bf16){at} {c['kv_bytes_per_token_dense']:,.0f} -> "
                   f"{c['kv_bytes_per_token']:,.0f} (saving {c['kv_saving']:.3f}); predicted "
                   f"prefill speed-up at {n}: {c['predicted_speedup'][f'prefill@{n}']:.3f}")
        if "kv_saving_served" in c:
            typer.echo(f"as vLLM allocates it (blocks of {c['kv_block_size']}, its grouping "
                       f"of window sizes): saving {c['kv_saving_served']:.3f}")
        pred = result["predicted_kl"]
        typer.echo(f"calibration KL predicted "
                   f"{'- (explicit layout)' if pred is None else f'{pred:.4f}'}, measured "
                   f"{result['measured_kl']:.4f}")
        if result.get("ppl") is not None:
            typer.echo(f"WikiText-2 test perplexity: dense {result['ppl_dense']:.4f} -> "
                       f"planned {result['ppl']:.4f}")
        typer.echo(f"wrote {result['out']} (with plan.json)")
