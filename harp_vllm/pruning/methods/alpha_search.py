"""HARP's alpha search: top-down greedy over a grid, minimising calibration perplexity.

For k from the top pruned layer down, with the layers above k pruned at their chosen alpha and
the layers below k dense, alpha_k = argmin over the grid of calibration perplexity.

``fast_search`` exploits that the dense hidden states entering layer k do not depend on any
alpha: one dense pass captures them (and each layer's call arguments: mask, rotary
embeddings), and each candidate runs only layers k..L-1 and the head. Candidates are stacked
along the batch (alpha as a per-row tensor) in chunks bounded by a memory budget.
``naive_search`` runs the full model per candidate; both give the same choice.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ...errors import UserError
from ...evaluation.perplexity import window_nll
from ..calibration.logits import head_logits
from ..reference import decoder_layers, pruned

DEFAULT_GRID = tuple(round(0.1 * i, 1) for i in range(11))
DEFAULT_CALIB_SAMPLES = 8
DEFAULT_CALIB_SEQ_LEN = 256


@dataclass
class SearchResult:
    """Chosen alpha per layer and the calibration perplexity of every candidate."""

    alphas: dict[int, float]
    grid: tuple[float, ...]
    calib_ppl: dict[int, list[float]] = field(default_factory=dict)  # layer -> ppl per grid
    seconds: float = 0.0


def _check_grid_and_layers(model, layers: list[int], grid) -> list[int]:
    if not grid:
        raise UserError("the alpha grid is empty")
    n = len(decoder_layers(model))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise UserError(f"layer index {bad[0]} out of range (the model has {n} layers: "
                        f"0..{n - 1})")
    return sorted(set(layers), reverse=True)


@torch.inference_mode()
def _capture(model, windows: torch.Tensor, first: int):
    """Dense hidden states entering each layer >= ``first`` (per window) and their kwargs."""
    layers = decoder_layers(model)
    hidden: dict[int, list[torch.Tensor]] = {i: [] for i in range(first, len(layers))}
    kwargs: dict[int, dict] = {}

    def hook_for(i):
        def hook(module, args, kw):
            hidden[i].append(args[0] if args else kw["hidden_states"])
            kwargs.setdefault(i, {k: v for k, v in kw.items() if k != "hidden_states"})
        return hook

    handles = [layers[i].register_forward_pre_hook(hook_for(i), with_kwargs=True)
               for i in range(first, len(layers))]
    try:
        for w in windows:
            model.model(input_ids=w[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return hidden, kwargs


@torch.inference_mode()
def fast_search(model, windows: torch.Tensor, layers: list[int], grid=DEFAULT_GRID,
                memory_budget_bytes: int = 1 << 30, progress: bool = True) -> SearchResult:
    """Greedy top-down alpha search, running only layers k..L-1 per candidate."""
    start = time.perf_counter()
    order = _check_grid_and_layers(model, layers, grid)
    n_layers = len(decoder_layers(model))
    hidden, kwargs = _capture(model, windows, order[-1])
    n, t = windows.shape
    per_row = t * model.config.vocab_size * 4 * 3  # logits, log-softmax, slack
    rows_per_chunk = max(1, memory_budget_bytes // per_row)
    rows = [(a, s) for a in range(len(grid)) for s in range(n)]
    chosen: dict[int, float] = {}
    result = SearchResult(alphas=chosen, grid=tuple(grid))
    bar = tqdm(total=len(order) * math.ceil(len(rows) / rows_per_chunk), disable=not progress,
               desc="alpha search (fast)", unit="chunk")
    for k in order:
        nll = torch.zeros(len(grid), dtype=torch.float64)
        for c in range(0, len(rows), rows_per_chunk):
            chunk = rows[c : c + rows_per_chunk]
            h = torch.cat([hidden[k][s] for _, s in chunk])
            alpha = torch.tensor([grid[a] for a, _ in chunk], dtype=h.dtype).view(-1, 1, 1)
            target = windows[[s for _, s in chunk]]
            with pruned(model, {**chosen, k: alpha}):
                for j in range(k, n_layers):
                    h = decoder_layers(model)[j](h, **kwargs[j])
            row_nll = window_nll(head_logits(model, h), target)
            for (a, _), v in zip(chunk, row_nll.tolist(), strict=True):
                nll[a] += v
            bar.update()
        ppl = torch.exp(nll / (n * (t - 1))).tolist()
        result.calib_ppl[k] = ppl
        chosen[k] = float(grid[int(torch.argmin(nll))])
        bar.set_postfix({f"alpha[{k}]": chosen[k]})
    bar.close()
    result.seconds = time.perf_counter() - start
    return result


@torch.inference_mode()
def naive_search(model, windows: torch.Tensor, layers: list[int], grid=DEFAULT_GRID,
                 batch_size: int = 4, progress: bool = True) -> SearchResult:
    """The same greedy search, with a full forward pass per candidate (the baseline)."""
    start = time.perf_counter()
    order = _check_grid_and_layers(model, layers, grid)
    n, t = windows.shape
    chosen: dict[int, float] = {}
    result = SearchResult(alphas=chosen, grid=tuple(grid))
    bar = tqdm(total=len(order) * len(grid), disable=not progress, desc="alpha search (naive)",
               unit="cand")
    for k in order:
        nll = torch.zeros(len(grid), dtype=torch.float64)
        for a, alpha in enumerate(grid):
            with pruned(model, {**chosen, k: float(alpha)}):
                for b in range(0, n, batch_size):
                    batch = windows[b : b + batch_size]
                    logits = model(input_ids=batch, use_cache=False).logits
                    nll[a] += window_nll(logits, batch).sum().item()
            bar.update()
        result.calib_ppl[k] = torch.exp(nll / (n * (t - 1))).tolist()
        chosen[k] = float(grid[int(torch.argmin(nll))])
    bar.close()
    result.seconds = time.perf_counter() - start
    return result
