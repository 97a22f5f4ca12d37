"""Passkey retrieval: prompt construction and scoring (the run through vLLM is in
test_quality.py, which drives the same ``passkey_on``)."""

from __future__ import annotations

import pytest

from harp_vllm.errors import UserError
from harp_vllm.evaluation.tasks.passkey import build_trials, parse_lengths, score


@pytest.mark.real_model
def test_trials_have_exact_lengths_and_hide_the_key(smollm2_dir):
    from harp_vllm import models

    tok = models.load_tokenizer(smollm2_dir)
    trials = build_trials(tok, [300, 1000], trials=20, seed=3)
    assert [t.length for t in trials] == [300] * 20 + [1000] * 20
    depths = []
    for t in trials:
        assert len(t.prompt_ids) == t.length
        text = tok.decode(t.prompt_ids)
        assert text.count(t.key) == 2 and text.endswith("The pass key is")
        depths.append(text.index(t.key) / len(text))
    assert min(depths) < 0.3 and max(depths) > 0.7  # keys spread over the context
    assert len({t.key for t in trials}) > 30
    again = build_trials(tok, [300, 1000], trials=20, seed=3)
    assert [t.prompt_ids for t in again] == [t.prompt_ids for t in trials]  # seeded
    with pytest.raises(UserError, match="too short"):
        build_trials(tok, [70], trials=1)


def test_score_and_lengths():
    assert score(" 41273. Remember", "41273")
    assert not score(" 41274", "41273")
    assert not score(" 4127", "41273")
    assert not score(" the key", "41273")
    assert parse_lengths("1024, 2048") == [1024, 2048]
    with pytest.raises(UserError, match="--lengths"):
        parse_lengths("1k")
