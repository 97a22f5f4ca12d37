"""Calibration text and windows: which text a job calibrates on (held out from evaluation)
and the seeded token windows cut from it."""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import UserError
from ...evaluation import data as data_mod
from ...evaluation.perplexity import make_windows, tokenize


def load_calibration_text(calib_data: str = "wikitext2", calib_split: str | None = None,
                          calib_file: Path | None = None) -> tuple[str, dict]:
    """(text, its source for the report): ``calib_file`` if given, else a dataset split."""
    if calib_file is not None:
        return data_mod.read_text_file(calib_file), {"file": str(calib_file)}
    # Held-out rule: locally calibrate on validation (test is for evaluation); on the hub, train.
    split = calib_split or ("train" if calib_data.startswith("hub:") else "validation")
    if calib_data == "wikitext2" and split == "test":
        raise UserError("calibrating on the test split would leak the evaluation text; use "
                        "validation (local) or train (hub)")
    return data_mod.load_text(calib_data, split), {"dataset": calib_data, "split": split}


def _chosen(n_windows: int, samples: int, seed: int) -> torch.Tensor:
    """Which of ``n_windows`` non-overlapping windows ``calibration_windows`` takes."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_windows, generator=g)[:samples]


def calibration_windows(tokenizer, text: str, samples: int, seq_len: int, seed: int = 0,
                        reserve_tail: int = 0) -> torch.Tensor:
    """``samples`` random windows of ``seq_len`` tokens (seeded) from ``text``, leaving out
    its last ``reserve_tail`` tokens (kept for ``tail_windows``: disjoint by construction)."""
    if samples < 1:
        raise UserError(f"--calib-samples must be at least 1, got {samples}")
    if not text.strip():
        raise UserError("calibration text is empty")
    ids = tokenize(tokenizer, text)
    if reserve_tail:
        if ids.numel() <= reserve_tail + seq_len:
            raise UserError(f"calibration text is too short: {ids.numel()} tokens, need more "
                            f"than {reserve_tail + seq_len} (the long windows keep its last "
                            f"{reserve_tail})")
        ids = ids[:-reserve_tail]
    if ids.numel() < seq_len + 1:
        raise UserError(f"calibration text is too short: {ids.numel()} tokens, need more than "
                        f"--calib-seq-len {seq_len}")
    if ids.numel() // seq_len >= samples:  # enough text: non-overlapping windows, shuffled
        all_windows = make_windows(ids, seq_len)
        return all_windows[_chosen(len(all_windows), samples, seed)]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (samples,), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def unused_long_windows(tokenizer, text: str, samples: int, seq_len: int, seed: int,
                        count: int, long_len: int) -> torch.Tensor:
    """``count`` windows of ``long_len`` tokens from ``text`` that share no token with the
    ``samples`` windows ``calibration_windows(tokenizer, text, samples, seq_len, seed)``
    takes (runs of consecutive unused ones, from the end of the text): long windows disjoint
    from the fits, with the fits' windows unchanged."""
    ids = tokenize(tokenizer, text)
    n = ids.numel() // seq_len
    if n < samples:
        raise UserError(f"calibration text is too short for disjoint long windows: {n} windows "
                        f"of {seq_len} tokens, the fits take {samples}")
    used = set(_chosen(n, samples, seed).tolist())
    need = -(-long_len // seq_len)
    out, run = [], 0
    for i in range(n - 1, -1, -1):  # from the end: a run of `need` unused windows
        run = run + 1 if i not in used else 0
        if run == need:
            out.append(ids[i * seq_len: i * seq_len + long_len])
            run = 0
            if len(out) == count:
                return torch.stack(out)
    raise UserError(f"calibration text is too short: {len(out)} of {count} long windows of "
                    f"{long_len} tokens fit between the fits' windows")


def tail_windows(tokenizer, text: str, count: int, seq_len: int) -> torch.Tensor:
    """The last ``count * seq_len`` tokens of ``text`` as ``count`` consecutive windows (the
    long windows: the fits' ``calibration_windows(..., reserve_tail=count * seq_len)`` never
    read them)."""
    ids = tokenize(tokenizer, text)
    if ids.numel() < count * seq_len:
        raise UserError(f"calibration text is too short for {count} long windows of {seq_len} "
                        f"tokens: {ids.numel()} tokens")
    return ids[ids.numel() - count * seq_len:].view(count, seq_len)


def mixed_calibration_windows(tokenizer, domains: list[str], samples: int, seq_len: int,
                              seed: int = 0, long: tuple[int, int] = (0, 0)
                              ) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    """``samples`` windows from the **dev** parts of several domains
    (:mod:`harp_vllm.evaluation.domains`), interleaved one domain after another so any
    leading slice (the damage windows, say) covers every domain evenly; and with ``long`` =
    (count, length), that many long windows from the domains' tails in turn (disjoint from
    the others)."""
    from ...evaluation.domains import DOMAINS, domain_text

    if not domains:
        raise UserError("--calib-mix is empty (give some of "
                        f"{', '.join(DOMAINS)})")
    per = -(-samples // len(domains))
    n_long, long_len = long
    long_per = -(-n_long // len(domains)) if n_long else 0
    parts, tails = [], []
    for i, d in enumerate(domains):
        chars = None if d == "wikitext" else ((per + 2) * seq_len + long_per * long_len) * 8
        text = domain_text(d, "dev", max_chars=chars)
        parts.append(calibration_windows(tokenizer, text, per, seq_len, seed + i,
                                         reserve_tail=long_per * long_len))
        if long_per:
            tails.append(tail_windows(tokenizer, text, long_per, long_len))
    order = [parts[i % len(domains)][i // len(domains)] for i in range(samples)]
    long_windows = (torch.stack([tails[i % len(domains)][i // len(domains)]
                                 for i in range(n_long)]) if n_long else None)
    return torch.stack(order), {"mix": list(domains), "part": "dev"}, long_windows
