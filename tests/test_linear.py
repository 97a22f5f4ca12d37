"""``--method linear``: the closed-form fit, the checkpoint and its reference (issue 18)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_linear

from harp_vllm.errors import UserError
from harp_vllm.pruning.methods.linear import Moments, fit_linear, map_cost, solve
from harp_vllm.pruning.reference import LinearAttention, load_model
from harp_vllm.spec import PruningSpec


def _windows(model_dir: Path, n: int = 8, t: int = 48, seed: int = 0) -> torch.Tensor:
    cfg = json.loads((model_dir / "config.json").read_text())
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg["vocab_size"], (n, t), generator=g)


def test_solve_equals_ridge_least_squares_on_the_activations():
    """The streamed-moment solution equals lstsq on the explicit (centered) data."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, 12)
    true_w = torch.randn(12, 12, generator=g, dtype=torch.float64)
    t = x @ true_w + 0.3 + 0.05 * torch.randn(500, 12, generator=g, dtype=torch.float64)
    m = Moments(12)
    m.add(x[:200], t[:200])  # streamed in two parts
    m.add(x[200:], t[200:])
    lm, stats = solve(m, ridge=0.0, rank=None, input_kind="normed")
    xc = torch.cat([x, torch.ones(500, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(xc, t).solution
    torch.testing.assert_close(lm.out_weight.double().T, sol[:12], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lm.bias.double(), sol[12], rtol=1e-4, atol=1e-4)
    resid = t - xc @ sol
    assert stats["unexplained"] == pytest.approx(
        float(resid.var(0, unbiased=False).sum() / t.var(0, unbiased=False).sum()), rel=1e-3)


def test_reduced_rank_map_is_the_best_rank_r_fit():
    """Rank r keeps the r leading directions of the fitted values; rank d equals full."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(800, 10, generator=g, dtype=torch.float64)
    t = x @ torch.randn(10, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 10, generator=g, dtype=torch.float64)  # a rank-3 relation
    m = Moments(10)
    m.add(x, t)
    full, _ = solve(m, 0.0, None, "normed")
    low, stats = solve(m, 0.0, 3, "normed")
    assert low.in_weight.shape == (3, 10) and low.out_weight.shape == (10, 3)
    torch.testing.assert_close(low.out_weight @ low.in_weight, full.out_weight, atol=1e-4,
                               rtol=1e-4)
    assert stats["unexplained"] < 1e-6
    two, stats2 = solve(m, 0.0, 2, "normed")
    assert stats2["unexplained"] > 0.01  # one direction of the rank-3 relation is lost


@pytest.mark.parametrize("rank,input_kind,order", [(None, "normed", "dense"),
                                                   (16, "raw", "sequential"),
                                                   (16, "normed", "residual")])
def test_fit_installs_maps_that_reload_identically(tiny_llama, tmp_path, rank, input_kind,
                                                   order):
    """The saved checkpoint (through load_model) computes what the fitted model computes."""
    w = _windows(tiny_llama)
    model = load_model(tiny_llama)
    fit = fit_linear(model, w, [1, 3], rank=rank, input_kind=input_kind, order=order,
                     progress=False)
    assert set(fit.maps) == {1, 3}
    for j in (1, 3):
        attn = model.model.layers[j].self_attn
        assert isinstance(attn, LinearAttention)
        assert (attn.in_proj is None) == (rank is None)
        assert isinstance(model.model.layers[j].input_layernorm, torch.nn.Identity) == (
            input_kind == "raw")
    from harp_vllm.pruning.jobs.checkpoint import save_pruned

    spec = PruningSpec(layers={}, maps={k: v.spec() for k, v in fit.maps.items()},
                       method="linear")
    with torch.no_grad():
        want = model(w[:2]).logits
    out = save_pruned(model, spec, tiny_llama, tmp_path / "lin")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["harp_pruning"]["version"] == 2
    assert cfg["harp_pruning"]["maps"]["1"] == {"input": input_kind, "rank": rank}
    from safetensors.torch import load_file

    names = set(load_file(out / "model.safetensors"))
    assert "model.layers.1.self_attn.q_proj.weight" not in names
    assert ("model.layers.1.self_attn.in_proj.weight" in names) == (rank is not None)
    assert "model.layers.1.self_attn.out_proj.bias" in names
    assert ("model.layers.1.input_layernorm.weight" in names) == (input_kind == "normed")
    with torch.no_grad():
        got = load_model(out)(w[:2]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_sequential_fit_sees_the_replaced_layers_below(tiny_llama):
    """Fitting order matters: the upper map differs when fitted on replaced-layer inputs."""
    w = _windows(tiny_llama)
    a = fit_linear(load_model(tiny_llama), w, [1, 2], order="dense", progress=False)
    b = fit_linear(load_model(tiny_llama), w, [1, 2], order="sequential", progress=False)
    torch.testing.assert_close(a.maps[1].out_weight, b.maps[1].out_weight)  # same inputs
    assert not torch.allclose(a.maps[2].out_weight, b.maps[2].out_weight, atol=1e-4)


def test_map_cost_default_rank_equals_harp_fold(tiny_llama):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_llama)
    kv = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    cost = map_cost(cfg, kv)
    assert cost["linear"] == cost["harp_fold"] == 2 * cfg.hidden_size * kv
    assert map_cost(cfg, None)["linear"] == cfg.hidden_size ** 2


@pytest.mark.parametrize("maps,message", [
    ({"1": {"input": "normed", "rank": 0}}, "rank must be a positive integer"),
    ({"1": {"input": "sideways", "rank": 4}}, "input must be one of normed, raw"),
    ({"1": {"input": "normed"}}, "with 'input' and 'rank'"),
    ({"1": {"input": "normed", "rank": 4, "scale": 2}}, "with 'input' and 'rank'"),
    ({"1": {"input": "normed", "rank": 4, "add": "yes"}}, "add must be true or false"),
    ({"1": {"input": "raw", "rank": 4, "add": True}}, "reads the normed input"),
    ({"1": {"input": "normed", "rank": None, "add": True}}, "has a rank"),
    ({"2": {"input": "normed", "rank": 4}}, "in both"),
    ({"9": {"input": "normed", "rank": 4}}, "out of range"),
])
def test_spec_rejects_bad_maps(maps, message):
    with pytest.raises(UserError, match=message):
        PruningSpec.from_dict({"version": 2, "layers": {"2": 0.5}, "maps": maps}, 4)


def test_spec_maps_need_version_2_and_rank_within_hidden_size():
    with pytest.raises(UserError, match="needs 'harp_pruning.version' 2"):
        PruningSpec.from_dict({"version": 1, "layers": {},
                               "maps": {"1": {"input": "raw", "rank": 4}}}, 4)
    cfg = {"num_hidden_layers": 4, "hidden_size": 64, "harp_pruning": {
        "version": 2, "layers": {}, "maps": {"1": {"input": "raw", "rank": 65}}}}
    with pytest.raises(UserError, match="larger than the hidden size 64"):
        PruningSpec.from_config(cfg)
    old = PruningSpec.from_dict({"version": 1, "layers": {"3": 0.2}}, 4)  # v1 still loads
    assert old.layers == {3: 0.2} and old.maps == {}


def test_mixed_checkpoint_reference_loads(tiny_llama, tmp_path):
    """HARP layers and maps of both ranks and inputs in one checkpoint."""
    out = save_linear(tiny_llama, tmp_path / "mix", [([0], None, "raw"), ([2], 8, "normed")],
                      _windows(tiny_llama), alphas={1: 0.5, 3: 0.0})
    spec = PruningSpec.from_config(json.loads((out / "config.json").read_text()))
    assert spec.layers == {1: 0.5, 3: 0.0}
    assert spec.maps == {0: {"input": "raw", "rank": None}, 2: {"input": "normed", "rank": 8}}
    model = load_model(out)
    assert isinstance(model.model.layers[0].self_attn, LinearAttention)
    assert torch.isfinite(model(_windows(tiny_llama)[:1]).logits).all()


def test_cli_linear_writes_checkpoint_and_refuses_bad_options(tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from harp_vllm.cli import app

    runner = CliRunner()
    calib = tmp_path / "calib.txt"
    calib.write_text(Path(__file__).with_name("conftest.py").read_text() * 4)
    base = ["prune", str(tiny_llama), "--method", "linear", "--calib-file", str(calib),
            "--calib-samples", "8", "--calib-seq-len", "32", "--eval-windows", "0"]
    out = tmp_path / "ok"
    res = runner.invoke(app, [*base, "--out", str(out), "--layers", "2", "--select", "top",
                              "--rank", "full", "--input", "raw", "--refine-steps", "3"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["harp_pruning"]["method"] == "linear"
    assert cfg["harp_pruning"]["maps"] == {"2": {"input": "raw", "rank": None},
                                           "3": {"input": "raw", "rank": None}}
    assert cfg["harp_pruning"]["calibration"]["refine"]["steps"] == 3
    for args, message in [(["--rank", "65"], "--rank 65 is out of range"),
                          (["--rank", "two"], "--rank must be an integer or 'full'"),
                          (["--input", "sideways"], "--input must be one of"),
                          (["--fit-order", "random"], "--fit-order must be one of"),
                          (["--alpha", "0.5"], "--alpha is for HARP")]:
        bad = tmp_path / "bad"
        res = runner.invoke(app, [*base, "--out", str(bad), "--layers", "2", *args])
        assert res.exit_code != 0 and message in res.output, (args, res.output)
        assert not bad.exists()


def test_kv_layout_counts_map_layers_as_attention_free():
    from harp_vllm.serving.metrics import kv_layout

    cfg = {"architectures": ["HarpLlamaForCausalLM"], "harp_pruning": {
        "version": 2, "method": "linear", "layers": {"0": 0.5},
        "maps": {"2": {"input": "raw", "rank": None}, "3": {"input": "normed", "rank": 8}}}}
    lay = kv_layout("m", cfg, 6, 2, 32, 2)
    assert lay.pruned_layers == (0, 2, 3) and lay.attention_layers == 3
    assert lay.bytes_per_token == 3 * 2 * 2 * 32 * 2
    # A map added to a narrowed attention ("add") keeps the layer's own KV heads.
    cfg["harp_pruning"]["maps"]["4"] = {"input": "normed", "rank": 64, "add": True}
    cfg["harp_pruning"]["shapes"] = {"num_attention_heads": [4, 4, 4, 4, 2, 4],
                                     "num_key_value_heads": [2, 2, 2, 2, 1, 2],
                                     "intermediate_size": [128] * 6}
    lay = kv_layout("m", cfg, 6, 2, 32, 2)
    assert lay.pruned_layers == (0, 2, 3) and lay.attention_layers == 3
    assert lay.bytes_per_token == (2 + 2 + 1) * 2 * 32 * 2
    spec = PruningSpec.from_dict(cfg["harp_pruning"], 6)
    assert spec.to_dict()["maps"]["4"] == {"input": "normed", "rank": 64, "add": True}
    assert PruningSpec.from_dict(spec.to_dict(), 6) == spec


def test_layer_damage_equals_direct_kl_and_selects_lowest(tiny_llama):
    """Each layer's damage is the KL of the full model with only that layer replaced."""
    import copy

    from harp_vllm.pruning.methods.linear import layer_damage, lowest_damage
    from harp_vllm.pruning.reference import install_map

    w = _windows(tiny_llama, n=4, t=32)
    model = load_model(tiny_llama)
    damage = layer_damage(model, w, rank=None, batch=4, positions=32, progress=False)
    assert set(damage) == {0, 1, 2, 3} and all(v > 0 for v in damage.values())
    for j in (0, 2):
        replaced = copy.deepcopy(model)
        fit = fit_linear(copy.deepcopy(model), w, [j], batch=4, progress=False)
        install_map(replaced.model.layers[j], fit.maps[j].module(), "normed")
        with torch.no_grad():
            p = torch.log_softmax(model(w).logits.float(), -1)
            q = torch.log_softmax(replaced(w).logits.float(), -1)
        direct = float((p.exp() * (p - q)).sum(-1).mean())
        assert damage[j] == pytest.approx(direct, rel=1e-3)
    ranked = sorted(damage, key=damage.get)
    assert lowest_damage(damage, 2) == sorted(ranked[:2])


def test_cli_select_damage_records_scores(tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from harp_vllm.cli import app

    calib = tmp_path / "calib.txt"
    calib.write_text(Path(__file__).with_name("conftest.py").read_text() * 4)
    out = tmp_path / "sel"
    res = CliRunner().invoke(app, [
        "prune", str(tiny_llama), "--method", "linear", "--calib-file", str(calib),
        "--calib-samples", "8", "--calib-seq-len", "32", "--eval-windows", "0", "--out",
        str(out), "--layers", "2", "--select", "damage", "--select-windows", "3"])
    assert res.exit_code == 0, res.output
    sec = json.loads((out / "config.json").read_text())["harp_pruning"]
    assert sec["calibration"]["select_windows"] == 3
    res = CliRunner().invoke(app, [
        "prune", str(tiny_llama), "--method", "linear", "--calib-file", str(calib),
        "--calib-samples", "8", "--calib-seq-len", "32", "--eval-windows", "0", "--out",
        str(tmp_path / "sel8"), "--layers", "2"])
    assert res.exit_code == 0, res.output
    sec8 = json.loads((tmp_path / "sel8" / "config.json").read_text())["harp_pruning"]
    assert sec8["calibration"]["select_windows"] == 8  # the default
    assert sec8["calibration"]["damage"] != sec["calibration"]["damage"]  # scored on other text
    damage = {int(k): v for k, v in sec["calibration"]["damage"].items()}
    chosen = sorted(int(k) for k in sec["maps"])
    assert chosen == sorted(sorted(damage, key=damage.get)[:2])
    res = CliRunner().invoke(app, [
        "prune", str(tiny_llama), "--method", "linear", "--calib-file", str(calib),
        "--out", str(tmp_path / "bad"), "--layer-list", "1,2", "--select", "damage"])
    assert res.exit_code != 0 and "--select damage chooses its own layers" in res.output
    res = CliRunner().invoke(app, [
        "prune", str(tiny_llama), "--method", "linear", "--calib-file", str(calib),
        "--calib-samples", "8", "--out", str(tmp_path / "bad"), "--layers", "2",
        "--select-windows", "9"])
    assert res.exit_code != 0 and "--select-windows must be between 1 and the 8" in res.output
    assert not (tmp_path / "bad").exists()
