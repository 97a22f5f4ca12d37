"""Every method on the post-norm family (issue 25), on tiny random Gemma models: linear maps
before the post-attention norm, the calibration passes' per-layer keyword arguments (Gemma 3's
sliding and global layers), and the planner's candidates and costs following the family."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_MAP_GROUPS, make_tiny, save_linear
from typer.testing import CliRunner

from harp_vllm import models
from harp_vllm.cli import app
from harp_vllm.errors import UserError
from harp_vllm.pruning import costs
from harp_vllm.pruning.calibration.damage import record_dense, suffix_kl
from harp_vllm.pruning.jobs.plan_options import PlanOptions, parse_kinds
from harp_vllm.pruning.methods.linear import fit_linear
from harp_vllm.pruning.planner.choices import KEEP, Choice, candidates, parse_layout
from harp_vllm.pruning.planner.layouts import layout_summary
from harp_vllm.pruning.planner.solve import Budget, solve_layouts
from harp_vllm.pruning.reference import LinearAttention, decoder_layers, load_model

# Gemma 3 270M's shape (tests/test_gemma3.py checks the real config)
GEMMA3 = SimpleNamespace(model_type="gemma3_text", hidden_size=640, num_attention_heads=4,
                         num_key_value_heads=1, head_dim=256, intermediate_size=2048,
                         num_hidden_layers=18, vocab_size=262144,
                         max_position_embeddings=32768, sliding_window=512,
                         layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3)
GLOBAL = [5, 11, 17]


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    """A tiny Gemma 3 (6 layers, 5 sliding and layer 5 global) with an 8-token window, so
    64-token windows tell the two kinds of layer apart."""
    path = make_tiny("gemma3_text", tmp_path_factory.mktemp("g3") / "dense")
    cfg = json.loads((path / "config.json").read_text())
    cfg["sliding_window"] = 8
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def tiny_gemma3_one_kv(tmp_path_factory):
    """A tiny Gemma 3 of one KV head (as the 270M): heads are cut one query head at a time."""
    return make_tiny("gemma3_text", tmp_path_factory.mktemp("g3kv1") / "dense", kv_heads=1)


def _windows(n: int = 8, t: int = 64) -> torch.Tensor:
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(0))


def test_layers_run_alone_get_their_own_mask_and_rotary(tiny_gemma3):
    """The damage record keeps every layer's own keyword arguments: running the dense layers
    from any recorded input gives the dense model back (KL 0), also across the global layer
    (with the first layer's sliding mask and local rotary it would not)."""
    model = load_model(tiny_gemma3)
    assert model.config.layer_types[5] == "full_attention"
    rec = record_dense(model, _windows(4), [0, 3, 5], positions=16)
    for start in (0, 3, 5):
        assert suffix_kl(model, rec, start) == pytest.approx(0.0, abs=1e-6)
    wrong = {j: rec.kwargs[0] for j in rec.kwargs}  # the old single dict: layer 0's
    rec.kwargs = wrong
    assert suffix_kl(model, rec, 0) > 1e-3


def test_linear_maps_sit_before_the_post_norm_and_reload_identically(tiny_gemma3, tmp_path):
    """A map replaces the attention and keeps the post-attention norm (the fit's target is the
    attention output that norm reads: a full-rank map of a layer whose attention is already
    linear in its input is exact); the saved checkpoint reloads to the same logits."""
    model = load_model(tiny_gemma3)
    fit = fit_linear(model, _windows(), [2, 5], rank=None, progress=False)
    layer = decoder_layers(model)[5]
    assert isinstance(layer.self_attn, LinearAttention)
    assert not isinstance(layer.post_attention_layernorm, torch.nn.Identity)
    assert all(s["unexplained"] < 1 for s in fit.stats.values())
    out = save_linear(tiny_gemma3, tmp_path / "lin", TINY_MAP_GROUPS, _windows())
    spec = json.loads((out / "config.json").read_text())["harp_pruning"]
    assert spec["maps"]["0"] == {"input": "raw", "rank": None}
    ref = load_model(out)
    assert isinstance(decoder_layers(ref)[0].input_layernorm, torch.nn.Identity)
    x = torch.tensor([list(range(20, 84))])
    with torch.no_grad():
        again = load_model(out)(x).logits
        assert torch.equal(ref(x).logits, again)


def test_residual_fit_order_is_refused_for_post_norm(tiny_gemma3):
    with pytest.raises(UserError, match="post-norm family"):
        fit_linear(load_model(tiny_gemma3), _windows(), [1], order="residual", progress=False)


def test_planner_candidates_follow_the_family():
    """One KV head (Gemma 3): no KV-group cut is offered or accepted; the default kinds are
    the maps and removal (and windows when asked for)."""
    assert parse_kinds(PlanOptions("m", out=None), GEMMA3) == ("linear", "remove")  # type: ignore[arg-type]
    assert parse_kinds(PlanOptions("m", out=None, windows="128"), GEMMA3) == (  # type: ignore[arg-type]
        "linear", "remove", "window")
    llama = SimpleNamespace(**{**vars(GEMMA3), "model_type": "llama", "num_key_value_heads": 2})
    assert parse_kinds(PlanOptions("m", out=None), llama) == (  # type: ignore[arg-type]
        "droplin", "linear", "remove")
    with pytest.raises(UserError, match="single KV head per layer"):
        parse_layout("3:drop1lin", GEMMA3)
    with pytest.raises(UserError, match="single KV head per layer"):
        candidates(GEMMA3, [None], ("drop", "linear"))
    gemma2 = SimpleNamespace(**{**vars(GEMMA3), "model_type": "gemma2", "num_key_value_heads": 2})
    with pytest.raises(UserError, match="KV-group cuts are not served for 'gemma2'"):
        parse_layout("3:drop1", gemma2)
    with pytest.raises(UserError, match="KV sharing is not served for 'gemma2'"):
        parse_layout("3:share1", gemma2)
    assert parse_layout("17:share11", GEMMA3) == {17: Choice("share", target=11)}  # Gemma 3
    with pytest.raises(UserError, match="layer 17 has full attention and layer 16 a 512-token"):
        parse_layout("17:share16", GEMMA3)


def test_planner_sees_the_global_layers_hold_the_kv_at_long_context():
    """A natively sliding layer keeps its window in every choice (a window choice never
    widens it), so at Gemma 3's 32,768 tokens removing a global layer saves 64 times what
    removing a local one does, and the solver cuts global layers even when they cost more."""
    assert KEEP.shape(GEMMA3, 0).window == 512 and KEEP.shape(GEMMA3, 5).window is None
    assert Choice("window", window=2048).shape(GEMMA3, 0).window == 512
    assert Choice("window", window=2048).shape(GEMMA3, 5).window == 2048
    choices = [KEEP, Choice("remove")]
    damage = {j: {"remove": 0.1 if j in GLOBAL else 0.01} for j in range(18)}
    (layout, _), = solve_layouts(GEMMA3, damage, choices, Budget(0.5, context=32768))
    assert len([j for j in layout if j in GLOBAL]) == 2, layout
    # at a short context every layer holds the same: the 9 cheapest (local) ones go
    (short, _), = solve_layouts(GEMMA3, damage, choices, Budget(0.5, context=512))
    assert sorted(short) == sorted(j for j in range(18) if j not in GLOBAL)[:9]
    assert costs.kv_bytes(GEMMA3, KEEP.shape(GEMMA3, 5), context=32768) == 64 * costs.kv_bytes(
        GEMMA3, KEEP.shape(GEMMA3, 0), context=32768)
    # the summary's saving compares both at the context: one global layer of 3 + 15/64
    s = layout_summary(GEMMA3, {17: Choice("linear", rank=None)}, context=32768)
    assert s["kv_saving"] == pytest.approx(1 / (3 + 15 / 64), abs=1e-6)


def test_gemma3_kv_budget_is_counted_as_vllm_serves_it():
    """Gemma 3's own sliding windows make the plan's KV budget a served one (issue 25): at
    32k, a map on global layer 17 saves 0.309 of the ideal bytes but 0.298 as vLLM allocates
    them (5 blocks of 128 per local layer, the 15 local layers padded to 16 in groups of 2,
    843 -> 592 blocks), so ``--kv-saving 0.3`` also takes a local layer (582 blocks: 14
    local ones need no padding). A model without windows keeps the ideal budget."""
    from harp_vllm.pruning.planner.solve import served_block, served_saving, solve_served

    lin = Choice("linear", rank=None)
    choices = [KEEP, lin, Choice("remove")]
    # as measured on the 270M: the last global layer's map is the cheapest change
    damage = {j: {"linearfull": 0.05 if j == 17 else 0.2 + 0.01 * j, "remove": 1.0}
              for j in range(18)}
    block = served_block(GEMMA3, choices)
    assert block == costs.SERVED_BLOCK == 128
    served = Budget(0.3, context=32768, served_block=block)
    (ideal, _), = solve_layouts(GEMMA3, damage, choices, Budget(0.3, context=32768))
    assert ideal == {17: lin}  # the old plan30
    assert served_saving(GEMMA3, ideal, served) == pytest.approx(1 - 592 / 843, abs=1e-9)
    found = solve_served(GEMMA3, damage, choices, served, count=3)
    assert found[0][0] == {0: lin, 17: lin}
    assert all(served_saving(GEMMA3, lay, served) >= 0.3 for lay, _ in found)
    # plan.json's costs: both savings, the cost model's and vLLM's
    s = layout_summary(GEMMA3, found[0][0], context=32768)
    assert s["kv_saving"] == pytest.approx(1 - (2 + 14 / 64) / (3 + 15 / 64), abs=1e-6)
    assert s["kv_saving_served"] == pytest.approx(1 - 582 / 843, abs=1e-6)
    # SmolLM2's shape (no native windows): ideal bytes, unless windows are offered
    smol = SimpleNamespace(model_type="llama", hidden_size=576, num_attention_heads=9,
                           num_key_value_heads=3, intermediate_size=1536, num_hidden_layers=30,
                           vocab_size=49152, max_position_embeddings=8192)
    assert served_block(smol, choices) is None
    windowed = [*choices, Choice("window", window=1024)]
    assert served_block(smol, windowed) == 128


def test_plan_context_default_is_the_models_own():
    assert models.kv_context("gemma3-270m") == 32768
    assert models.kv_context("smollm2-135m") == 7168
    assert models.kv_context("./some-dir") == models.DEFAULT_KV_CONTEXT == 7168


def test_plan_cli_on_gemma3_offers_no_kv_group_cut(tiny_gemma3_one_kv, tmp_path):
    """``harp-vllm plan`` on a Gemma 3 of one KV head under a KV budget: maps and removals
    only, the checkpoint reloads with the plan's layers, the budget at the default context."""
    res = CliRunner().invoke(app, [
        "plan", str(tiny_gemma3_one_kv), "--kv-saving", "0.3", "--out", str(tmp_path / "p"),
        "--calib-samples", "8", "--calib-seq-len", "64", "--damage-windows", "2",
        "--rescore-windows", "2", "--eval-windows", "0", "--no-cache", "--top-k", "2"])
    assert res.exit_code == 0, res.output
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert plan["context"] == 7168 and plan["budget"]["context"] == 7168
    assert set(plan["settings"]["candidates"]) == {"keep", "linearfull", "remove"}
    # the model's own windows (4,096 tokens, at 7,168): budgeted as vLLM allocates the KV
    assert plan["budget"]["served_block"] == 128 and plan["costs"]["kv_saving_served"] >= 0.3
    assert "kv_saving" in plan["costs"]
    model = load_model(tmp_path / "p")
    changed = [j for j, c in enumerate(plan["per_layer"]) if c != "keep"]
    assert changed and all(
        isinstance(decoder_layers(model)[j].self_attn, LinearAttention)
        == (plan["per_layer"][j] == "linearfull") for j in changed)


@pytest.mark.parametrize("method", ["amp", "flap", "wanda-sp"])
def test_head_methods_cut_query_heads_of_a_single_kv_head(tiny_gemma3_one_kv, tmp_path,
                                                          method):
    """With one KV head the unit is a query head: the cut model equals the dense one with the
    removed heads' o_proj columns and MLP channels' down_proj columns zeroed (the KV head,
    QK norms and 1/sqrt(query_pre_attn_scalar) scaling untouched), and the saved checkpoint
    reloads to the same logits."""
    from harp_vllm.pruning.jobs.checkpoint import save_pruned
    from harp_vllm.pruning.methods.structured import prune_structured, shapes_of
    from harp_vllm.spec import PruningSpec

    model, zeroed = load_model(tiny_gemma3_one_kv), load_model(tiny_gemma3_one_kv)
    res = prune_structured(model, _windows(), method, 0.25, 0.25, "uniform",
                           bias_compensation=False, progress=False)
    shapes = shapes_of(model.config, res)
    assert shapes["num_attention_heads"] == [3] * 6 and shapes["num_key_value_heads"] == [1] * 6
    for layer, heads, chans in zip(decoder_layers(zeroed), res.kept_groups, res.kept_channels,
                                   strict=True):
        with torch.no_grad():
            for h in set(range(4)) - set(heads):
                layer.self_attn.o_proj.weight[:, h * 32:(h + 1) * 32] = 0
            gone = sorted(set(range(256)) - set(chans))
            layer.mlp.down_proj.weight[:, gone] = 0
    x = torch.tensor([list(range(20, 84))])
    with torch.no_grad():
        cut = model(x).logits
        assert torch.allclose(cut, zeroed(x).logits, atol=1e-4)
    spec = PruningSpec(layers={}, method=method, shapes=shapes)
    out = save_pruned(model, spec, tiny_gemma3_one_kv, tmp_path / "cut")
    with torch.no_grad():
        assert torch.equal(load_model(out)(x).logits, cut)


def test_flap_compensation_is_refused_for_gemma3(tiny_gemma3_one_kv):
    from harp_vllm.pruning.methods.structured import prune_structured

    with pytest.raises(UserError, match="use --no-bias-compensation"):
        prune_structured(load_model(tiny_gemma3_one_kv), _windows(), "flap", 0.25,
                         progress=False)


def test_a_windowed_global_layer_keeps_its_own_rotary_when_served():
    """vLLM's Gemma 3 attention picks its rotary by the layer's type, and a window makes the
    layer "sliding_attention" for vLLM: a global layer given a window must keep the global
    rotary (base 1M, as the HF reference does), a local layer its own, and the model's config
    must not change (served with the local base 10k, plan30l's windows at 16k changed the
    model even where they never bind: 1.14x perplexity on tokens 0-1k through vLLM)."""
    from transformers import Gemma3TextConfig

    from harp_vllm.spec import CONFIG_KEY
    from harp_vllm.vllm_plugin.checkpoint_spec import layer_config

    cfg = Gemma3TextConfig(num_hidden_layers=6, sliding_window=512)
    assert cfg.layer_types[5] == "full_attention" and cfg.layer_types[1] == "sliding_attention"
    setattr(cfg, CONFIG_KEY, {"version": 3, "layers": {}, "windows": {"5": 1024, "1": 256}})
    glob, loc = layer_config(cfg, "model.layers.5"), layer_config(cfg, "model.layers.1")
    assert glob.layer_types[5] == "sliding_attention" and glob.sliding_window == 1024
    assert glob.rope_parameters["sliding_attention"]["rope_theta"] == 1e6
    assert loc.sliding_window == 256
    assert loc.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    assert cfg.layer_types[5] == "full_attention"
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
