"""The alpha search and the `harp-vllm prune` command on tiny models."""

import json
from pathlib import Path

import pytest
import torch
from conftest import CORPUS, make_tiny_model
from typer.testing import CliRunner

from harp_vllm import models
from harp_vllm.cli import app
from harp_vllm.errors import UserError
from harp_vllm.pruning.calibration.windows import calibration_windows
from harp_vllm.pruning.methods.alpha_search import fast_search, naive_search
from harp_vllm.pruning.reference import load_model
from harp_vllm.pruning.selection import parse_layer_list, select_layers

runner = CliRunner()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_fast_search_picks_the_same_alphas_as_naive(family, tmp_path):
    path = make_tiny_model(family, tmp_path / family, layers=5)
    model = load_model(path)
    windows = calibration_windows(models.load_tokenizer(path), CORPUS, 3, 32)
    grid = (0.0, 0.25, 0.5, 0.75, 1.0)
    fast = fast_search(model, windows, [2, 3, 4], grid, memory_budget_bytes=200_000,
                       progress=False)
    naive = naive_search(model, windows, [2, 3, 4], grid, progress=False)
    assert fast.alphas == naive.alphas
    for k in fast.calib_ppl:
        assert fast.calib_ppl[k] == pytest.approx(naive.calib_ppl[k], rel=1e-4)
    # the search really discriminates: the candidates' perplexities differ
    assert max(fast.calib_ppl[4]) > 1.01 * min(fast.calib_ppl[4])


def test_layer_selection():
    assert select_layers(30, count=8) == list(range(22, 30))
    assert select_layers(30, ratio=0.25) == list(range(22, 30))  # round(7.5) = 8
    assert select_layers(30, count=4, position="bottom") == [1, 2, 3, 4]
    assert select_layers(30, layer_list="3,5-7") == [3, 5, 6, 7]
    assert parse_layer_list("1-2,2") == [1, 2]
    with pytest.raises(UserError, match="out of range"):
        select_layers(30, layer_list="28-30")
    with pytest.raises(UserError, match="exactly one"):
        select_layers(30, count=2, ratio=0.1)
    with pytest.raises(UserError, match="cannot prune 31"):
        select_layers(30, count=31)


def test_calibration_errors(tiny_llama):
    tok = models.load_tokenizer(tiny_llama)
    with pytest.raises(UserError, match="empty"):
        calibration_windows(tok, "  ", 2, 16)
    with pytest.raises(UserError, match="too short"):
        calibration_windows(tok, "a few words", 2, 64)
    w = calibration_windows(tok, CORPUS, 4, 16, seed=3)
    assert w.shape == (4, 16)
    assert torch.equal(w, calibration_windows(tok, CORPUS, 4, 16, seed=3))


def prune(tiny, out, *extra):
    return runner.invoke(app, ["prune", str(tiny), "--out", str(out), "--eval-windows", "0",
                               "--calib-samples", "2", "--calib-seq-len", "32", *extra])


def leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if name in p.name]


def test_prune_cli_writes_a_checkpoint_and_eval_reads_it(tiny_llama, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(CORPUS)
    out = tmp_path / "harp"
    res = prune(tiny_llama, out, "--layers", "2", "--calib-file", str(calib),
                "--alpha-grid", "0,0.5,1")
    assert res.exit_code == 0, res.output
    assert "alpha" in res.output and "wrote" in res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["HarpLlamaForCausalLM"]
    sec = cfg["harp_pruning"]
    assert sec["version"] == 2 and sec["method"] == "harp" and "maps" not in sec
    assert set(sec["layers"]) == {"2", "3"} and sec["source_architecture"] == "LlamaForCausalLM"
    assert sec["calibration"]["samples"] == 2 and sec["calibration"]["seq_len"] == 32
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    # refuses to overwrite without --force, and keeps the checkpoint intact
    before = (out / "model.safetensors").read_bytes()
    res = prune(tiny_llama, out, "--layers", "2", "--calib-file", str(calib))
    assert res.exit_code == 2 and "already exists" in res.output
    assert (out / "model.safetensors").read_bytes() == before
    # eval ppl reads the pruned checkpoint directly
    res = runner.invoke(app, ["eval", "ppl", "--model", str(out), "--data-file", str(calib),
                              "--seq-len", "32"])
    assert res.exit_code == 0, res.output
    assert "perplexity" in res.output


@pytest.mark.parametrize(
    ("args", "calib", "message"),
    [(["--layers", "2"], "", "data file is empty"),
     (["--layers", "2"], "tiny text", "too short"),
     (["--layer-list", "3-9"], None, "layer index 4 out of range"),
     (["--layers", "1", "--calib-split", "test", "--calib-data", "wikitext2"], None,
      "leak the evaluation text")],
)
def test_prune_cli_errors_leave_nothing_behind(tiny_llama, tmp_path, args, calib, message):
    out = tmp_path / "harp"
    extra = []
    if calib is not None:
        (tmp_path / "c.txt").write_text(calib)
        extra = ["--calib-file", str(tmp_path / "c.txt")]
    res = prune(tiny_llama, out, *args, *extra)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert leftovers(tmp_path, "harp") == []


def test_prune_cli_rejects_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2)).save_pretrained(src)
    res = prune(src, tmp_path / "harp", "--layers", "1", "--alpha", "1")
    assert res.exit_code == 2 and "unsupported model family 'gpt2'" in res.output
    assert leftovers(tmp_path, "harp") == []
