"""Quality checks with the real SmolLM2-135M-Instruct (prepared once per session)."""

import json
import math

import pytest
import torch

from harp_vllm import models
from harp_vllm.evaluation import data
from harp_vllm.evaluation.perplexity import make_windows, perplexity, tokenize
from harp_vllm.pruning.reference import load_model

pytestmark = pytest.mark.real_model


def test_prepared_directory_is_plain_fp32(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 30
    assert (smollm2_dir / "chat_template.jinja").is_file()
    mtime = (smollm2_dir / "config.json").stat().st_mtime_ns
    assert models.prepare("smollm2-135m", progress=False) == smollm2_dir  # no-op
    assert (smollm2_dir / "config.json").stat().st_mtime_ns == mtime


def test_wikitext_perplexity_beats_unigram_and_needs_word_order(smollm2_dir):
    tok = models.load_tokenizer(smollm2_dir)
    model = load_model(smollm2_dir)
    windows = make_windows(tokenize(tok, data.load_text("wikitext2", "test")), 2048, 4)
    ppl, _ = perplexity(model, windows, progress=False)

    # Unigram baseline fitted on the very tokens scored (an optimistic baseline).
    targets = windows[:, 1:].reshape(-1)
    counts = torch.bincount(targets).float()
    probs = counts[counts > 0] / counts.sum()
    unigram_ppl = math.exp(-(probs * probs.log()).sum().item())

    g = torch.Generator().manual_seed(0)
    shuffled = windows.reshape(-1)[torch.randperm(windows.numel(), generator=g)]
    shuffled_ppl, _ = perplexity(model, shuffled.view_as(windows)[:1], progress=False)

    assert math.isfinite(ppl) and 5 < ppl < 60
    assert ppl < unigram_ppl / 10, (ppl, unigram_ppl)
    assert shuffled_ppl > 5 * ppl, (shuffled_ppl, ppl)


def test_harp_prune_real_model_end_to_end(smollm2_dir, tmp_path):
    """Prune SmolLM2's top 2 layers with a tiny calibration; the checkpoint reloads exactly."""
    from harp_vllm.pruning.jobs.options import PruneOptions
    from harp_vllm.pruning.jobs.prune_job import run_prune

    out = tmp_path / "harp2"
    report = run_prune(PruneOptions(model=str(smollm2_dir), out=out, layers=2, calib_samples=2,
                                    calib_seq_len=128, eval_windows=1, eval_seq_len=512),
                       progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["HarpLlamaForCausalLM"]
    assert set(cfg["harp_pruning"]["layers"]) == {"28", "29"}
    assert cfg["harp_pruning"]["calibration"]["split"] == "validation"
    assert math.isfinite(report["ppl_after"])
    assert report["ppl_after"] < 1.5 * report["ppl_before"]  # two top layers cost little
    assert (out / "chat_template.jinja").is_file()
    size_dense = (smollm2_dir / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size < size_dense  # q/k are gone
