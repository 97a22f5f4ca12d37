"""What an A/B load test runs: its settings (``Config``; the load itself comes from a profile,
``loadtest/profiles/*.toml``, read by :mod:`.scenario_files`) and the ordered steps they make
(``plan``): the sweep of prompt lengths x concurrencies, repeated, then the capacity scenario
(one prompt length at rising concurrency).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The settings a profile file gives (every one of them; their types are Config's).
PROFILE_KEYS = ("prompt_lens", "concurrency", "output_len", "repeats", "requests_per_slot",
                "min_requests_per_run", "capacity", "capacity_prompt_len",
                "capacity_concurrency", "capacity_waves")


@dataclass(kw_only=True)
class Config:
    """One load test's settings: the endpoints, and the load of a profile (``PROFILE_KEYS``)."""

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
    # the profile's keys
    prompt_lens: list[int]
    concurrency: list[int]
    output_len: int
    repeats: int
    requests_per_slot: int
    min_requests_per_run: int
    capacity: bool
    capacity_prompt_len: int
    capacity_concurrency: list[int]
    capacity_waves: int
    requests_per_run: int = 0  # > 0: this many per run, instead of the per-slot rule
    run_timeout: float = 1800.0
    request_timeout: float = 30.0  # endpoint checks
    seed: int = 0
    temperature: float = 0.0
    profile: str | None = None  # where the load came from (recorded in results.json)
    comparison: str | None = None

    def n_requests(self, concurrency: int) -> int:
        if self.requests_per_run > 0:
            return self.requests_per_run
        return max(self.requests_per_slot * concurrency, self.min_requests_per_run)

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
