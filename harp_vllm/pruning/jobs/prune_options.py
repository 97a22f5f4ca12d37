"""The ``harp-vllm prune`` job's options and the parsers of its arguments (the alpha grid, the
linear maps' rank, the calibration shape each method defaults to)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError
from ...families import head_dim
from ..methods.alpha_search import DEFAULT_CALIB_SAMPLES, DEFAULT_CALIB_SEQ_LEN, DEFAULT_GRID

LAYER_METHODS = ("harp", "gate-norm", "hybrid")


def parse_grid(text: str) -> tuple[float, ...]:
    try:
        grid = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"bad --alpha-grid {text!r} (use e.g. 0,0.1,0.2)") from None
    if not grid:
        raise UserError("the alpha grid is empty")
    return grid


@dataclass
class PruneOptions:
    model: str
    out: Path
    method: str = "harp"
    layers: int | None = None
    ratio: float | None = None
    layer_list: str | None = None
    position: str = "top"
    alpha: float | None = None  # fixed alpha for every layer: no search
    grid: tuple[float, ...] = DEFAULT_GRID
    calib_data: str = "wikitext2"
    calib_split: str | None = None
    calib_file: Path | None = None
    calib_samples: int | None = None  # default: 8 (harp), 128 (amp, flap, wanda-sp)
    calib_seq_len: int | None = None  # default: 256 (harp), 128 (amp, flap, wanda-sp)
    mlp_ratio: float = 0.0  # amp, flap, wanda-sp: share of MLP channels removed
    allocation: str | None = None  # uniform | global (default: the method's own)
    bias_compensation: bool | None = None  # default: on for flap only
    seed: int = 0
    search: str = "fast"
    rank: str | None = None  # linear: an integer or "full" (default: HARP's n_kv * head_dim)
    map_input: str = "normed"  # linear: normed | raw
    ridge: float = 1e-3  # linear: ridge, relative to the mean input variance
    fit_order: str = "dense"  # linear: dense | sequential | residual
    refine_steps: int = 0  # linear: joint KL refinement steps after the closed-form fit
    select: str | None = None  # linear: damage (lowest single-layer KL; the default unless
    # --layer-list or --position is given) or top (by --position)
    select_windows: int = 8  # linear: calibration windows --select damage scores layers on
    eval_windows: int = 8
    eval_seq_len: int = 2048
    force: bool = False




def calibration_shape(opts: PruneOptions) -> tuple[int, int]:
    """(samples, tokens per sample): HARP's search default 8 x 256, the linear fit's 64 x 256
    (a d x d fit needs many tokens), or Wanda-sp/FLAP's 128 x 128."""
    default = ((DEFAULT_CALIB_SAMPLES, DEFAULT_CALIB_SEQ_LEN) if opts.method in LAYER_METHODS
               else (64, 256) if opts.method == "linear" else (128, 128))
    return (opts.calib_samples if opts.calib_samples is not None else default[0],
            opts.calib_seq_len if opts.calib_seq_len is not None else default[1])


def parse_rank(text: str | None, hf_cfg) -> int | None:
    """``--rank``: an integer, ``full`` (None), or by default HARP's folded width n_kv*d_h."""
    d = hf_cfg.hidden_size
    if text is None:
        return min(d, hf_cfg.num_key_value_heads * head_dim(hf_cfg))
    if str(text).lower() == "full":
        return None
    try:
        rank = int(text)
    except ValueError:
        raise UserError(f"--rank must be an integer or 'full', got {text!r}") from None
    if not 1 <= rank <= d:
        raise UserError(f"--rank {rank} is out of range: the hidden size is {d}, so a map has "
                        f"rank 1..{d} (or 'full')")
    return None if rank == d else rank
