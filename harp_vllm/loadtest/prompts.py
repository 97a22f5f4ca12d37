"""Real-text prompts cut to exact token counts, each with a unique prefix.

The text is WikiText-2 (the local raw test split, via
:func:`harp_vllm.evaluation.data.load_text`) or a user file. It is tokenized once with the
served model's tokenizer; every prompt is
``"<unique prefix> " + decode(corpus[offset : offset + k])`` with ``k`` adjusted until the
whole prompt encodes (with the tokenizer's special tokens, as vLLM's completions endpoint
does) to exactly the requested number of tokens. The prefix names a per-session nonce and a
global request counter, so no two requests of a session share even their first KV block:
prefix caching cannot flatter either side. The server's own ``usage.prompt_tokens`` is
recorded per request and checked against the intended length.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import dataclass
from pathlib import Path

from harp_vllm.errors import UserError


def load_corpus_text(data: str = "wikitext2", split: str = "test",
                     data_file: Path | None = None) -> str:
    """The source text: a user file, or a dataset split known to
    :mod:`harp_vllm.evaluation.data`."""
    from harp_vllm.evaluation import data as hdata

    if data_file is not None:
        return hdata.read_text_file(data_file)
    return hdata.load_text(data, split)


@dataclass
class Prompt:
    text: str
    tokens: int
    request_id: str


class PromptFactory:
    """Makes prompts of exact token lengths from one tokenized corpus."""

    def __init__(self, tokenizer, text: str, seed: int = 0, nonce: str | None = None):
        self.tok = tokenizer
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 64:
            raise UserError(f"the prompt text has only {len(ids)} tokens; need at least 64")
        self.corpus = ids
        self.rng = random.Random(seed)
        self.nonce = nonce or secrets.token_hex(3)
        self.counter = 0
        self.special = len(tokenizer("", add_special_tokens=True)["input_ids"])

    def count(self, text: str) -> int:
        """Tokens the server will see for ``text`` (with the tokenizer's special tokens)."""
        return len(self.tok(text, add_special_tokens=True)["input_ids"])

    def _body(self, offset: int, k: int) -> str:
        n = len(self.corpus)
        if k <= 0:
            return ""
        piece = [self.corpus[(offset + i) % n] for i in range(k)]
        return self.tok.decode(piece)

    def make(self, n_tokens: int) -> Prompt:
        """One prompt of exactly ``n_tokens`` tokens (raises if it cannot be hit exactly)."""
        self.counter += 1
        rid = f"lt-{self.nonce}-{self.counter:06d}"
        # The counter leads: prompts must differ within their first 16 tokens (vLLM's smallest
        # KV block), so no two share a cached prefix block.
        prefix = f"Request {self.counter} of session {self.nonce}. "
        base = self.count(prefix)
        if n_tokens < base + 1:
            raise UserError(f"prompt length {n_tokens} is too short (the unique prefix alone "
                            f"takes {base} tokens)")
        offset = self.rng.randrange(len(self.corpus))
        k = n_tokens - base
        seen: set[int] = set()
        for _ in range(12):
            text = prefix + self._body(offset, k)
            got = self.count(text)
            if got == n_tokens:
                return Prompt(text, n_tokens, rid)
            seen.add(k)
            k += n_tokens - got
            if k in seen:  # oscillating at a merge boundary: move the window and retry
                offset = (offset + 1) % len(self.corpus)
                seen.clear()
        raise UserError(f"could not cut a prompt of exactly {n_tokens} tokens")
