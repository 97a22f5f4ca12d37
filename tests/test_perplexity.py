import math
from types import SimpleNamespace

import pytest
import torch

from harp_vllm import models
from harp_vllm.errors import UserError
from harp_vllm.evaluation.perplexity import (
    evaluate_perplexity,
    make_windows,
    perplexity,
    window_nll,
)
from harp_vllm.pruning.reference import load_model


def test_windows_are_non_overlapping_and_drop_the_tail():
    ids = torch.arange(10)
    w = make_windows(ids, 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert make_windows(ids, 3, max_windows=2).shape == (2, 3)
    with pytest.raises(UserError, match="fewer than one window"):
        make_windows(ids, 11)


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    vocab = 37

    def uniform(input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, vocab))

    windows = torch.randint(0, vocab, (3, 8))
    ppl, nll = perplexity(uniform, windows, progress=False)
    assert ppl == pytest.approx(vocab, rel=1e-5)
    assert nll == pytest.approx(math.log(vocab), rel=1e-6)


def test_window_nll_matches_hf_loss(tiny_llama):
    model = load_model(tiny_llama)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    per_row = window_nll(out.logits, ids)
    assert per_row.sum().item() / (2 * 15) == pytest.approx(out.loss.item(), rel=1e-5)


def test_evaluate_perplexity_on_tiny_model(tiny_llama):
    tok = models.load_tokenizer(tiny_llama)
    res = evaluate_perplexity(load_model(tiny_llama), tok, "hello world " * 200, 32,
                              max_windows=3, progress=False)
    assert res.windows == 3 and res.tokens_scored == 3 * 31
    assert math.isfinite(res.perplexity) and res.perplexity > 1
