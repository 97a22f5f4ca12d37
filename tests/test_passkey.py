"""Passkey retrieval: prompt construction and scoring (the run through vLLM is in
test_quality.py, which drives the same ``passkey_on``)."""

from __future__ import annotations

from types import SimpleNamespace

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


@pytest.mark.real_model
def test_the_answer_budget_holds_an_echoed_key(smollm2_dir):
    """A model may echo the question before the key (Gemma 3 270M answers " the pass key.
    93941"): the greedy answer's token budget must hold the echo and the whole key, or a
    right answer is cut to " 939" and scored wrong (it was, with 8 tokens)."""
    from harp_vllm import models
    from harp_vllm.evaluation.tasks.passkey import ANSWER_TOKENS

    tok = models.load_tokenizer(smollm2_dir)
    echoed = tok(" the pass key. 93941.", add_special_tokens=False)["input_ids"]
    assert len(echoed) <= ANSWER_TOKENS
    assert score(tok.decode(echoed), "93941")


def test_prompts_start_as_the_tokenizer_starts_a_text():
    """A tokenizer that puts a BOS before a text (Gemma 3's) gets it at the start of every
    trial and warm-up prompt, inside the exact length; one that adds none (SmolLM2's, the
    tiny one) gets none, so its prompts are what they were."""
    from conftest import tiny_tokenizer

    from harp_vllm.evaluation.tasks.passkey import INTRO, longest_filler, text_start

    plain, with_bos = tiny_tokenizer(), tiny_tokenizer(bos=True)
    bos = with_bos.bos_token_id
    assert text_start(plain) == [] and text_start(with_bos) == [bos]
    for tok, start in ((plain, []), (with_bos, [bos])):
        intro = start + tok(INTRO, add_special_tokens=False)["input_ids"]
        for t in build_trials(tok, [300, 600], trials=3, seed=1):
            assert len(t.prompt_ids) == t.length
            assert t.prompt_ids[:len(intro)] == intro
            assert t.prompt_ids.count(bos) == len(start)
        warm = longest_filler(tok, 600)
        assert len(warm) == 600 and warm[:len(intro)] == intro


def test_score_and_lengths():
    assert score(" 41273. Remember", "41273")
    assert not score(" 41274", "41273")
    assert not score(" 4127", "41273")
    assert not score(" the key", "41273")
    assert not score(" 12345, then 41273", "41273")  # the first 5-digit number counts
    assert parse_lengths("1024, 2048") == [1024, 2048]
    with pytest.raises(UserError, match="--lengths"):
        parse_lengths("1k")


def test_passkey_on_marks_each_trial_by_its_answer():
    """``passkey_on``'s ``correct`` is set from each trial's own answer: answers scripted per
    trial (the key, a wrong key, the key after another number, the bare key) against the truth
    written out here, not recomputed with ``score``."""
    from conftest import tiny_tokenizer

    from harp_vllm.evaluation.tasks.passkey import accuracy_by_length, passkey_on

    tok = tiny_tokenizer()
    keys = [t.key for t in build_trials(tok, [600], trials=4, seed=5)]
    wrong = keys[1][:4] + str((int(keys[1][4]) + 1) % 10)  # the key with its last digit changed
    answers = [f" {keys[0]}. Remember it.", f" {wrong}.",
               f" 10000 or {keys[2]}", f" {keys[3]}"]

    class Scripted:
        def __init__(self):
            self.calls: list[int] = []

        def generate(self, prompts, params, use_tqdm=False):
            self.calls.append(len(prompts))
            texts = answers if len(prompts) == 4 else ["x"] * len(prompts)  # the warm-up
            return [SimpleNamespace(outputs=[SimpleNamespace(text=t)]) for t in texts]

    llm = Scripted()
    rows = passkey_on(llm, tok, [600], trials=4, seed=5, progress=False)
    assert llm.calls == [1, 4]
    assert [r["key"] for r in rows] == keys and [r["answer"] for r in rows] == answers
    assert [r["correct"] for r in rows] == [True, False, False, True]
    assert accuracy_by_length(rows, [600]) == {"600": {"trials": 4, "accuracy": 0.5}}


def test_the_cued_answer_is_asked_after_the_plain_one_with_the_answers_opening():
    """With ``cued``, every trial is asked a second time, after the plain call of its group
    (so each hits its prompt in the prefix cache), with the prompt plus the tokens of " KEY"
    before its first digit; ``cued_correct`` comes from that answer (cue included), the plain
    ``correct`` from the first, and the accuracy by length reports both."""
    from conftest import tiny_tokenizer

    from harp_vllm.evaluation.tasks.passkey import accuracy_by_length, answer_cue, passkey_on

    tok = tiny_tokenizer()
    trials = build_trials(tok, [600], trials=3, seed=4)
    keys = [t.key for t in trials]
    for k in keys:
        cue = answer_cue(tok, k)
        assert not any(ch.isdigit() for ch in tok.decode(cue))
        assert tok.decode(cue + tok(k, add_special_tokens=False)["input_ids"]).strip() == k

    def after_cue(text: str, key: str) -> str:  # what the model adds after the cue
        return text[len(tok.decode(answer_cue(tok, key))):]

    plain = [" the key that opens the door", f" {keys[1]}.", " the key"]
    cued = [after_cue(f" {keys[0]}. Remember", keys[0]), after_cue(f" {keys[1]}", keys[1]),
            after_cue(" 12345", keys[2])]
    sent: list[list[list[int]]] = []

    class Scripted:
        def generate(self, prompts, params, use_tqdm=False):
            sent.append([p["prompt_token_ids"] for p in prompts])
            texts = ["x"] if len(sent) == 1 else plain if len(sent) == 2 else cued
            return [SimpleNamespace(outputs=[SimpleNamespace(text=t)]) for t in texts]

    rows = passkey_on(Scripted(), tok, [600], trials=3, seed=4, progress=False, cued=True)
    assert [len(c) for c in sent] == [1, 3, 3]
    assert sent[1] == [t.prompt_ids for t in trials]
    assert sent[2] == [t.prompt_ids + answer_cue(tok, t.key) for t in trials]
    assert [r["correct"] for r in rows] == [False, True, False]
    assert [r["cued_correct"] for r in rows] == [True, True, False]
    acc = accuracy_by_length(rows, [600])["600"]
    assert acc["accuracy"] == pytest.approx(1 / 3) and acc["cued_accuracy"] == pytest.approx(2 / 3)


def test_cued_trials_go_in_groups_each_plain_then_cued(monkeypatch):
    """Asked twice, trials go in groups of at most CUED_GROUP_TOKENS prompt tokens, each group
    plain then cued, so a trial's cued copy follows its plain prompt closely enough to hit it
    in the prefix cache; every trial once in each pass, in order."""
    from conftest import tiny_tokenizer

    from harp_vllm.evaluation.tasks import passkey

    tok = tiny_tokenizer()
    monkeypatch.setattr(passkey, "CUED_GROUP_TOKENS", 1300)
    sent: list[list[list[int]]] = []

    class Recording:
        def generate(self, prompts, params, use_tqdm=False):
            sent.append([p["prompt_token_ids"] for p in prompts])
            return [SimpleNamespace(outputs=[SimpleNamespace(text=" 0")]) for _ in prompts]

    trials = build_trials(tok, [300, 600], trials=3, seed=6)
    rows = passkey.passkey_on(Recording(), tok, [300, 600], trials=3, seed=6, progress=False,
                              cued=True)
    # plain and cued calls alternate, group by group: 900 + 600 > 1300, then 1200, then 600
    assert [len(c) for c in sent[1:]] == [3, 3, 2, 2, 1, 1]
    assert [p for c in sent[1::2] for p in c] == [t.prompt_ids for t in trials]
    assert [p for c in sent[2::2] for p in c] == [t.prompt_ids + passkey.answer_cue(tok, t.key)
                                                  for t in trials]
    assert [r["key"] for r in rows] == [t.key for t in trials]


def test_the_key_logprob_sums_the_keys_tokens_only_when_the_answer_is_the_key():
    """``key_logprob`` adds the engine's log-probabilities of the key's own tokens (after the
    cue, not of what follows them), and is None for an answer that is not the key or an output
    without logprobs."""
    from conftest import tiny_tokenizer

    from harp_vllm.evaluation.tasks.passkey import answer_cue, key_logprob

    tok = tiny_tokenizer()
    key = "41273"
    cue = answer_cue(tok, key)
    key_ids = tok(f" {key}", add_special_tokens=False)["input_ids"][len(cue):]
    tail = tok(". Remember", add_special_tokens=False)["input_ids"]
    ids = key_ids + tail
    steps = [{t: SimpleNamespace(logprob=-0.1 * (i + 1))} for i, t in enumerate(ids)]
    out = SimpleNamespace(token_ids=ids, logprobs=steps)
    expected = -0.1 * sum(range(1, len(key_ids) + 1))
    assert key_logprob(tok, key, cue, out) == pytest.approx(expected)
    wrong = SimpleNamespace(token_ids=[ids[1], *ids[1:]], logprobs=steps)
    assert key_logprob(tok, key, cue, wrong) is None
    assert key_logprob(tok, key, cue, SimpleNamespace(token_ids=ids, logprobs=None)) is None


def test_a_length_past_the_models_context_is_refused_before_the_engine(tiny_llama):
    """The tiny model's context is 512 tokens: a 512-token passkey prompt plus its answer
    does not fit and is refused with the longest length that does; 500 fits."""
    from harp_vllm.evaluation.tasks.passkey import ANSWER_TOKENS, check_context

    check_context(tiny_llama, [256, 512 - ANSWER_TOKENS - 1])
    with pytest.raises(UserError, match="passkey length 512 does not fit the model's context "
                                        "of 512 tokens .* use at most 495"):
        check_context(tiny_llama, [256, 512])


def test_the_warm_up_prompts_are_each_trials_prefix_every_1024_tokens():
    """The warm-up sends filler prompts of 1,024, 2,048, ... tokens and the longest length,
    one call each and in that order (a sliding-window model's prefix cache hits only at the
    end of an earlier prompt), and each is token for token the start of every trial whose key
    lies beyond it: that is what lets a trial skip its prefix."""
    from conftest import tiny_tokenizer

    from harp_vllm.evaluation.tasks.passkey import NEEDLE, passkey_on, warm_up_lengths

    assert warm_up_lengths(600) == [600]
    assert warm_up_lengths(2048) == [1024, 2048]
    assert warm_up_lengths(3000) == [1024, 2048, 3000]
    tok = tiny_tokenizer()
    sent: list[list[list[int]]] = []

    class Recording:
        def generate(self, prompts, params, use_tqdm=False):
            sent.append([p["prompt_token_ids"] for p in prompts])
            return [SimpleNamespace(outputs=[SimpleNamespace(text=" 0")]) for _ in prompts]

    rows = passkey_on(Recording(), tok, [1500, 3000], trials=6, seed=2, progress=False)
    warm, trials = sent[:-1], sent[-1]
    assert [len(c) for c in warm] == [1, 1, 1] and len(trials) == 12
    assert [len(c[0]) for c in warm] == [1024, 2048, 3000]
    checked = 0
    for prompt, row in zip(trials, rows, strict=True):
        needle = tok(NEEDLE.format(key=row["key"]), add_special_tokens=False)["input_ids"]
        key_at = next(i for i in range(len(prompt)) if prompt[i:i + len(needle)] == needle)
        for w in (c[0] for c in warm if len(c[0]) <= key_at):
            assert prompt[:len(w)] == w
            checked += 1
    assert checked >= 6  # keys past 1,024 (and 2,048) tokens were there to check
