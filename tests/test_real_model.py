"""Quality checks with the real SmolLM2-135M-Instruct (prepared once per session)."""

import json
import math

import pytest
import torch

from harp_vllm import data, models
from harp_vllm.perplexity import make_windows, perplexity, tokenize

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
    model = models.load(smollm2_dir)
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
