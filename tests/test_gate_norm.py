"""Gate-Norm scoring and the gate-norm / hybrid prune methods on tiny models."""

import json

import pytest
import torch
from conftest import CORPUS, make_tiny_model
from typer.testing import CliRunner

from harp_vllm.cli import app
from harp_vllm.errors import UserError
from harp_vllm.pruning.methods.gate_norm import gate_norm_scores, lowest_scoring
from harp_vllm.pruning.reference import load_model

runner = CliRunner()


def direct_score(model, i: int) -> float:
    """||W_Q,h W_K,g(h)^T||_F over heads, materialising each d x d matrix."""
    cfg = model.config
    attn = model.model.layers[i].self_attn
    d_h = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    r = cfg.num_attention_heads // cfg.num_key_value_heads
    wq, wk = attn.q_proj.weight.double(), attn.k_proj.weight.double()
    total = 0.0
    for h in range(cfg.num_attention_heads):
        g = h // r
        m = wq[h * d_h:(h + 1) * d_h].T @ wk[g * d_h:(g + 1) * d_h]  # [d, d]
        total += (m**2).sum().item()
    scale = (getattr(cfg, "query_pre_attn_scalar", None) or d_h) ** -0.5
    return scale * total**0.5


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_score_equals_direct_computation(family, tmp_path):
    path = make_tiny_model(family, tmp_path / family, layers=5)
    model = load_model(path)
    scores = gate_norm_scores(path)
    assert sorted(scores) == list(range(5))
    for i, s in scores.items():
        assert s == pytest.approx(direct_score(model, i), rel=1e-9)


def test_lowest_scoring():
    assert lowest_scoring({0: 5.0, 1: 1.0, 2: 3.0, 3: 1.0}, 2) == [1, 3]
    with pytest.raises(UserError, match="cannot remove 5"):
        lowest_scoring({0: 1.0}, 5)


def test_gate_norm_prune_removes_the_lowest_scoring_sublayers(tmp_path):
    src = make_tiny_model("llama", tmp_path / "src", layers=6, seed=3)
    # make layer 1 and 4 clearly the least coupled
    from safetensors.torch import load_file, save_file

    state = load_file(src / "model.safetensors")
    for i in (1, 4):
        state[f"model.layers.{i}.self_attn.q_proj.weight"] *= 0.1
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "gn"
    res = runner.invoke(app, ["prune", str(src), "--out", str(out), "--method", "gate-norm",
                              "--layers", "2", "--eval-windows", "0"])
    assert res.exit_code == 0, res.output
    sec = json.loads((out / "config.json").read_text())["harp_pruning"]
    assert sec["method"] == "gate-norm" and sec["layers"] == {"1": 0.0, "4": 0.0}
    scores = {int(k): v for k, v in sec["calibration"]["gate_norm"].items()}
    assert lowest_scoring(scores, 2) == [1, 4]
    # the pruned model is the dense one without those attention sublayers
    pruned_model, dense = load_model(out), load_model(src)
    x = torch.randint(0, 300, (1, 16))
    for i in (1, 4):
        dense.model.layers[i].self_attn.register_forward_hook(
            lambda m, a, o: (torch.zeros_like(o[0]), o[1]))
    with torch.no_grad():
        assert torch.equal(pruned_model(input_ids=x).logits, dense(input_ids=x).logits)


def test_hybrid_searches_alphas_on_gate_norm_layers(tmp_path):
    src = make_tiny_model("llama", tmp_path / "src", layers=5)
    calib = tmp_path / "c.txt"
    calib.write_text(CORPUS)
    out = tmp_path / "hy"
    res = runner.invoke(app, ["prune", str(src), "--out", str(out), "--method", "hybrid",
                              "--layers", "2", "--calib-file", str(calib), "--calib-samples",
                              "2", "--calib-seq-len", "32", "--eval-windows", "0"])
    assert res.exit_code == 0, res.output
    sec = json.loads((out / "config.json").read_text())["harp_pruning"]
    scores = {int(k): v for k, v in sec["calibration"]["gate_norm"].items()}
    assert sorted(int(k) for k in sec["layers"]) == lowest_scoring(scores, 2)
    assert set(sec["calibration"]["calib_ppl"]) == set(sec["layers"])


def test_gate_norm_rejects_explicit_layers(tiny_llama, tmp_path):
    res = runner.invoke(app, ["prune", str(tiny_llama), "--out", str(tmp_path / "x"),
                              "--method", "gate-norm", "--layer-list", "1,2"])
    assert res.exit_code == 2 and "chooses its own layers" in res.output
