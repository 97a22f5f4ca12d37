"""What an A/B load test runs: its settings (``Config``, with the full and ``--quick``
presets) and the ordered steps they make (``plan``): the sweep of prompt lengths x
concurrencies, repeated, then the capacity scenario (one prompt length at rising concurrency).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FULL: dict[str, Any] = dict(prompt_lens=[512, 1024, 2048, 4096, 7168], concurrency=[1, 4, 16],
                            output_len=64, repeats=2, capacity_prompt_len=2048,
                            capacity_concurrency=[1, 2, 4, 6, 8, 12], capacity_waves=2)
QUICK: dict[str, Any] = dict(prompt_lens=[512, 2048], concurrency=[1, 4], output_len=16,
                             repeats=2, capacity_prompt_len=1024,
                             capacity_concurrency=[1, 2, 3, 4], capacity_waves=1)


@dataclass
class Config:
    """One load test's settings (the defaults: the full preset, ``FULL``)."""

    dense_url: str
    pruned_url: str
    model_dense: str | None = None
    model_pruned: str | None = None
    metrics_url_dense: str | None = None
    metrics_url_pruned: str | None = None
    tokenizer: str | None = None
    data: str = "wikitext2"
    data_split: str = "test"
    data_file: Path | None = None
    prompt_lens: list[int] = field(default_factory=lambda: list(FULL["prompt_lens"]))
    concurrency: list[int] = field(default_factory=lambda: list(FULL["concurrency"]))
    output_len: int = FULL["output_len"]
    requests_per_run: int = 0  # 0: 2 x concurrency (at least 4); quick: = concurrency
    repeats: int = FULL["repeats"]
    capacity: bool = True
    capacity_prompt_len: int = FULL["capacity_prompt_len"]
    capacity_concurrency: list[int] = field(
        default_factory=lambda: list(FULL["capacity_concurrency"]))
    capacity_waves: int = FULL["capacity_waves"]
    run_timeout: float = 1800.0
    request_timeout: float = 30.0  # endpoint checks
    seed: int = 0
    temperature: float = 0.0
    quick: bool = False  # default requests per run: one per concurrency slot

    def n_requests(self, concurrency: int) -> int:
        if self.requests_per_run > 0:
            return self.requests_per_run
        return concurrency if self.quick else max(2 * concurrency, 4)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["data_file"] = str(self.data_file) if self.data_file else None
        return d


@dataclass
class Step:
    scenario: str  # "sweep" or "capacity"
    repeat: int
    prompt_len: int
    concurrency: int
    n_requests: int


def plan(cfg: Config, max_len: int | None) -> tuple[list[Step], list[str]]:
    """The ordered steps (each run on A then B) and notes on skipped points."""
    notes = []
    lens = []
    for L in cfg.prompt_lens:
        if max_len is not None and L + cfg.output_len > max_len:
            notes.append(f"prompt length {L} skipped: {L} + {cfg.output_len} output tokens "
                         f"exceed the served max_model_len {max_len}")
        else:
            lens.append(L)
    steps = [Step("sweep", r, L, c, cfg.n_requests(c))
             for r in range(cfg.repeats) for L in lens for c in cfg.concurrency]
    if cfg.capacity:
        L = cfg.capacity_prompt_len
        if max_len is not None and L + cfg.output_len > max_len:
            notes.append(f"capacity scenario skipped: {L} + {cfg.output_len} tokens exceed "
                         f"max_model_len {max_len}")
        else:
            steps += [Step("capacity", 0, L, c, max(1, cfg.capacity_waves) * c)
                      for c in cfg.capacity_concurrency]
    return steps, notes
