"""Self-calibration (Williams, Chrysostomou and Aletras, NAACL 2025, arXiv 2410.17170):
calibration text sampled from the dense model itself, no external data. Each sequence starts
from the model's beginning-of-text token and is sampled token by token with a temperature that
falls linearly along it (more varied openings, more coherent continuations); special tokens
are never sampled, so every sequence has its full length. Cached per model and settings."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import UserError


@dataclass(frozen=True)
class SelfCalibration:
    """How much text to sample and how: ``sequences`` of ``tokens`` each."""

    sequences: int
    tokens: int
    t_start: float = 1.0  # our defaults (no test column chose them)
    t_end: float = 0.7
    seed: int = 0
    batch: int = 8

    def check(self) -> None:
        if self.sequences < 1 or self.tokens < 2:
            raise UserError(f"self-calibration needs at least 1 sequence of 2 tokens, got "
                            f"{self.sequences} x {self.tokens}")
        if self.t_start <= 0 or self.t_end <= 0:
            raise UserError(f"self-calibration temperatures must be > 0, got "
                            f"{self.t_start} -> {self.t_end}")


def temperatures(spec: SelfCalibration) -> torch.Tensor:
    """The temperature at each sampled position: linear from ``t_start`` to ``t_end``."""
    return torch.linspace(spec.t_start, spec.t_end, spec.tokens)


def start_token(tokenizer: Any) -> int:
    """The token every sequence starts from: BOS, else end-of-text (a document boundary)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise UserError("self-calibration needs a BOS or EOS token to start from; the tokenizer "
                    "has neither")


@torch.no_grad()
def sample_sequences(model: Any, tokenizer: Any, spec: SelfCalibration,
                     progress: bool = True) -> list[list[int]]:
    """``spec.sequences`` token lists of ``spec.tokens`` sampled tokens (the start token not
    included), seeded; special tokens masked out of every step."""
    spec.check()
    g = torch.Generator().manual_seed(spec.seed)
    temps = temperatures(spec)
    banned = sorted({int(t) for t in tokenizer.all_special_ids})
    start = start_token(tokenizer)
    out: list[list[int]] = []
    for b0 in range(0, spec.sequences, spec.batch):
        n = min(spec.batch, spec.sequences - b0)
        ids = torch.full((n, 1), start, dtype=torch.long)
        res = model(input_ids=ids, use_cache=True)
        past, rows = res.past_key_values, []
        for i in range(spec.tokens):
            logits = res.logits[:, -1, :].float()
            logits[:, banned] = float("-inf")
            probs = torch.softmax(logits / temps[i], dim=-1)
            nxt = torch.multinomial(probs, 1, generator=g)
            rows.append(nxt)
            if i + 1 < spec.tokens:
                res = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = res.past_key_values
        out.extend(torch.cat(rows, dim=1).tolist())
        if progress:
            print(f"  self-calibration: {len(out)} / {spec.sequences} sequences of "
                  f"{spec.tokens} tokens", flush=True)
    return out


def self_calibration_text(model: Any, tokenizer: Any, spec: SelfCalibration, source: str,
                          cache: Path | None = None, progress: bool = True
                          ) -> tuple[str, dict]:
    """(text, its source for the report): the sampled sequences decoded, one paragraph each.
    With ``cache`` (a directory) the text is read back when ``source`` and ``spec`` match."""
    calib = {"self": {"model": source, **asdict(spec)}}
    key = hashlib.sha256(json.dumps(calib, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"self-calibration-{key}.txt" if cache is not None else None
    if path is not None and path.is_file():
        return path.read_text(encoding="utf-8"), calib
    seqs = sample_sequences(model, tokenizer, spec, progress)
    text = "\n\n".join(tokenizer.decode(s, skip_special_tokens=True).strip() for s in seqs)
    if path is not None:  # written whole or not at all, as PlanStats.save does
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return text, calib
