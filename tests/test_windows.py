"""Sliding-window attention as a per-layer choice (issue 24): the pruning section's
``windows``, the HF reference, the cost model at a context length, the planner's ``winW``
candidates, and vLLM serving windowed checkpoints through the plugin (tiny Llama and the real
SmolLM2, prompts longer than the windows)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import greedy_without_cache
from test_plan import _calib
from typer.testing import CliRunner

from harp_vllm.cli import app
from harp_vllm.errors import UserError
from harp_vllm.pruning import costs
from harp_vllm.pruning.planner.choices import Choice, candidates, parse_layout
from harp_vllm.pruning.reference import load_model, pruned, window_mask, windowed
from harp_vllm.spec import PruningSpec

runner = CliRunner()
SMOL = SimpleNamespace(model_type="llama", hidden_size=576, num_attention_heads=9,
                       num_key_value_heads=3,
                       head_dim=64, intermediate_size=1536, num_hidden_layers=30,
                       vocab_size=49152, max_position_embeddings=8192)


# ---------------------------------------------------------------------------- the spec


def test_windows_round_trip_and_version():
    spec = PruningSpec(layers={2: 0.0}, windows={5: 1024, 1: 64}, method="plan")
    d = spec.to_dict()
    assert d["version"] == 3 and d["windows"] == {"1": 64, "5": 1024}
    back = PruningSpec.from_dict(d, num_layers=8)
    assert back.windows == {1: 64, 5: 1024} and back.layers == {2: 0.0}
    # no window: still written as version 2, which older harp-vllm reads
    assert PruningSpec(layers={2: 0.5}).to_dict()["version"] == 2


@pytest.mark.parametrize("section, message", [
    ({"version": 2, "layers": {}, "windows": {"1": 64}}, "needs 'harp_pruning.version' 3"),
    ({"version": 3, "layers": {}, "windows": {"1": 0}}, "must be a positive number of tokens"),
    ({"version": 3, "layers": {}, "windows": {"1": 64.5}}, "must be a positive number"),
    ({"version": 3, "layers": {}, "windows": {"9": 64}}, "layer index 9 out of range"),
    ({"version": 3, "layers": {"1": 0.0}, "windows": {"1": 64}}, "has no attention"),
    ({"version": 3, "layers": {}, "maps": {"1": {"input": "normed", "rank": None}},
      "windows": {"1": 64}}, "has no attention"),
    ({"version": 3, "layers": {}, "windows": [64]}, "must be an object"),
])
def test_bad_windows_are_refused(section, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PruningSpec.from_dict(section, num_layers=8)


def test_a_window_not_smaller_than_the_context_is_refused():
    cfg = {"num_hidden_layers": 4, "max_position_embeddings": 512,
           "harp_pruning": {"version": 3, "layers": {}, "windows": {"1": 512}}}
    with pytest.raises(UserError, match="not smaller than the model's context"):
        PruningSpec.from_config(cfg)
    cfg["harp_pruning"]["windows"] = {"1": 511}
    assert PruningSpec.from_config(cfg).windows == {1: 511}


# ---------------------------------------------------------------------------- the reference


def test_window_mask_matches_the_definition():
    m = window_mask(3, 4, 6, torch.float32)[0, 0]  # queries = positions 2..5 of 6 keys
    seen = (m == 0).int().tolist()
    assert seen == [[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0],
                    [0, 0, 0, 1, 1, 1]]


def test_windowed_reference_limits_context_and_a_window_of_one_is_the_token_local_path(
        tiny_llama):
    model = load_model(tiny_llama)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with windowed(model, {1: 40, 2: 64}):  # windows as long as the input: no change
            same = model(input_ids=ids).logits
        with windowed(model, {1: 8}):
            win = model(input_ids=ids).logits
        # a window of 1: each token attends to itself only, i.e. o_proj(v_proj(x)) (alpha 1)
        with windowed(model, {2: 1}):
            one = model(input_ids=ids).logits
        with pruned(model, {2: 1.0}):
            local = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert torch.allclose(same, dense, atol=1e-5)
    assert torch.allclose(win[:, :8], dense[:, :8], atol=1e-5)  # the first W tokens: as dense
    assert (win[:, 8:] - dense[:, 8:]).abs().max() > 1e-3  # later ones lose context
    assert torch.allclose(one, local, atol=1e-5)
    assert torch.allclose(after, dense, atol=1e-6)  # the hooks are gone


def test_windowed_reference_generates_with_a_kv_cache_like_without(tiny_llama, tmp_path):
    generates_like_without_cache(tiny_llama, tmp_path,
                                 PruningSpec(layers={}, windows={0: 5, 3: 9}))


def generates_like_without_cache(src: Path, tmp_path: Path, spec: PruningSpec) -> None:
    """``src`` saved with ``spec`` and reloaded generates 10 greedy tokens past a 12-token
    prompt (longer than the test windows) with HF's KV cache as without one."""
    from harp_vllm.pruning.jobs.checkpoint import save_pruned

    model = load_model(save_pruned(load_model(src), spec, src, tmp_path / "saved"))
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=10, do_sample=False)
        seq = greedy_without_cache(model, ids, 10)
    assert cached.tolist() == seq.tolist()


# ---------------------------------------------------------------------------- the cost model


def test_cost_model_counts_min_context_window_tokens():
    dense = costs.dense_shape(SMOL)
    win = costs.LayerShape("dense", 9, 3, None, 1536, window=1024)
    per_token = 2 * 3 * 64 * 2
    assert costs.kv_bytes(SMOL, win) == per_token  # no context: the per-token rate
    assert costs.kv_bytes(SMOL, win, context=1000) == per_token  # shorter than the window
    assert costs.kv_bytes(SMOL, win, context=7168) == pytest.approx(per_token * 1024 / 7168)
    seq = costs.kv_bytes_per_sequence(SMOL, [win] * 10 + [dense] * 20, 7168)
    assert seq == per_token * (10 * 1024 + 20 * 7168)
    # attention MACs: decode attends to min(N, W) tokens; prefill averages over the prompt
    h = 9 * 64
    base = costs.layer_params(SMOL, win)
    assert costs.layer_macs(SMOL, win, 7168, "decode") == base + h * 2 * 1024
    assert costs.layer_macs(SMOL, win, 512, "decode") == base + h * 2 * 512
    assert costs.layer_macs(SMOL, win, 512) == costs.layer_macs(SMOL, dense, 512)
    n, w = 7168, 1024
    assert costs.layer_macs(SMOL, win, n) == pytest.approx(
        base + h * 2 * (w * (w + 1) / 2 + (n - w) * w) / n)
    s = costs.summary(SMOL, [win] * 10 + [dense] * 20, context=7168)
    assert s["kv_context"] == 7168
    assert s["kv_saving"] == pytest.approx(10 * (1 - w / n) / 30, abs=1e-6)
    assert s["kv_bytes_per_token_unwindowed"] == 30 * per_token
    # as vLLM allocates it: 56 blocks of 128 per full layer, 9 per windowed one (the window's
    # 1,023 earlier tokens and the token itself span at most 9 blocks); 20 + 10 layers make
    # equal groups of 10, no padding
    assert s["kv_block_size"] == 128
    assert s["kv_saving_served"] == pytest.approx(1 - (20 * 56 + 10 * 9) / (30 * 56), abs=1e-6)
    # 21 + 9: vLLM groups by 9, so the full layers take 3 groups of 9 (6 padding layers)
    padded = costs.served_kv_bytes_per_sequence(SMOL, [win] * 9 + [dense] * 21, 7168, 128)
    assert padded == per_token * 128 * (27 * 56 + 9 * 9)
    assert s["predicted_speedup"]["decode@7168"] > 1


def test_model_shapes_read_the_windows():
    spec = PruningSpec(layers={}, windows={3: 256})
    shapes = costs.model_shapes(SMOL, spec)
    assert shapes[3].window == 256 and shapes[3].kv_heads == 3
    assert all(s.window is None for i, s in enumerate(shapes) if i != 3)


# ---------------------------------------------------------------------------- the planner


def test_window_choices_parse_and_price():
    cfg = SimpleNamespace(**{**vars(SMOL)})
    layout = parse_layout("3:win1024,4-5:win512", cfg)
    assert layout[3] == Choice("window", window=1024) and layout[5].name == "win512"
    assert layout[3].shape(cfg).window == 1024
    with pytest.raises(UserError, match="sliding window must be 1..8191"):
        parse_layout("3:win8192", cfg)
    names = [c.name for c in candidates(cfg, [None], ("linear", "window"), (256, 2048))]
    assert names == ["keep", "linearfull", "win256", "win2048"]


def test_plan_offers_windows_and_writes_a_windowed_checkpoint(tiny_llama, tmp_path,
                                                              monkeypatch):
    """A tiny plan with only windows offered, budgeted at a context beyond the windows: the
    checkpoint's layers get windows, the KV saving is counted at the context, and the
    reloaded checkpoint computes what the planner scored."""
    monkeypatch.setenv("HARP_VLLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "plan"
    res = runner.invoke(app, [
        "plan", str(tiny_llama), "--calib-file", str(_calib(tmp_path)), "--calib-samples", "8",
        "--calib-seq-len", "32", "--positions", "16", "--eval-windows", "0", "--top-k", "2",
        "--candidates", "window", "--windows", "16,48", "--long-positions", "64",
        "--context", "512", "--kv-saving", "0.4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    section = json.loads((out / "config.json").read_text())["harp_pruning"]
    assert section["version"] == 3 and section["windows"]
    assert set(section["windows"].values()) <= {16, 48}
    # the budget holds as vLLM allocates the cache: 4 blocks of 128 per full layer at 512
    # tokens, 2 per windowed one (a window of 16 or 48 spans at most 2 blocks)
    assert plan["costs"]["kv_context"] == 512 and plan["costs"]["kv_saving_served"] >= 0.4
    assert plan["settings"]["long"]["seq_len"] == 512  # --context
    # the windows were priced on the long windows: a window of 48 is not free there
    assert all(v["win48"] > 0 for v in _damage(tmp_path).values())
    reloaded = load_model(out)
    ids = torch.randint(0, 300, (1, 200), generator=torch.Generator().manual_seed(0))
    dense = load_model(tiny_llama)
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
        with windowed(dense, {int(k): v for k, v in section["windows"].items()}):
            want = dense(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)


def _damage(tmp_path: Path) -> dict:
    (f,) = (tmp_path / "cache" / "plan-stats").glob("[0-9a-f]*.pt")  # beside windows-*.pt
    return torch.load(f, weights_only=False)["damage"]


def test_long_windows_share_no_token_with_the_fits(monkeypatch):
    from harp_vllm.pruning.calibration import windows as w

    monkeypatch.setattr(w, "tokenize", lambda tok, text: torch.arange(4000))  # id = position
    fits = w.calibration_windows(None, "x", 20, 64, seed=3)
    long = w.unused_long_windows(None, "x", 20, 64, 3, count=2, long_len=300)
    assert long.shape == (2, 300)
    assert not set(fits.flatten().tolist()) & set(long.flatten().tolist())
    assert all((row[1:] - row[:-1] == 1).all() for row in long)  # contiguous text
    with pytest.raises(UserError, match="long windows of 3000 tokens fit"):
        w.unused_long_windows(None, "x", 20, 64, 3, count=2, long_len=3000)


def test_cost_model_knows_a_models_own_sliding_windows():
    """Gemma 3's shape: 5 of every 6 layers slide over 512 tokens, so at 32k the global
    layers hold almost all of the KV cache."""
    types = ["sliding_attention"] * 5 + ["full_attention"]
    gemma = SimpleNamespace(hidden_size=640, num_attention_heads=4, num_key_value_heads=1,
                            head_dim=256, intermediate_size=2048, num_hidden_layers=18,
                            vocab_size=262144, max_position_embeddings=32768,
                            layer_types=types * 3, sliding_window=512)
    dense = costs.dense_shapes(gemma)
    assert [s.window for s in dense[:6]] == [512] * 5 + [None]
    per_layer = 2 * 256 * 2
    seq = costs.kv_bytes_per_sequence(gemma, dense, 32768)
    assert seq == per_layer * (15 * 512 + 3 * 32768)
    assert costs.kv_bytes_per_token(gemma, None) == 18 * per_layer  # no context: per token
    # a checkpoint's extra window on a natively sliding layer never widens it
    shapes = costs.model_shapes(gemma, PruningSpec(layers={}, windows={0: 2048, 5: 1024}))
    assert shapes[0].window == 512 and shapes[5].window == 1024


def test_served_budget_counts_blocks_and_padding():
    """Under a served budget the solver's layout holds once vLLM's blocks and padding layers
    are counted; the ideal budget's layout may not."""
    from harp_vllm.pruning.planner.solve import Budget, served_saving, solve_layouts, solve_served

    cfg = SimpleNamespace(**{**vars(SMOL), "num_hidden_layers": 6})
    choices = candidates(cfg, [None], ("window",), (1024, 2048))
    damage = {j: {"win1024": 0.01 * (j + 1), "win2048": 0.004 * (j + 1)} for j in range(6)}
    ideal = Budget(0.352, context=7168)  # 3 x win2048: 0.357 ideal, 0.348 served
    served = Budget(0.352, context=7168, served_block=128)
    (lay_ideal, _), = solve_layouts(cfg, damage, choices, ideal)
    (lay_served, _), = solve_served(cfg, damage, choices, served)
    assert served_saving(cfg, lay_served, served) >= 0.352
    assert served_saving(cfg, lay_ideal, served) < 0.352  # whole blocks cost it


# ---------------------------------------------------------------------------- recall probe
def test_recall_probe_plants_facts_early_and_picks_the_recalled_digits():
    from harp_vllm import models
    from harp_vllm.pruning.calibration.recall_probe import plant_recall

    tok = models.load_tokenizer(models.resolve("smollm2-135m"))
    window = torch.arange(1000, 3000)
    ids, picks = plant_recall(tok, window, needles=3, seed=5)
    assert ids.shape == window.shape and len(picks) == 15
    digits = tok.decode(ids[picks + 1])
    assert digits.isdigit()
    for k in range(3):  # each recalled code was stated in the window's first half
        code = digits[5 * k:5 * k + 5]
        at = tok.decode(ids[:1000]).find(code)
        assert at >= 0, code
    assert (picks > 1900).all()
    # at given depths: one fact starting at each fraction of the window
    deep, picks_d = plant_recall(tok, window, seed=5, depths=(0.1, 0.5, 0.8))
    stated = [tok.decode(deep[int(d * 2000):int(d * 2000) + 16]) for d in (0.1, 0.5, 0.8)]
    assert all(t.startswith(" The secret code of the") for t in stated)
    recalled = tok.decode(deep[picks_d + 1])
    assert len(picks_d) == 15 and recalled.isdigit()
    assert sorted(recalled[5 * k:5 * k + 5] for k in range(3)) == sorted(
        t.split(" is ")[1][:5] for t in stated)
    with pytest.raises(UserError, match="facts overlap"):
        plant_recall(tok, window, depths=(0.5, 0.5001))
    rep, _ = plant_recall(tok, window, needles=3, seed=5, repeat=24)
    assert torch.equal(rep[600:624], rep[624:648]) or torch.equal(rep[1200:1224], rep[1224:1248])
    with pytest.raises(UserError, match="too short"):
        plant_recall(tok, torch.arange(40), needles=3)


def test_a_merged_record_weights_the_probe_kl(tiny_llama):
    from harp_vllm.pruning.calibration.damage import (
        merge_records,
        record_dense,
        suffix_kl,
        suffix_kl_parts,
    )

    model = load_model(tiny_llama).eval()
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, model.config.vocab_size, (2, 48), generator=g)
    probe = torch.randint(0, model.config.vocab_size, (1, 48), generator=g)
    layers = list(range(model.config.num_hidden_layers))
    rec = merge_records(record_dense(model, text, layers, positions=16),
                        record_dense(model, probe, layers, picks=torch.tensor([[40, 41]])), 0.5)
    assert suffix_kl(model, rec, 0) == pytest.approx(0.0, abs=1e-6)
    with windowed(model, {0: 4, 1: 4}):
        parts = suffix_kl_parts(model, rec, 0)
        assert set(parts) == {"text", "probe"} and parts["probe"] > 0
        assert suffix_kl(model, rec, 0) == pytest.approx(parts["text"] + 0.5 * parts["probe"])


def test_plan_rescores_layouts_with_the_recall_probe(tiny_llama, tmp_path, monkeypatch):
    """--recall-probe: the layouts are re-scored on the long windows plus the weighted KL at
    the recalled codes' digits of planted probe windows; plan.json shows both parts, and the
    measured KL is their weighted sum."""
    monkeypatch.setenv("HARP_VLLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "plan"
    args = ["plan", str(tiny_llama), "--calib-file", str(_calib(tmp_path)), "--calib-samples",
            "8", "--calib-seq-len", "32", "--positions", "16", "--eval-windows", "0",
            "--top-k", "3", "--candidates", "linear,remove,window", "--windows", "64,128",
            "--window-sinks", "--sink-max-short-kl", "1e9", "--context", "512",
            "--long-positions", "64", "--kv-saving", "0.3", "--recall-probe", "2.0",
            "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["settings"]["recall_probe"] == {"weight": 2.0, "repeat": 24, "windows": 2}
    assert plan["settings"]["long"]["seq_len"] == 512  # re-scored on long windows
    for t in plan["tried"]:
        parts = t["kl_parts"]
        assert set(parts) == {"text", "probe"} and parts["probe"] > 0
        assert t["measured_kl"] == pytest.approx(parts["text"] + 2.0 * parts["probe"],
                                                 abs=2e-5)
    best = min(plan["tried"], key=lambda t: t["measured_kl"])
    assert plan["layout"] == best["layout"]
    assert plan["measured_kl_parts"]["probe_weight"] == 2.0
    # with the fitted sinks (if the plan has windows) both parts are measured again
    for rec in (plan, plan.get("window_sinks", {}).get("without_sinks", plan)):
        parts = rec["measured_kl_parts"]
        assert rec["measured_kl"] == pytest.approx(parts["text"] + 2.0 * parts["probe"],
                                                   abs=2e-5)
    res = runner.invoke(app, [*args[:-2], "--recall-probe", "-1", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "--recall-probe must be >= 0" in res.output
    assert not (tmp_path / "x").exists()
