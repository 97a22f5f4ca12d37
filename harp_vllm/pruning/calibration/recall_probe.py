"""A recall probe planted in calibration text: facts stated early in a long window and
recalled at its end, so the damage of a change that loses distant context is priced.

Each probe window is a long calibration window (validation text, never the report's) with
``needles`` short facts written over it at random depths in its first half::

    ... The secret code of the amber box is 41273. ...

and its last tokens replaced by the same facts in another order, recalled::

    ... The secret code of the amber box is 41273.
    The secret code of the violet box is 90318.

The probe's positions are those whose next token is a digit of a recalled code: the model
can predict them only by finding the fact thousands of tokens back. A **repetitive** probe
window first tiles the window's opening passage over its whole length (text that says the same
thing again and again, as logs and tables do). The wording and the text around the facts
differ from ``eval passkey`` (filler text, "pass key"), which is evaluation.
"""

from __future__ import annotations

import random

import torch

from ...errors import UserError

NAMES = ("amber", "violet", "copper", "silver", "olive", "coral", "ivory", "indigo")
FACT = " The secret code of the {name} box is {code}. "
RECALL = "\nThe secret code of the {name} box is {code}."


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def plant_recall(tokenizer, window: torch.Tensor, needles: int = 3, seed: int = 0,
                 first: float = 0.5, repeat: int = 0, depths: tuple[float, ...] = ()
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``window`` (1-D token ids; with ``repeat``, its first ``repeat`` tokens tiled over its
    length) with ``needles`` facts written in its first ``first`` fraction and recalled at its
    end; returns (ids, positions predicting a code's digits). With ``depths`` (fractions of
    the window in [0, 1)), one fact starts at each, so the recall reaches back over several
    distances (``needles`` is then their count)."""
    if depths:
        needles = len(depths)
        if not all(0 <= d < 1 for d in depths):
            raise UserError(f"recall depths must be fractions in [0, 1), got {list(depths)}")
    if not 1 <= needles <= len(NAMES):
        raise UserError(f"the recall probe takes 1 to {len(NAMES)} needles, got {needles}")
    rng = random.Random(seed)
    names = rng.sample(NAMES, needles)
    codes = [f"{rng.randint(10000, 99999)}" for _ in names]
    n = window.numel()
    ids = window[:repeat].repeat(-(-n // repeat))[:n].clone() if repeat else window.clone()
    order = list(range(needles))
    rng.shuffle(order)
    tail: list[int] = []
    picks: list[int] = []
    for i in order:  # the recall block, with where each code's digits sit in it
        head = _ids(tokenizer, RECALL.format(name=names[i], code="").rstrip("."))
        code = _ids(tokenizer, codes[i])
        picks += [len(tail) + len(head) - 1 + k for k in range(len(code))]
        tail += head + code + _ids(tokenizer, ".")
    facts = [_ids(tokenizer, FACT.format(name=nm, code=c)) for nm, c in zip(names, codes,
                                                                          strict=True)]
    width = max(len(f) for f in facts)
    start = n - len(tail)
    if depths:  # one fact at each depth, before the recall block and not overlapping
        slots = [min(int(d * n), start - width) for d in depths]
        ordered = sorted(slots)
        if any(b - a < width for a, b in zip(ordered, ordered[1:], strict=False)) or \
                ordered[0] < 0:
            raise UserError(f"recall depths {list(depths)}: facts overlap or reach the recall "
                            f"block in a {n}-token window")
    else:
        span = int(n * first) - width
        if span < needles * width or len(tail) >= n - int(n * first):
            raise UserError(f"a {n}-token window is too short for a {needles}-needle recall "
                            f"probe")
        slots = sorted(rng.sample(range(0, span, width), needles))
    for at, fact in zip(slots, facts, strict=True):
        ids[at:at + len(fact)] = torch.tensor(fact, dtype=ids.dtype)
    ids[start:] = torch.tensor(tail, dtype=ids.dtype)
    return ids, torch.tensor([start + p for p in picks])


def recall_windows(tokenizer, windows: torch.Tensor, needles: int = 3, seed: int = 0,
                   repeat: int = 0, depths: tuple[float, ...] = ()
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every window of ``windows`` [n, T] planted (seeded per window); every odd one made
    repetitive first (its opening ``repeat`` tokens tiled) when ``repeat`` is set. Returns the
    planted ids [n, T] and the probe positions [n, needles * digits]."""
    planted = [plant_recall(tokenizer, w, needles, seed + i, repeat=repeat if i % 2 else 0,
                            depths=depths)
               for i, w in enumerate(windows)]
    return torch.stack([p[0] for p in planted]), torch.stack([p[1] for p in planted])
