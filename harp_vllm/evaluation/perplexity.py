"""Perplexity with the standard protocol.

The text is tokenized once; the token stream is cut into non-overlapping windows of
``seq_len`` tokens (the tail shorter than a window is dropped); each window is scored
independently, and perplexity is ``exp`` of the mean next-token NLL over all predicted
tokens (``seq_len - 1`` per window). Computed in fp32 on the CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..errors import UserError


@dataclass
class PerplexityResult:
    """Summary of one perplexity run."""

    perplexity: float
    mean_nll: float
    seq_len: int
    windows: int
    tokens_scored: int
    total_tokens: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text as one 1-D tensor (tokenized once, tokenizer defaults)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return ids


def make_windows(ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[n, seq_len]``; errors if the text has not one full window."""
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    n = ids.numel() // seq_len
    if n == 0:
        raise UserError(f"the text has {ids.numel()} tokens, fewer than one window of "
                        f"--seq-len {seq_len}")
    if max_windows is not None:
        if max_windows < 1:
            raise UserError(f"--max-windows must be at least 1, got {max_windows}")
        n = min(n, max_windows)
    return ids[: n * seq_len].view(n, seq_len)


def window_nll(logits: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL per row: logits ``[b, T, V]``, tokens ``[b, T]`` -> ``[b]``."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, window[:, 1:, None]).squeeze(-1).sum(-1)


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module | Callable,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> tuple[float, float]:
    """(perplexity, mean NLL) of ``model`` (an HF causal LM) over ``windows``."""
    total = 0.0
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, disable=not progress,
                  unit="batch"):
        batch = windows[i : i + batch_size]
        logits = model(input_ids=batch).logits
        total += window_nll(logits, batch).sum().item()
    mean = total / (windows.shape[0] * (windows.shape[1] - 1))
    return math.exp(mean), mean


def evaluate_perplexity(model, tokenizer, text: str, seq_len: int,
                        max_windows: int | None = None, progress: bool = True
                        ) -> PerplexityResult:
    """Tokenize ``text`` once, cut windows, score them, and time the run."""
    ids = tokenize(tokenizer, text)
    windows = make_windows(ids, seq_len, max_windows)
    start = time.perf_counter()
    ppl, mean = perplexity(model, windows, progress=progress)
    return PerplexityResult(
        perplexity=ppl, mean_nll=mean, seq_len=seq_len, windows=windows.shape[0],
        tokens_scored=windows.shape[0] * (seq_len - 1), total_tokens=ids.numel(),
        seconds=time.perf_counter() - start,
    )
