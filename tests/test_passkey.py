"""``harp-vllm eval passkey``: prompt construction, scoring, and one run through vLLM."""

from __future__ import annotations

import json
import subprocess
import sys

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


@pytest.mark.vllm
@pytest.mark.real_model
@pytest.mark.timeout(900)
def test_passkey_through_vllm(smollm2_dir, tmp_path):
    out = tmp_path / "pk.json"
    proc = subprocess.run(
        [sys.executable, "-m", "harp_vllm.cli", "eval", "passkey", "--model", str(smollm2_dir),
         "--lengths", "256,512", "--trials", "4", "--kv-cache-gb", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert set(payload["accuracy"]) == {"256", "512"}
    assert len(payload["rows"]) == 8
    for row in payload["rows"]:
        assert row["correct"] == score(row["answer"], row["key"])
    assert "| 256 | 4 |" in proc.stdout
    # the dense model finds the key at these short lengths (measured: every trial)
    assert payload["accuracy"]["256"]["accuracy"] >= 0.75, payload["rows"]
