"""Sink logits of windowed layers: one logit per query head that every query of a windowed
layer adds to its softmax as one more key with no value (vLLM's ``sinks``, served beside a
sliding window by stock vLLM), standing in for the first tokens the window drops (the
attention sink: StreamingLLM). Without it a window changes a layer's output at every position
past the window even where the distant text itself does not matter (docs/results.md, sections
11-12).

Fitted in closed form (``fit_sinks``): a head's logit is the median, over the calibration
queries past the window, of the log-sum-exp of their logits on the first ``SINK_TOKENS`` keys
(the dense model's own sink mass), less an optional ``offset``. vLLM adds the logit to every
query, also before the window is full, where the real first tokens are still in view and the
sink counts their mass twice. A lower logit is a poor trade for that (docs/results.md, section
12); nearly all of the short-context change comes from a few layers, so a layer keeps its sink
only where the sink alone changes short prompts (the first ``SHORT_CONTEXT`` tokens) by at
most ``SINK_MAX_SHORT_KL`` (``short_context_costs``); a layer over the cap drops its sink
("drop", the default) or keeps it lowered by the smallest offset that meets the cap ("lower":
``lower_to_cap``), or, when the planner picks the layout, is not offered that window at all
("no-window": ``sink_costs_by_window``, priced before the solve). Served for the families
whose record
says ``window_sinks`` (Llama-like attention: q/k/v/o and rotary, no QK norm).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ...errors import UserError
from ...families import check_served
from .model_layers import decoder_layers
from .sliding_windows import attach_window

SINK_TOKENS = 4
DEFAULT_SINK_OFFSET = 0.0
SINK_MAX_SHORT_KL = 1e-3  # a layer's sink costing more than this at short contexts: none
# what a layer whose sink costs more than the cap gets
SINK_OVER_CAPS = ("drop", "lower", "no-window")
DEFAULT_SINK_OVER_CAP = "drop"
SHORT_CONTEXT = 256  # the positions a sink's short-context cost is measured on
LOWER_MAX = 16.0  # the largest extra offset ``lower_to_cap`` tries (e^-16: no sink left)
LOWER_STEPS = 8  # its bisection's halvings (16 / 2^8 = 0.0625)


def _heads(attn: Any) -> int:
    return attn.q_proj.out_features // attn.head_dim


def project_qkv(attn: Any, hidden_states: torch.Tensor, position_embeddings: Any
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
    return q, k, v


def _sink_forward(self: Any, hidden_states: torch.Tensor, position_embeddings: Any = None,
                  attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The windowed attention (``attention_mask`` is the window's, set by the window hook)
    with the sink as one more key: q' = [q, 1], k_sink = [0, s_h / scale], v_sink = 0."""
    q, k, v = project_qkv(self, hidden_states, position_embeddings)
    if past_key_values is not None:
        cos, sin = position_embeddings
        k, v = past_key_values.update(k, v, self.layer_idx, {"sin": sin, "cos": cos})
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    b, h, t, d = q.shape
    q = torch.cat([q, q.new_ones(b, h, t, 1)], -1)
    sink = torch.zeros(b, h, 1, d + 1, dtype=k.dtype)
    sink[..., -1] = (self.sinks.to(k.dtype) / self.scaling).view(1, h, 1)
    k = torch.cat([torch.cat([k, k.new_zeros(*k.shape[:3], 1)], -1), sink], 2)
    v = torch.cat([v, v.new_zeros(b, h, 1, d)], 2)
    mask = attention_mask
    if mask is None:  # causal over the cached and new keys (the sink key, last, is seen by all)
        n = k.shape[2] - 1
        seen = torch.arange(n)[None, :] <= torch.arange(n - t, n)[:, None]
        mask = seen[None, None]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
    mask = torch.cat([mask, mask.new_zeros(*mask.shape[:-1], 1)], -1)
    out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                     scale=self.scaling)
    return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), None


def _install(attn: Any, values: torch.Tensor) -> None:
    """``attn.sinks`` (a parameter: ``self_attn.sinks`` in the checkpoint) and the forward
    that adds it."""
    attn.sinks = nn.Parameter(values.detach().float().clone().reshape(-1),
                              requires_grad=False)
    attn.forward = types.MethodType(_sink_forward, attn)


def attach_sinks(attn: Any, sinks: torch.Tensor | None = None) -> None:
    """Give a windowed HF attention module (``attach_window`` first) sink logits
    ``self_attn.sinks`` [heads] (zeros to be loaded, if None) and the forward that adds them."""
    if getattr(attn, "harp_window", None) is None:
        raise UserError("a sink logit needs a windowed layer (in 'windows')")
    n = _heads(attn)
    have = isinstance(getattr(attn, "sinks", None), nn.Parameter)
    if have and sinks is None:  # fitted already: kept
        return
    value = torch.zeros(n) if sinks is None else sinks.detach().float().reshape(-1)
    if value.numel() != n:
        raise UserError(f"sink logits: {value.numel()} values for {n} query heads")
    if have:
        attn.sinks.data.copy_(value)
        return
    _install(attn, value)


def attach_window_sinks(model: Any, windows: dict[int, int],
                        sinks: dict[int, torch.Tensor]) -> None:
    """Give each layer of ``sinks`` its window (``windows``) and those sink logits, for good
    (what ``apply_pruning`` then keeps and the checkpoint writes)."""
    layers: Any = decoder_layers(model)
    for j, values in sinks.items():
        attach_window(layers[j].self_attn, windows[j])
        attach_sinks(layers[j].self_attn, values)


@contextlib.contextmanager
def sinks_added(model: Any, sinks: dict[int, torch.Tensor]) -> Iterator[None]:
    """Temporarily give layers' attention modules sink logits; each layer's window comes
    from elsewhere while they are in place (the planner's ``WindowedAttention`` around the
    module, or ``windowed``), which hands the sink forward the window's mask."""
    layers: Any = decoder_layers(model)
    mods: list[Any] = [layers[j].self_attn for j in sinks]
    try:
        for attn, values in zip(mods, sinks.values(), strict=True):
            _install(attn, values)
        yield
    finally:
        for attn in mods:
            attn.__dict__.pop("forward", None)
            if "sinks" in attn._parameters:
                del attn.sinks


@torch.no_grad()
def fit_sinks(model: Any, windows: dict[int, int], ids: torch.Tensor,
              offset: float = DEFAULT_SINK_OFFSET) -> dict[int, torch.Tensor]:
    """Per windowed layer, each query head's sink logit from the dense model on ``ids``
    [n, T], less ``offset`` (see the module docstring); run with every layer dense."""
    check_served(model.config, lambda f: f.window_sinks, "window sinks are")
    layers: Any = decoder_layers(model)
    seen: dict[int, list[torch.Tensor]] = {j: [] for j in windows}

    def hook_for(j: int):
        def hook(attn, args, kw):
            q, k, _ = project_qkv(attn, kw["hidden_states"], kw["position_embeddings"])
            k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)[:, :, :SINK_TOKENS]
            past = q[:, :, windows[j]:]  # the queries whose window drops the first tokens
            if past.shape[2]:
                lse = (past @ k.transpose(-1, -2) * attn.scaling).logsumexp(-1)  # b, h, t
                seen[j].append(lse.transpose(0, 1).reshape(lse.shape[1], -1))
        return hook

    handles = [layers[j].self_attn.register_forward_pre_hook(hook_for(j), with_kwargs=True)
               for j in windows]
    try:
        model.model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    short = [j for j, v in seen.items() if not v]
    if short:
        raise UserError(f"sink fit: the calibration windows ({ids.shape[1]} tokens) are not "
                        f"longer than the windows of layers {short}")
    return {j: torch.cat(v, -1).median(-1).values - offset for j, v in seen.items()}


def short_cost(model: Any, ids: torch.Tensor, positions: int = SHORT_CONTEXT
               ) -> Callable[[int, int, torch.Tensor], float]:
    """``cost(j, window, values)``: KL(dense || dense with layer ``j``'s sink ``values``
    alone) per token over the first ``positions`` positions of ``ids`` [n, T] (never past
    the layer's window): what the sink costs on short prompts, where the real first tokens
    are still in view (vLLM adds it there too). Averaged over longer text the cost shrinks
    (the sink's share of a growing softmax), which would hide what a short prompt pays."""
    def logprobs(row: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(model(input_ids=row[None], use_cache=False).logits[0].float(),
                                 -1)

    ids = ids[:, :positions]  # causal: the later positions change nothing before them
    with torch.no_grad():
        dense = [logprobs(row) for row in ids]

    @torch.no_grad()
    def cost(j: int, window: int, values: torch.Tensor) -> float:
        n = min(window, ids.shape[1])
        total = 0.0
        with sinks_added(model, {j: values}):
            for row, ref in zip(ids, dense, strict=True):
                lp = logprobs(row[:n])
                total += float((ref[:n].exp() * (ref[:n] - lp)).sum(-1)[1:].sum())
        return total / (len(ids) * (n - 1))

    return cost


def short_context_costs(model: Any, windows: dict[int, int], sinks: dict[int, torch.Tensor],
                        ids: torch.Tensor, positions: int = SHORT_CONTEXT
                        ) -> dict[int, float]:
    """Per layer of ``sinks``, its sink's short-context cost alone (``short_cost``)."""
    cost = short_cost(model, ids, positions)
    return {j: cost(j, windows[j], values) for j, values in sinks.items()}


def lower_to_cap(cost: Callable[[int, int, torch.Tensor], float], windows: dict[int, int],
                 sinks: dict[int, torch.Tensor], costs: dict[int, float], cap: float,
                 high: float = LOWER_MAX, steps: int = LOWER_STEPS
                 ) -> tuple[dict[int, float], dict[int, float]]:
    """For each layer whose sink costs more than ``cap`` on short prompts (``costs``, by the
    same ``cost`` from ``short_cost``), the smallest extra offset in [0, ``high``]
    (bisection, ``steps`` halvings) that brings its cost to at most ``cap``: a lower sink, in
    place of none, keeps part of what the sink carries at long range. Returns ``(offset,
    cost)`` per such layer; a layer still over the cap at ``high`` is left out (no sink)."""
    offsets: dict[int, float] = {}
    lowered: dict[int, float] = {}
    for j, c in costs.items():
        if c <= cap:
            continue
        hi_cost = cost(j, windows[j], sinks[j] - high)
        if hi_cost > cap:
            continue
        lo, hi = 0.0, high
        for _ in range(steps):
            mid = (lo + hi) / 2
            c_mid = cost(j, windows[j], sinks[j] - mid)
            if c_mid <= cap:
                hi, hi_cost = mid, c_mid
            else:
                lo = mid
        offsets[j], lowered[j] = hi, hi_cost
    return offsets, lowered


def sink_costs_by_window(model: Any, layers: list[int], sizes: list[int], ids: torch.Tensor,
                         cost: Callable[[int, int, torch.Tensor], float],
                         offset: float = DEFAULT_SINK_OFFSET, progress: bool = False
                         ) -> dict[tuple[int, int], float]:
    """Per (layer, window size): the short-prompt cost (``cost``, from ``short_cost``) of the
    sink that layer would get under that window (``fit_sinks`` on ``ids``, one dense forward
    per size), so a planner can offer a window only where its sink is affordable."""
    from tqdm.auto import tqdm

    out: dict[tuple[int, int], float] = {}
    with tqdm(total=len(layers) * len(sizes), disable=not progress, unit="window",
              desc="sink cost per layer and window") as bar:
        for w in sizes:
            fitted = fit_sinks(model, {j: w for j in layers}, ids, offset)
            for j, v in fitted.items():
                out[(j, w)] = cost(j, w, v)
                bar.update()
    return out
