"""AMP, FLAP and Wanda-sp (issue 9) on tiny models: scores, allocation, surgery, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CORPUS, make_tiny_model
from safetensors.torch import load_file
from typer.testing import CliRunner

from harp_vllm import models
from harp_vllm.cli import app
from harp_vllm.errors import UserError
from harp_vllm.pruning.calibration.windows import calibration_windows
from harp_vllm.pruning.heads import count_parameters
from harp_vllm.pruning.jobs.checkpoint import save_pruned
from harp_vllm.pruning.methods.structured import (
    allocate,
    channel_scores,
    group_scores,
    layer_inputs,
    layer_stats,
    prune_structured,
    shapes_of,
)
from harp_vllm.pruning.reference import load_model
from harp_vllm.spec import PruningSpec

runner = CliRunner()
D = 16  # head_dim of conftest's tiny models (4 query heads, 2 KV heads: groups of 2)


@pytest.fixture(scope="module")
def windows(tiny_llama) -> torch.Tensor:
    return calibration_windows(models.load_tokenizer(tiny_llama), CORPUS, 6, 24)


def captured_inputs(model, windows) -> dict[str, list[torch.Tensor]]:
    """o_proj / down_proj inputs of every layer in one ordinary full forward (no layer loop)."""
    got: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name, mod in ((f"o{i}", layer.self_attn.o_proj), (f"a{i}", layer.mlp.down_proj)):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, a, name=name: got.setdefault(name, []).append(
                    a[0].reshape(-1, a[0].shape[-1]).double())))
    with torch.no_grad():
        model(windows, use_cache=False)
    for h in hooks:
        h.remove()
    return {k: torch.cat(v) for k, v in got.items()}


def standardise(s: torch.Tensor) -> torch.Tensor:
    return (s - s.mean()) / s.std()


def direct_scores(method: str, x: torch.Tensor, a: torch.Tensor, w_o: torch.Tensor,
                  w_down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(group scores, MLP channel scores) written straight from papers.md, head by head."""
    w_o, w_down = w_o.double(), w_down.double()
    n_heads = x.shape[1] // D
    if method == "amp":
        heads = torch.stack([
            (x[:, h * D:(h + 1) * D] @ w_o[:, h * D:(h + 1) * D].T).abs().sum(1).mean()
            for h in range(n_heads)])
        mlp = a.abs().mean(0)
        groups = heads[0::2] + heads[1::2]
    elif method == "wanda-sp":
        chan = w_o.abs().mean(0) * x.norm(dim=0)
        heads = torch.stack([chan[h * D:(h + 1) * D].sum() for h in range(n_heads)])
        groups = heads[0::2] + heads[1::2]
        mlp = w_down.abs().mean(0) * a.norm(dim=0)
    else:  # flap: WIFV, squared for attention, standardised, heads = mean of channels
        chan = standardise((x.var(0, unbiased=False) * w_o.pow(2).sum(0)).pow(2))
        heads = torch.stack([chan[h * D:(h + 1) * D].mean() for h in range(n_heads)])
        groups = (heads[0::2] + heads[1::2]) / 2
        mlp = standardise(a.var(0, unbiased=False) * w_down.pow(2).sum(0))
    return groups, mlp


@pytest.mark.parametrize("method", ["amp", "wanda-sp", "flap"])
def test_scores_equal_a_direct_computation(tiny_llama, windows, method):
    model = load_model(tiny_llama)
    direct_inputs = captured_inputs(model, windows)
    inputs = layer_inputs(model, windows, batch_size=4)  # two batches, propagated layer-wise
    for i, layer in enumerate(model.model.layers):
        stats = layer_stats(layer, D, inputs)
        assert stats.tokens == windows.numel()
        w_o, w_down = layer.self_attn.o_proj.weight.data, layer.mlp.down_proj.weight.data
        want_g, want_c = direct_scores(method, direct_inputs[f"o{i}"], direct_inputs[f"a{i}"],
                                       w_o, w_down)
        torch.testing.assert_close(group_scores(method, stats, w_o, D, 2), want_g,
                                   rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(channel_scores(method, stats, w_down), want_c,
                                   rtol=1e-6, atol=1e-9)
        with torch.no_grad():
            inputs = [(layer(h, **kw), kw) for h, kw in inputs]


def test_allocation_uniform_and_global():
    s = [torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0.5, 9.0, 0.1]), torch.tensor([5., 6, 7])]
    # uniform: AMP rounds (0.4 * 3 = 1.2 -> 1), Wanda-sp truncates (0.6 * 3 = 1.8 -> 1)
    assert allocate(s, 0.4, "uniform", "amp") == [[0, 2], [0, 1], [1, 2]]
    assert allocate(s, 0.6, "uniform", "wanda-sp") == [[0, 2], [0, 1], [1, 2]]
    assert allocate(s, 0.6, "uniform", "amp") == [[0], [1], [2]]  # round(1.8) = 2
    assert allocate(s, 0.9, "uniform", "amp") == [[0], [1], [2]]  # round(2.7) = 3, capped
    # global: the 4 lowest of all 9 (0.1, 0.5, 1, 2), each layer keeping one
    assert allocate(s, 4 / 9, "global", "flap") == [[0], [1], [0, 1, 2]]
    # a layer never loses its last unit: 3 removals wanted in layer 1 alone give 2 there
    low = [torch.tensor([0.1, 0.2, 0.3]), torch.tensor([5.0, 6.0, 7.0])]
    assert allocate(low, 0.5, "global", "amp") == [[2], [1, 2]]
    assert allocate(s, 0.0, "global", "amp") == [[0, 1, 2]] * 3
    with pytest.raises(UserError, match="uniform or global"):
        allocate(s, 0.5, "adaptive", "amp")


def masked_dense(src: Path, kept_groups, kept_channels, biases: dict | None = None):
    """The dense model with removed heads' o_proj columns and MLP down columns zeroed."""
    model = load_model(src)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            o = layer.self_attn.o_proj.weight
            for g in range(o.shape[1] // (2 * D)):
                if g not in kept_groups[i]:
                    o[:, g * 2 * D:(g + 1) * 2 * D] = 0
            down = layer.mlp.down_proj.weight
            gone = [c for c in range(down.shape[1]) if c not in kept_channels[i]]
            down[:, gone] = 0
    return model


@pytest.mark.parametrize("method,allocation", [("amp", "uniform"), ("wanda-sp", "global"),
                                               ("flap", "global")])
def test_pruned_model_equals_masked_dense_and_survives_a_round_trip(tiny_llama, windows,
                                                                   tmp_path, method,
                                                                   allocation):
    model = load_model(tiny_llama)
    x = torch.tensor([windows[0].tolist()])
    res = prune_structured(model, windows, method, 0.5, 0.25, allocation, progress=False)
    assert sum(len(g) for g in res.kept_groups) == 4  # 8 groups, half removed
    assert sum(len(c) for c in res.kept_channels) == 4 * 128 - 128
    got = model(x).logits
    if method != "flap":  # removing a unit = zeroing its output columns in the dense model
        want = masked_dense(tiny_llama, res.kept_groups, res.kept_channels)(x).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    spec = PruningSpec(layers={}, method=method, shapes=shapes_of(model.config, res))
    out = save_pruned(model, spec, tiny_llama, tmp_path / method)
    cfg = json.loads((out / "config.json").read_text())
    shapes = cfg["harp_pruning"]["shapes"]
    assert shapes["num_key_value_heads"] == [len(g) for g in res.kept_groups]
    assert shapes["num_attention_heads"] == [2 * len(g) for g in res.kept_groups]
    assert shapes["intermediate_size"] == [len(c) for c in res.kept_channels]
    # tensor shapes and the parameter count follow the spec in config.json
    state = load_file(out / "model.safetensors")
    hidden, flap = 64, method == "flap"
    expect = 2 * model.config.vocab_size * hidden + hidden  # embeddings, lm_head, final norm
    for i in range(4):
        q, kv, inter = (shapes[k][i] for k in ("num_attention_heads", "num_key_value_heads",
                                              "intermediate_size"))
        p = f"model.layers.{i}."
        assert state[p + "self_attn.q_proj.weight"].shape == (q * D, hidden)
        assert state[p + "self_attn.k_proj.weight"].shape == (kv * D, hidden)
        assert state[p + "self_attn.o_proj.weight"].shape == (hidden, q * D)
        assert state[p + "mlp.down_proj.weight"].shape == (hidden, inter)
        expect += (2 * q + 2 * kv) * D * hidden + 3 * hidden * inter + 2 * hidden
        if flap:  # biases everywhere (zero except the compensation on o_proj / down_proj)
            expect += (q + 2 * kv) * D + hidden + 2 * inter + hidden
            assert state[p + "self_attn.q_proj.bias"].abs().max() == 0
            assert state[p + "self_attn.o_proj.bias"].abs().max() > 0
    assert sum(t.numel() for t in state.values()) == expect == count_parameters(model)
    assert cfg.get("attention_bias", False) is flap and cfg.get("mlp_bias", False) is flap
    reloaded = load_model(out)
    torch.testing.assert_close(reloaded(x).logits, got, rtol=1e-6, atol=1e-6)


def test_flap_bias_replaces_removed_channels_by_their_mean(tiny_llama, windows):
    """At the calibration mean input, FLAP's pruned o_proj gives the dense o_proj's output."""
    model = load_model(tiny_llama)
    dense_o = model.model.layers[0].self_attn.o_proj
    mean = captured_inputs(model, windows)["o0"].mean(0).float()
    want = dense_o(mean)
    res = prune_structured(model, windows, "flap", 0.5, 0.0, "uniform", progress=False)
    kept = res.kept_groups[0]
    cols = torch.cat([torch.arange(g * 2 * D, (g + 1) * 2 * D) for g in kept])
    got = model.model.layers[0].self_attn.o_proj(mean[cols])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_wanda_sp_uniform_prunes_layer_by_layer(tiny_llama, windows):
    """Sequential: layer 1 is scored on the output of the already pruned layer 0."""
    seq = load_model(tiny_llama)
    res = prune_structured(seq, windows, "wanda-sp", 0.5, 0.0, "uniform", progress=False)
    one_pass = load_model(tiny_llama)
    inputs = layer_inputs(one_pass, windows, 16)
    s0 = group_scores("wanda-sp", layer_stats(one_pass.model.layers[0], D, inputs),
                      one_pass.model.layers[0].self_attn.o_proj.weight.data, D, 2)
    assert res.group_scores[0] == pytest.approx(s0.tolist(), rel=1e-5, abs=1e-6)  # same input
    with torch.no_grad():
        after = [(seq.model.layers[0](h, **kw), kw) for h, kw in inputs]
    dense1 = one_pass.model.layers[1]  # layer 1 as it was before its own pruning
    s1 = group_scores("wanda-sp", layer_stats(dense1, D, after),
                      dense1.self_attn.o_proj.weight.data, D, 2)
    with torch.no_grad():
        s1_one_pass = group_scores("wanda-sp", layer_stats(dense1, D, [
            (one_pass.model.layers[0](h, **kw), kw) for h, kw in inputs]),
            dense1.self_attn.o_proj.weight.data, D, 2)
    assert s1_one_pass.tolist() != pytest.approx(s1.tolist(), rel=1e-3)
    assert res.group_scores[1] == pytest.approx(s1.tolist(), rel=1e-5, abs=1e-6)


def test_spec_shapes_validation():
    ok = {"num_attention_heads": [4, 2], "num_key_value_heads": [2, 1],
          "intermediate_size": [128, 64]}
    base = {"version": 1, "method": "amp", "layers": {}}
    assert PruningSpec.from_dict({**base, "shapes": ok}, 2).layer_shape(1) == {
        "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64}
    bad = [({**ok, "num_attention_heads": [4]}, "has 1 entries; the model has 2 layers"),
           ({**ok, "num_attention_heads": [4, 3], "num_key_value_heads": [2, 2]},
            "multiple of its KV heads"),
           ({**ok, "num_key_value_heads": [2, 0], "num_attention_heads": [4, 0]},
            "at least one KV head"),
           ({**ok, "intermediate_size": [128, 0]}, "at least one MLP channel"),
           ({"num_attention_heads": [4, 2]}, "exactly num_attention_heads"),
           ({**ok, "intermediate_size": [128, -1]}, "non-negative integers")]
    for shapes, message in bad:
        with pytest.raises(UserError, match=message):
            PruningSpec.from_dict({**base, "shapes": shapes}, 2)
    # A planned checkpoint mixes shapes with pruned layers; those keep the config's heads.
    mixed = {**base, "layers": {"1": 0.0}, "shapes": ok}
    cfg = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 128, "harp_pruning": mixed}
    with pytest.raises(UserError, match=r"layer 1 has no attention .* keeps the config's "
                                        r"num_attention_heads = 4"):
        PruningSpec.from_config(cfg)
    mixed["shapes"] = {**ok, "num_attention_heads": [2, 4], "num_key_value_heads": [1, 2]}
    spec = PruningSpec.from_config(cfg)
    assert spec.kv_heads(cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == [1, 0]
    cfg = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 100, "harp_pruning": {**base, "shapes": ok}}
    with pytest.raises(UserError, match="intermediate_size' has 128, more than the config's"):
        PruningSpec.from_config(cfg)


def run_prune(src: Path, out: Path, *extra: str):
    calib = out.parent / "calib.txt"
    calib.write_text(CORPUS)
    return runner.invoke(app, ["prune", str(src), "--out", str(out), "--eval-windows", "0",
                               "--calib-file", str(calib), "--calib-samples", "4",
                               "--calib-seq-len", "24", *extra])


def test_prune_cli_head_methods(tiny_llama, tmp_path):
    out = tmp_path / "flap"
    res = run_prune(tiny_llama, out, "--method", "flap", "--ratio", "0.25", "--mlp-ratio", "0.5")
    assert res.exit_code == 0, res.output
    assert "heads removed 4/16" in res.output and "KV bytes/token" in res.output
    sec = json.loads((out / "config.json").read_text())["harp_pruning"]
    assert sec["method"] == "flap" and sec["layers"] == {}
    cal = sec["calibration"]
    assert (cal["allocation"], cal["bias_compensation"], cal["heads_removed"]) == (
        "global", True, 4)
    assert sum(sec["shapes"]["intermediate_size"]) == 4 * 128 // 2
    assert load_model(out) is not None


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "amp"], "needs --ratio"),
    (["--method", "amp", "--layers", "2"], "give --ratio"),
    (["--method", "wanda-sp", "--ratio", "1.0"], "--ratio must be in [0, 1)"),
    (["--method", "flap", "--ratio", "0.5", "--allocation", "adaptive"], "uniform or global"),
    (["--method", "amp", "--ratio", "0", "--mlp-ratio", "0"], "prune nothing"),
    (["--method", "wanda-sp", "--ratio", "0.4"], "removes no attention group with uniform"),
    (["--method", "pruneall", "--layers", "2"], "unknown --method 'pruneall'"),
])
def test_prune_cli_head_method_errors_leave_nothing_behind(tiny_llama, tmp_path, args, message):
    res = run_prune(tiny_llama, tmp_path / "out", *args)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert [p for p in tmp_path.iterdir() if "out" in p.name] == []


def test_head_methods_reject_families_the_plugin_cannot_serve(tmp_path):
    src = make_tiny_model("gemma2", tmp_path / "gemma2", layers=2)
    res = run_prune(src, tmp_path / "out", "--method", "amp", "--ratio", "0.5")
    assert res.exit_code == 2
    assert "supports model families llama, mistral, qwen2, gemma3_text" in res.output
    qwen = make_tiny_model("qwen2", tmp_path / "qwen2", layers=2)
    res = run_prune(qwen, tmp_path / "out", "--method", "flap", "--ratio", "0.5")
    assert res.exit_code == 2 and "use --no-bias-compensation" in res.output
    assert not (tmp_path / "out").exists()


def test_qwen2_keeps_its_qkv_biases_through_the_round_trip(tmp_path, windows):
    src = make_tiny_model("qwen2", tmp_path / "qwen2", layers=2)
    model = load_model(src)
    res = prune_structured(model, windows, "wanda-sp", 0.5, 0.25, "global", progress=False)
    spec = PruningSpec(layers={}, method="wanda-sp", shapes=shapes_of(model.config, res))
    out = save_pruned(model, spec, src, tmp_path / "pruned")
    state = load_file(out / "model.safetensors")
    assert state["model.layers.0.self_attn.q_proj.bias"].shape == (
        2 * len(res.kept_groups[0]) * D,)
    assert "model.layers.0.self_attn.o_proj.bias" not in state
    x = windows[:1]
    torch.testing.assert_close(load_model(out)(x).logits, model(x).logits, rtol=1e-6,
                               atol=1e-6)


def test_flap_on_mistral_round_trips_with_biases_its_hf_code_lacks(tmp_path, windows):
    src = make_tiny_model("mistral", tmp_path / "mistral", layers=2)
    model = load_model(src)
    res = prune_structured(model, windows, "flap", 0.5, 0.25, progress=False)
    x = windows[:1]
    spec = PruningSpec(layers={}, method="flap", shapes=shapes_of(model.config, res))
    out = save_pruned(model, spec, src, tmp_path / "flap")
    assert "model.layers.0.self_attn.o_proj.bias" in load_file(out / "model.safetensors")
    torch.testing.assert_close(load_model(out)(x).logits, model(x).logits, rtol=1e-6,
                               atol=1e-6)
