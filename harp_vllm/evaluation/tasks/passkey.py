"""``harp-vllm eval passkey``: synthetic passkey retrieval at long contexts, through vLLM.

The classic long-context probe (Landmark Attention, LongLoRA): a random 5-digit key is hidden
at a random depth of repetitive filler text and the model is asked to repeat it. No external
data. Each prompt is built to an exact token count with the model's own tokenizer, and starts
as the tokenizer starts a text (Gemma 3's BOS; SmolLM2 adds none)::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize
    it. I will quiz you about the important information there.
    <filler ...> The pass key is 41273. Remember it. 41273 is the pass key. <filler ...>
    What is the pass key? The pass key is

Greedy decoding of a few tokens; a trial is correct when the first 5-digit number in the
answer is the key. A small base model often answers in words instead (" the key that is used
to unlock the door"), which is a choice of format, not a failed retrieval; so each trial is
also asked once more with the answer's opening cued (the prompt plus the tokens before the
key's first digit, a space for SmolLM2 and Gemma 3): ``cued_correct`` when the greedy
digits then are the key, i.e. every digit is the model's top token given the ones before.
Scored through vLLM with the HARP plugin (``vllm.LLM`` in this process, so call it from a CLI
process or under ``if __name__ == "__main__":``).
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass

from ...errors import UserError

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.\n")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
# Room for an echo before the key: " the pass key. 93941." is 11 tokens for SmolLM2 and for
# Gemma 3 (one per digit); 8 cut Gemma 3's echoed keys short.
ANSWER_TOKENS = 16


@dataclass
class Trial:
    length: int  # prompt tokens
    depth: float  # where the key sits, 0 = start of the filler, 1 = end
    key: str
    prompt_ids: list[int]


def text_start(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text, as a text prompt served by vLLM
    begins: Gemma 3's ``<bos>`` (it is trained with it; the Gemma passkey figures before
    stop 45 were measured without), nothing for SmolLM2."""
    plain = tokenizer(INTRO, add_special_tokens=False)["input_ids"]
    served = tokenizer(INTRO)["input_ids"]
    for n in range(len(served) - len(plain) + 1):
        if served[n:n + len(plain)] == plain:
            return served[:n]
    return []


def build_trials(tokenizer, lengths: list[int], trials: int, seed: int = 0) -> list[Trial]:
    """``trials`` prompts of exactly each length (tokens, the tokenizer's BOS included),
    keys and depths seeded."""
    rng = random.Random(seed)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    intro, question, unit = text_start(tokenizer) + ids(INTRO), ids(QUESTION), ids(FILLER)
    out: list[Trial] = []
    for length in lengths:
        for _ in range(trials):
            key = f"{rng.randint(10000, 99999)}"
            needle = ids(NEEDLE.format(key=key))
            room = length - len(intro) - len(question) - len(needle)
            if room < len(unit):
                raise UserError(f"passkey length {length} is too short: the fixed text alone "
                                f"takes {length - room} tokens")
            filler = (unit * (room // len(unit) + 1))[:room]
            depth = rng.random()
            cut = round(depth * (room // len(unit))) * len(unit)  # at a filler boundary
            cut = min(cut, room)
            prompt = intro + filler[:cut] + needle + filler[cut:] + question
            assert len(prompt) == length
            out.append(Trial(length, cut / room, key, prompt))
    return out


def longest_filler(tokenizer, length: int) -> list[int]:
    """The intro and filler every trial of at most ``length`` tokens starts with."""
    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    intro, unit = text_start(tokenizer) + ids(INTRO), ids(FILLER)
    room = max(length - len(intro), len(unit))
    return intro + (unit * (room // len(unit) + 1))[:room]


WARM_STEP = 1024  # tokens between warm-up prompts (a multiple of vLLM's 128-token blocks)


def warm_up_lengths(longest: int) -> list[int]:
    """The filler warm-up prompts' lengths: every ``WARM_STEP`` tokens, then ``longest``.
    Together they cost about one prefill of ``longest`` (each hits the one before)."""
    return [*range(WARM_STEP, longest, WARM_STEP), longest]


def score(answer: str, key: str) -> bool:
    """Correct when the first 5-digit number in the answer is the key."""
    m = re.search(r"\d{5}", answer)
    return m is not None and m.group(0) == key


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"bad --lengths {text!r} (use e.g. 1024,2048,4096,7168)") from None
    if not lengths or min(lengths) < 64:
        raise UserError(f"--lengths needs token counts of at least 64, got {text!r}")
    return lengths


def answer_cue(tokenizer, key: str) -> list[int]:
    """The tokens of the answer " {key}" before its first digit (a space token for SmolLM2
    and Gemma 3, which give each digit its own token; empty if a digit starts the answer)."""
    ids = tokenizer(f" {key}", add_special_tokens=False)["input_ids"]
    for n, i in enumerate(ids):
        if any(ch.isdigit() for ch in tokenizer.decode([i])):
            return ids[:n]
    return ids


def passkey_on(llm, tokenizer, lengths: list[int], trials: int, seed: int = 0,
               progress: bool = True, cued: bool = False) -> list[dict]:
    """Per-trial rows (length, depth, key, answer, correct) from a running ``vllm.LLM``;
    with ``cued`` also ``cued_answer`` / ``cued_correct``: the answer to the same prompt with
    the answer's opening appended (``answer_cue``), asked right after a small group of plain
    trials (``trial_groups``) so that each hits its trial's prompt in the prefix cache
    (``cued_cached_tokens``: how much did), and ``cued_key_logprob`` (``key_logprob``)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    cases = build_trials(tokenizer, lengths, trials, seed)
    # Every prompt starts with the intro and the same filler up to its key: filler-only
    # prompts put that prefix in the prefix cache (when the engine has it on), so each trial
    # computes only the tokens from its key on (about half). One per WARM_STEP tokens, each
    # in its own call so it hits the one before: a sliding-window layer keeps only a prompt's
    # last window, so a trial hits no further than the longest warm-up prompt before its key.
    warm = longest_filler(tokenizer, max(lengths))
    one_token = SamplingParams(temperature=0.0, max_tokens=1)
    for n in warm_up_lengths(len(warm)):
        llm.generate([{"prompt_token_ids": warm[:n]}], one_token, use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=ANSWER_TOKENS)
    rows = []
    for group in trial_groups(cases, CUED_GROUP_TOKENS if cued else None):
        prompts: list[TokensPrompt] = [{"prompt_token_ids": c.prompt_ids} for c in group]
        outs = llm.generate(prompts, params, use_tqdm=progress and not cued)
        for c, o in zip(group, outs, strict=True):
            answer = o.outputs[0].text
            rows.append({"length": c.length, "depth": round(c.depth, 3), "key": c.key,
                         "answer": answer, "correct": score(answer, c.key)})
        if cued:
            cues = [answer_cue(tokenizer, c.key) for c in group]
            outs = llm.generate([{"prompt_token_ids": c.prompt_ids + cue}
                                 for c, cue in zip(group, cues, strict=True)],
                                SamplingParams(temperature=0.0, max_tokens=8, logprobs=0),
                                use_tqdm=False)
            for row, cue, o in zip(rows[-len(group):], cues, outs, strict=True):
                answer = tokenizer.decode(cue) + o.outputs[0].text
                row.update(cued_answer=answer, cued_correct=score(answer, row["key"]),
                           cued_key_logprob=key_logprob(tokenizer, row["key"], cue, o.outputs[0]),
                           cued_cached_tokens=getattr(o, "num_cached_tokens", None))
            if progress:
                print(f"passkey: {len(rows)}/{len(cases)} trials", flush=True)
    return rows


def key_logprob(tokenizer, key: str, cue: list[int], out) -> float | None:
    """The log-probability of the key's tokens after the cue (nats, summed), when the greedy
    answer is the key (its tokens are then the key's, each the top token); None otherwise or
    without the engine's logprobs. Below the accuracy's ceiling: how sure the retrieval is."""
    key_ids = tokenizer(f" {key}", add_special_tokens=False)["input_ids"][len(cue):]
    got, logprobs = list(getattr(out, "token_ids", []) or []), getattr(out, "logprobs", None)
    if not logprobs or got[:len(key_ids)] != key_ids:
        return None
    return float(sum(step[t].logprob for step, t in zip(logprobs, key_ids, strict=False)))


# Trials per call when each is asked twice: few enough that their prompts are still in the
# prefix cache when the cued copies come (a sliding-window model caches every layer's blocks,
# so all 200 trials of 1k-8k at once evicted the first ones: the cued pass cost a plain one).
CUED_GROUP_TOKENS = 65_536


def trial_groups(cases: list[Trial], tokens: int | None) -> list[list[Trial]]:
    """``cases`` in order, cut into runs of at most ``tokens`` prompt tokens (at least one
    trial each); all in one run when ``tokens`` is None."""
    if tokens is None:
        return [cases]
    groups: list[list[Trial]] = [[]]
    for c in cases:
        if groups[-1] and sum(t.length for t in groups[-1]) + c.length > tokens:
            groups.append([])
        groups[-1].append(c)
    return groups


def accuracy_by_length(rows: list[dict], lengths: list[int], items: bool = False
                       ) -> dict[str, dict]:
    """Per length: trials and accuracy (and with ``items`` each trial's 0/1); the cued
    accuracy too where the rows have it."""
    out: dict[str, dict] = {}
    for length in lengths:
        at = [r for r in rows if r["length"] == length]
        hits = [float(r["correct"]) for r in at]
        out[str(length)] = {"trials": len(hits), "accuracy": sum(hits) / len(hits),
                            **({"items": hits} if items else {})}
        if at and all("cued_correct" in r for r in at):
            cued = [float(r["cued_correct"]) for r in at]
            out[str(length)]["cued_accuracy"] = sum(cued) / len(cued)
            if items:
                out[str(length)]["cued_items"] = cued
    return out


def check_context(path, lengths: list[int]) -> None:
    """UserError unless the longest prompt and its answer fit the model's context."""
    from transformers import AutoConfig

    context = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
    if context is not None and max(lengths) + ANSWER_TOKENS + 1 > context:
        raise UserError(f"passkey length {max(lengths)} does not fit the model's context of "
                        f"{context} tokens with its {ANSWER_TOKENS}-token answer: use at most "
                        f"{context - ANSWER_TOKENS - 1}")


def run_passkey(model: str, lengths: list[int], trials: int, seed: int = 0,
                kv_cache_gb: float = 2.0, progress: bool = True) -> dict:
    """Accuracy by length through an in-process vLLM engine (fp32, eager, plugin loaded)."""
    from ... import models

    if trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}")
    path = models.resolve(model)
    tok = models.load_tokenizer(path)
    build_trials(tok, lengths, 1, seed)  # refuse bad lengths before the engine starts
    check_context(path, lengths)
    from vllm import LLM

    from .backends import engine_env

    engine_env(kv_cache_gb)

    start = time.perf_counter()
    llm = LLM(model=str(path), dtype="float32", enforce_eager=True, seed=seed,
              max_model_len=max(lengths) + ANSWER_TOKENS + 1, enable_prefix_caching=True)
    started = time.perf_counter() - start
    rows = passkey_on(llm, tok, lengths, trials, seed, progress, cued=True)
    return {"model": model, "path": str(path), "trials_per_length": trials, "seed": seed,
            "accuracy": accuracy_by_length(rows, lengths), "seconds": time.perf_counter() - start,
            "seconds_engine_start": started, "rows": rows}
