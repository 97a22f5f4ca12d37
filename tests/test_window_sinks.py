"""Sink logits of windowed layers (issues 23, 24): the pruning section's ``sinks``, the HF
reference (a per-head logit added to every softmax as a key with no value), the closed-form
fit and the checkpoint round trip. The plugin serving them is checked against this reference
in ``tests/test_vllm_plugin.py`` (the tiny windows engine test)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny

from harp_vllm.errors import UserError
from harp_vllm.pruning.jobs.checkpoint import save_pruned
from harp_vllm.pruning.reference import decoder_layers, load_model, pruned, windowed
from harp_vllm.pruning.reference.window_sinks import (
    LOWER_MAX,
    LOWER_STEPS,
    SINK_TOKENS,
    attach_sinks,
    attach_window_sinks,
    fit_sinks,
    lower_to_cap,
    short_context_costs,
    short_cost,
)
from harp_vllm.spec import PruningSpec


def test_sinks_round_trip_version_and_refusals():
    spec = PruningSpec(layers={}, windows={1: 16, 3: 8}, sinks=[3])
    d = spec.to_dict()
    assert d["version"] == 5 and d["sinks"] == [3]
    assert PruningSpec.from_dict(d, 8).sinks == [3]
    for sinks, message in (([2], "not a windowed layer"), ([9], "out of range"),
                           ("3", "must be a list")):
        with pytest.raises(UserError, match=message):
            PruningSpec.from_dict({**d, "sinks": sinks}, 8)
    with pytest.raises(UserError, match="needs 'harp_pruning.version' 5"):
        PruningSpec.from_dict({**d, "version": 4}, 8)


def _sinked(model, layer: int, window: int, value: float) -> None:
    heads = model.config.num_attention_heads
    attach_window_sinks(model, {layer: window}, {layer: torch.full((heads,), value)})


def test_reference_sink_logit_is_a_key_with_no_value(tmp_path):
    """A very low sink logit leaves the window as it is; a very high one takes all of the
    softmax, so the layer's attention outputs nothing (as if removed); a finite one scales
    every attention weight by 1 / (1 + exp(s) / Z), computed here directly."""
    src = make_tiny("llama", tmp_path / "tiny", layers=4)
    ids = torch.randint(3, 250, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = load_model(src)
        with windowed(base, {1: 8}):
            win = base(input_ids=ids).logits
        with pruned(base, {1: 0.0}):
            removed = base(input_ids=ids).logits
        low, high, mid = load_model(src), load_model(src), load_model(src)
        _sinked(low, 1, 8, -1e4)
        _sinked(high, 1, 8, 1e4)
        _sinked(mid, 1, 8, 0.5)
        assert torch.allclose(low(input_ids=ids).logits, win, atol=1e-5)
        assert torch.allclose(high(input_ids=ids).logits, removed, atol=1e-4)
        # the direct computation of layer 1's attention output with the sink
        attn = decoder_layers(mid)[1].self_attn
        got: dict = {}

        def grab(module, args, kwargs, out):
            got["x"], got["pe"], got["out"] = (kwargs["hidden_states"],
                                               kwargs["position_embeddings"], out[0])

        h = attn.register_forward_hook(grab, with_kwargs=True)
        mid(input_ids=ids)
        h.remove()
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x, (cos, sin) = got["x"], got["pe"]
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    logits = q @ k.transpose(-1, -2) * attn.scaling
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    logits = logits.masked_fill(~((j <= i) & (i - j < 8)), -math.inf)
    w = logits.exp() / (logits.exp().sum(-1, keepdim=True) + math.exp(0.5))
    want = attn.o_proj((w @ v).transpose(1, 2).reshape(b, t, -1))
    assert torch.allclose(got["out"], want, atol=1e-5)


def test_fit_is_the_median_first_token_log_sum_exp_and_refuses_short_windows(tmp_path):
    """The fitted logit of a head is the median, over the queries past the window, of the
    log-sum-exp of its logits on the first SINK_TOKENS keys (computed here directly from the
    layer's input); windows not shorter than the calibration text are refused."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    src = make_tiny("llama", tmp_path / "tiny", layers=4)
    model = load_model(src).eval()
    ids = torch.randint(3, 250, (2, 48), generator=torch.Generator().manual_seed(1))
    fitted = fit_sinks(model, {2: 16}, ids)
    attn = decoder_layers(model)[2].self_attn
    got: dict = {}

    def grab(module, args, kwargs):
        got["x"], got["pe"] = kwargs["hidden_states"], kwargs["position_embeddings"]

    h = attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        h.remove()
        x, (cos, sin) = got["x"], got["pe"]
        b, t, _ = x.shape
        q = attn.q_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        logits = q[:, :, 16:] @ k[:, :, :SINK_TOKENS].transpose(-1, -2) * attn.scaling
    lse = torch.log(logits.exp().sum(-1))  # batch, heads, queries past the window
    want = lse.transpose(0, 1).reshape(lse.shape[1], -1).median(-1).values
    assert fitted[2].shape == (q.shape[1],)
    assert torch.allclose(fitted[2], want, atol=1e-5)
    lower = fit_sinks(model, {2: 16}, ids, offset=1.5)[2]  # less the offset
    assert torch.allclose(lower, want - 1.5, atol=1e-5)
    with pytest.raises(UserError, match="not longer than the windows of layers"):
        fit_sinks(model, {1: 48}, ids)


def test_short_context_cost_counts_positions_before_the_window_fills(tmp_path):
    """A sink's short-context cost is the KL to dense over the positions before the window is
    full (the same on text cut at the window), near 0 for a logit far below every other, and
    grows with the logit."""
    src = make_tiny("llama", tmp_path / "tiny", layers=4)
    model = load_model(src).eval()
    heads = model.config.num_attention_heads
    ids = torch.randint(3, 250, (2, 48), generator=torch.Generator().manual_seed(3))
    sinks = {2: torch.full((heads,), 2.0)}
    cost = short_context_costs(model, {2: 16}, sinks, ids)[2]
    assert cost == pytest.approx(short_context_costs(model, {2: 16}, sinks, ids[:, :16])[2],
                                 rel=1e-4)
    low = short_context_costs(model, {2: 16}, {2: torch.full((heads,), -30.0)}, ids)[2]
    high = short_context_costs(model, {2: 16}, {2: torch.full((heads,), 6.0)}, ids)[2]
    assert low < 1e-6 < cost < high  # (float rounding only, at -30)


def test_lower_to_cap_finds_the_smallest_offset_that_meets_the_cap(tmp_path):
    """A layer over the cap gets the smallest extra offset (to the bisection's step) that
    brings its sink's short-context cost to at most the cap; a layer under the cap is left
    alone, and one the largest offset cannot bring under it is left out (no sink)."""
    src = make_tiny("llama", tmp_path / "tiny", layers=4)
    model = load_model(src).eval()
    heads = model.config.num_attention_heads
    ids = torch.randint(3, 250, (2, 48), generator=torch.Generator().manual_seed(4))
    windows = {1: 16, 2: 16}
    sinks = {1: torch.full((heads,), 6.0), 2: torch.full((heads,), -30.0)}
    costs = short_context_costs(model, windows, sinks, ids)
    cap = short_context_costs(model, windows, {1: sinks[1] - 3.0}, ids)[1]
    assert costs[2] < cap < costs[1]
    cost = short_cost(model, ids)
    offsets, lowered = lower_to_cap(cost, windows, sinks, costs, cap)
    assert set(offsets) == {1}  # layer 2 is under the cap already
    step = LOWER_MAX / 2 ** LOWER_STEPS
    assert offsets[1] == pytest.approx(3.0, abs=step)
    assert lowered[1] <= cap
    assert lowered[1] == pytest.approx(
        short_context_costs(model, windows, {1: sinks[1] - offsets[1]}, ids)[1], rel=1e-6)
    worse = short_context_costs(model, windows, {1: sinks[1] - (offsets[1] - step)}, ids)[1]
    assert worse > cap  # the smallest such offset, to the step
    assert lower_to_cap(cost, windows, sinks, costs, cap, high=1.0) == ({}, {})


def test_checkpoint_with_sinks_round_trips_and_refuses_other_families(tmp_path):
    src = make_tiny("llama", tmp_path / "tiny", layers=4)
    model = load_model(src)
    _sinked(model, 2, 8, 0.0)
    values = torch.linspace(-2, 2, decoder_layers(model)[2].self_attn.sinks.numel())
    attach_sinks(decoder_layers(model)[2].self_attn, values)
    ids = torch.randint(3, 250, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    out = save_pruned(model, PruningSpec(layers={}, windows={2: 8}, sinks=[2]), src,
                      tmp_path / "sinks")
    assert json.loads((out / "config.json").read_text())["harp_pruning"]["sinks"] == [2]
    again = load_model(out)
    assert torch.equal(decoder_layers(again)[2].self_attn.sinks.data, values)
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, before, atol=1e-6)
    gemma = make_tiny("gemma3_text", tmp_path / "gemma", layers=4)
    g = load_model(gemma)
    with pytest.raises(UserError, match="window sinks are served for"):
        save_pruned(g, PruningSpec(layers={}, windows={1: 8}, sinks=[1]), gemma,
                    tmp_path / "gemma-sinks")
    assert not (tmp_path / "gemma-sinks").exists()


def test_plan_window_sinks_writes_fitted_sinks_that_reload_and_refuses_without_windows(
        tiny_llama, tmp_path, monkeypatch):
    """``harp-vllm plan --layout ... --window-sinks``: every windowed layer gets the sink
    logits ``fit_sinks`` gives on the first long window (recorded in plan.json), the
    checkpoint (version 5) reloads to the model the plan measured (its perplexity differs from
    the plan without sinks), and a plan with no windowed layer is refused."""
    from test_plan import _calib
    from typer.testing import CliRunner

    from harp_vllm.cli import app

    monkeypatch.setenv("HARP_VLLM_CACHE", str(tmp_path / "cache"))
    args = ["plan", str(tiny_llama), "--calib-file", str(_calib(tmp_path)), "--calib-samples",
            "8", "--calib-seq-len", "32", "--positions", "16", "--eval-windows", "2",
            "--eval-seq-len", "96", "--long-positions", "64", "--context", "256"]
    out = tmp_path / "plan"
    res = CliRunner().invoke(app, [*args, "--layout", "1:win16,2:win48", "--window-sinks",
                                   "--sink-offset", "0.5", "--sink-max-short-kl", "100",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    fitted = plan["window_sinks"]["logits"]
    assert plan["window_sinks"]["offset"] == 0.5
    assert plan["window_sinks"]["layers"] == [1, 2]
    assert all(v > 0 for v in plan["window_sinks"]["short_kl"].values())
    section = json.loads((out / "config.json").read_text())["harp_pruning"]
    assert section["version"] == 5 and section["sinks"] == [1, 2]
    model = load_model(out)
    for j in (1, 2):
        got = decoder_layers(model)[j].self_attn.sinks.data
        assert torch.allclose(got, torch.tensor(plan["window_sinks"]["logits"][str(j)]),
                              atol=1e-4)
    assert plan["ppl"] != plan["window_sinks"]["without_sinks"]["ppl"]
    from harp_vllm import models
    from harp_vllm.evaluation import data
    from harp_vllm.evaluation.perplexity import evaluate_perplexity

    again = evaluate_perplexity(model, models.load_tokenizer(out),
                                data.load_text("wikitext2", "test"), 96, 2, progress=False)
    assert again.perplexity == pytest.approx(plan["ppl"], rel=1e-4)  # what the plan measured
    res = CliRunner().invoke(app, [*args, "--layout", "1:remove", "--window-sinks", "--out",
                                   str(tmp_path / "none")])
    assert res.exit_code != 0 and "has no windowed layer" in res.output
    assert not (tmp_path / "none").exists()
    res = CliRunner().invoke(app, [*args, "--layout", "1:win16", "--sink-offset", "1", "--out",
                                   str(tmp_path / "none")])
    assert res.exit_code != 0 and "give --window-sinks too" in res.output
    assert not (tmp_path / "none").exists()
    # a cap below every layer's short-context cost: windows only, no sinks written
    capped = tmp_path / "capped"
    res = CliRunner().invoke(app, [*args, "--layout", "1:win16,2:win48", "--window-sinks",
                                   "--sink-max-short-kl", "0", "--out", str(capped)])
    assert res.exit_code == 0, res.output
    plan = json.loads((capped / "plan.json").read_text())
    assert plan["window_sinks"]["layers"] == [] and plan["window_sinks"]["logits"] == {}
    section = json.loads((capped / "config.json").read_text())["harp_pruning"]
    assert not section.get("sinks") and section["windows"] == {"1": 16, "2": 48}
    # over the cap, lowered: each layer keeps its fitted logits less its own offset
    low_cap = min(plan["window_sinks"]["short_kl"].values()) / 4
    lowered = tmp_path / "lowered"
    res = CliRunner().invoke(app, [*args, "--layout", "1:win16,2:win48", "--window-sinks",
                                   "--sink-max-short-kl", str(low_cap), "--sink-over-cap",
                                   "lower", "--out", str(lowered)])
    assert res.exit_code == 0, res.output
    sinks = json.loads((lowered / "plan.json").read_text())["window_sinks"]
    assert sinks["over_cap"] == "lower" and sinks["layers"] == [1, 2]
    for j, low in sinks["lowered"].items():
        assert low["offset"] > 0 and low["short_kl"] <= low_cap
        want = torch.tensor(fitted[j]) + 0.5 - low["offset"]  # the first run's offset was 0.5
        assert torch.allclose(torch.tensor(sinks["logits"][j]), want, atol=2e-4)
    res = CliRunner().invoke(app, [*args, "--layout", "1:win16", "--window-sinks",
                                   "--sink-over-cap", "keep", "--out", str(tmp_path / "none")])
    assert res.exit_code != 0
    assert "--sink-over-cap must be one of drop, lower, no-window" in res.output


def test_plan_no_window_offers_a_window_only_where_its_sink_is_affordable(
        tiny_llama, tmp_path, monkeypatch):
    """``--sink-over-cap no-window``: every (layer, window) is priced by its fitted sink's
    short-prompt cost before the solve, and the pairs over the cap are not offered. With the
    cap at the dearest pair of the unconstrained plan, the plan uses only pairs under it and
    every windowed layer keeps its sink; with the cap just under it, that pair is not offered
    (on this tiny model the other layers' sinks cost more, so no layout is left: the budget is
    refused). With ``--layout`` the option is refused."""
    from test_plan import _calib
    from typer.testing import CliRunner

    from harp_vllm.cli import app

    monkeypatch.setenv("HARP_VLLM_CACHE", str(tmp_path / "cache"))
    args = ["plan", str(tiny_llama), "--calib-file", str(_calib(tmp_path)), "--calib-samples",
            "8", "--calib-seq-len", "32", "--positions", "16", "--eval-windows", "0",
            "--top-k", "2", "--candidates", "window", "--windows", "16,48",
            "--long-positions", "64", "--context", "512", "--kv-saving", "0.2",
            "--window-sinks", "--sink-over-cap", "no-window"]

    def plan(cap: float, name: str):
        return CliRunner().invoke(app, [*args, "--sink-max-short-kl", str(cap), "--out",
                                        str(tmp_path / name)])

    res = plan(1e9, "free")
    assert res.exit_code == 0, res.output
    free = json.loads((tmp_path / "free" / "plan.json").read_text())
    costs = free["window_sinks"]["offered"]["short_kl"]
    assert len(costs) == 4 * 2 and all(c > 0 for c in costs.values())
    assert free["window_sinks"]["offered"]["not_offered"] == []
    picked = [f"{j}:{c}" for j, c in enumerate(free["per_layer"]) if c.startswith("win")]
    assert picked
    dearest = max(picked, key=costs.__getitem__)
    cap = costs[dearest] * (1 + 1e-5)  # the record keeps 6 significant digits
    res = plan(cap, "capped")
    assert res.exit_code == 0, res.output
    capped = json.loads((tmp_path / "capped" / "plan.json").read_text())
    offered = capped["window_sinks"]["offered"]
    assert offered["short_kl"] == costs  # the same fits, the same costs
    assert offered["not_offered"]
    assert sorted(offered["not_offered"]) == sorted(k for k, c in costs.items() if c > cap)
    now = [f"{j}:{c}" for j, c in enumerate(capped["per_layer"]) if c.startswith("win")]
    assert now and all(costs[k] <= cap for k in now)
    assert capped["window_sinks"]["layers"] == [int(k.split(":")[0]) for k in now]
    res = plan(costs[dearest] * (1 - 1e-5), "under")
    if res.exit_code == 0:  # a layout without the dearest pair
        under = json.loads((tmp_path / "under" / "plan.json").read_text())
        assert dearest not in [f"{j}:{c}" for j, c in enumerate(under["per_layer"])]
    else:
        assert "no layout meets the budget" in res.output
        assert not (tmp_path / "under").exists()
    res = CliRunner().invoke(app, ["plan", str(tiny_llama), "--layout", "1:win16",
                                   "--window-sinks", "--sink-over-cap", "no-window", "--out",
                                   str(tmp_path / "none")])
    assert res.exit_code != 0 and "not to a given --layout" in res.output
    assert not (tmp_path / "none").exists()
