"""AMP, FLAP and Wanda-sp: score attention groups and MLP channels, remove the lowest.

Formulas and settings follow the AMP paper (attention heads and MLP pruning) and FLAP (An et
al., AAAI 2024, whose structured Wanda baseline is Wanda-sp), as written out below.
Statistics are taken on the inputs of ``o_proj`` (x, one slice per query head) and
``down_proj`` (a = SiLU(x W_gate) * x W_up) over calibration tokens:

- AMP: head h scores ``mean_t ||x_{t,h} W_O[:, h]^T||_1`` (its contribution to the residual
  stream); MLP channel j scores ``mean_t |a_{t,j}|``.
- Wanda-sp: channel j scores ``mean_i |W_ij| * ||X_j||_2`` (W = o_proj / down_proj); a head
  sums its channels.
- FLAP (WIFV): channel j scores ``Var_t(X_j) * ||W_:,j||^2`` (squared for attention),
  standardised per layer and module; a head is the mean of its channels. Removed channels
  are replaced by their calibration mean through a bias on o_proj / down_proj.

GQA: the unit removed is a whole group (KV head + its query heads; group score = sum of its
heads' scores, mean for FLAP's standardised scores), so the KV cache shrinks with the head
count; with a single KV head (Gemma 3 270M) the unit is one query head
(``heads.head_units``: the KV head stays). Allocation is ``uniform`` (the same count in every
layer: AMP rounds, Wanda-sp and FLAP's UL-UM truncate) or ``global`` (the lowest scores over
all layers: FLAP's adaptive structure with separate head and MLP ratios, AL-MM). Every layer
keeps at least one unit and one MLP channel. Wanda-sp with uniform allocation prunes layer by
layer, re-running the calibration batch through each pruned layer; the others score the
unpruned model in one pass.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...errors import UserError
from ...families import head_dim, model_types
from ..calibration.damage import kwargs_hooks
from ..heads import (
    ATTENTION_PROJECTIONS,
    MLP_PROJECTIONS,
    add_bias,
    add_biases,
    channels_of,
    declare_biases,
    head_units,
    keep_channels,
    keep_units,
    unit_count,
    unit_heads,
    unit_size,
)

METHODS = ("amp", "flap", "wanda-sp")
DEFAULT_ALLOCATION = {"amp": "uniform", "flap": "global", "wanda-sp": "uniform"}


@dataclass
class LayerStats:
    """Sums over calibration tokens of one layer's o_proj and down_proj inputs."""

    tokens: int = 0
    attn_sum: torch.Tensor | None = None  # [H*d]  sum_t x
    attn_sq: torch.Tensor | None = None   # [H*d]  sum_t x^2
    head_l1: torch.Tensor | None = None   # [H]    sum_t ||x_h W_O[:, h]^T||_1
    mlp_sum: torch.Tensor | None = None   # [I]
    mlp_sq: torch.Tensor | None = None
    mlp_abs: torch.Tensor | None = None   # [I]    sum_t |a|

    @staticmethod
    def _add(acc: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
        return value if acc is None else acc + value

    def add_attn(self, x: torch.Tensor, w_o: torch.Tensor, d: int,
                 contributions: bool = True) -> None:
        """Add o_proj inputs ``x``; ``contributions=False`` skips AMP's per-head output norms
        (the costly part; FLAP and Wanda-sp do not need them)."""
        x = x.reshape(-1, x.shape[-1]).double()
        self.tokens += x.shape[0]
        self.attn_sum = self._add(self.attn_sum, x.sum(0))
        self.attn_sq = self._add(self.attn_sq, x.pow(2).sum(0))
        if not contributions:
            return
        n_heads = x.shape[1] // d
        w = w_o.double().view(w_o.shape[0], n_heads, d)  # [d_model, H, d]
        contrib = torch.einsum("thd,ohd->tho", x.view(-1, n_heads, d), w)  # per-head output
        self.head_l1 = self._add(self.head_l1, contrib.abs().sum(-1).sum(0))

    def add_mlp(self, a: torch.Tensor) -> None:
        a = a.reshape(-1, a.shape[-1]).double()
        self.mlp_sum = self._add(self.mlp_sum, a.sum(0))
        self.mlp_sq = self._add(self.mlp_sq, a.pow(2).sum(0))
        self.mlp_abs = self._add(self.mlp_abs, a.abs().sum(0))

    def attn_mean(self) -> torch.Tensor:
        return _req(self.attn_sum) / self.tokens

    def mlp_mean(self) -> torch.Tensor:
        return _req(self.mlp_sum) / self.tokens


def _req(t: torch.Tensor | None) -> torch.Tensor:
    """A statistic that must have been accumulated (add_attn / add_mlp ran)."""
    if t is None:
        raise ValueError("no calibration tokens were seen for this statistic")
    return t


def _standardise(s: torch.Tensor) -> torch.Tensor:
    std = s.std()
    return (s - s.mean()) / (std if std > 0 else 1.0)


def group_scores(method: str, stats: LayerStats, w_o: torch.Tensor, d: int, r: int
                 ) -> torch.Tensor:
    """One score per GQA group of a layer (higher = more important)."""
    n = stats.tokens
    if method == "amp":
        heads = _req(stats.head_l1) / n
        return heads.view(-1, r).sum(1)
    w = w_o.double()
    if method == "wanda-sp":
        chan = w.abs().mean(0) * _req(stats.attn_sq).sqrt()
        return chan.view(-1, r * d).sum(1)
    if method == "flap":
        var = _req(stats.attn_sq) / n - (_req(stats.attn_sum) / n).pow(2)
        chan = _standardise((var * w.pow(2).sum(0)).pow(2))
        heads = chan.view(-1, d).mean(1)
        return heads.view(-1, r).mean(1)
    raise UserError(f"unknown method {method!r}; choose {', '.join(METHODS)}")


def channel_scores(method: str, stats: LayerStats, w_down: torch.Tensor) -> torch.Tensor:
    """One score per MLP intermediate channel of a layer (higher = more important)."""
    n = stats.tokens
    if method == "amp":
        return _req(stats.mlp_abs) / n
    w = w_down.double()
    if method == "wanda-sp":
        return w.abs().mean(0) * _req(stats.mlp_sq).sqrt()
    var = _req(stats.mlp_sq) / n - (_req(stats.mlp_sum) / n).pow(2)
    return _standardise(var * w.pow(2).sum(0))


def uniform_count(method: str, ratio: float, units: int) -> int:
    """Units to remove from every layer: AMP rounds, the others truncate; one unit stays."""
    n = round(ratio * units) if method == "amp" else int(ratio * units)
    return min(n, units - 1)


def allocate(scores: list[torch.Tensor], ratio: float, mode: str, method: str
             ) -> list[list[int]]:
    """The kept unit indices (sorted) per layer after removing the lowest-scoring ones."""
    if ratio == 0:
        return [list(range(len(s))) for s in scores]
    if mode == "uniform":
        kept = []
        for s in scores:
            drop = set(torch.argsort(s)[: uniform_count(method, ratio, len(s))].tolist())
            kept.append([i for i in range(len(s)) if i not in drop])
        return kept
    if mode != "global":
        raise UserError(f"--allocation must be uniform or global, got {mode!r}")
    total = sum(len(s) for s in scores)
    target = round(ratio * total)
    order = sorted((float(v), layer, i) for layer, s in enumerate(scores)
                   for i, v in enumerate(s.tolist()))
    left = [len(s) for s in scores]
    dropped: set[tuple[int, int]] = set()
    for _, layer, i in order:
        if len(dropped) == target:
            break
        if left[layer] > 1:  # every layer keeps one unit
            dropped.add((layer, i))
            left[layer] -= 1
    return [[i for i in range(len(s)) if (layer, i) not in dropped]
            for layer, s in enumerate(scores)]


class _Stop(Exception):
    pass


def layer_inputs(model, windows: torch.Tensor, batch_size: int,
                 every: list[dict[int, dict]] | None = None
                 ) -> list[tuple[torch.Tensor, dict]]:
    """The first decoder layer's inputs (hidden states, keyword arguments) per batch. With
    ``every``, the whole model runs and each batch's keyword arguments of every layer are
    appended to it (layer -> kwargs: Gemma 3's sliding and global layers differ)."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), dict(kwargs)))
        if every is None:
            raise _Stop

    layers = model.model.layers
    hook = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in windows.split(batch_size):
                kws: dict[int, dict] = {}
                handles = [] if every is None else kwargs_hooks(layers, kws)
                try:
                    with contextlib.suppress(_Stop):
                        model.model(input_ids=batch, use_cache=False)
                finally:
                    for h in handles:
                        h.remove()
                if every is not None:
                    every.append(kws)
    finally:
        hook.remove()
    return captured


def layer_stats(layer: Any, d: int, inputs: list[tuple[torch.Tensor, dict]]
                ) -> LayerStats:
    """Run ``layer`` on every batch, accumulating its o_proj and down_proj input statistics."""
    stats = LayerStats()
    attn, mlp = layer.self_attn, layer.mlp
    hooks = [
        attn.o_proj.register_forward_pre_hook(
            lambda m, a: stats.add_attn(a[0], m.weight, d)),
        mlp.down_proj.register_forward_pre_hook(lambda m, a: stats.add_mlp(a[0])),
    ]
    try:
        with torch.no_grad():
            for hidden, kw in inputs:
                layer(hidden, **kw)
    finally:
        for h in hooks:
            h.remove()
    return stats


def forward_layer(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]],
                  next_kwargs: list[dict] | None = None) -> list[tuple[torch.Tensor, dict]]:
    """``layer`` run on every batch: the next layer's inputs, with ``next_kwargs`` (per batch)
    as its keyword arguments, or this layer's."""
    with torch.no_grad():
        return [(layer(hidden, **kw), kw if next_kwargs is None else next_kwargs[b])
                for b, (hidden, kw) in enumerate(inputs)]


@dataclass
class StructuredResult:
    kept_groups: list[list[int]]
    kept_channels: list[list[int]]
    group_scores: list[list[float]] = field(default_factory=list)
    seconds: float = 0.0


def _prune_layer(layer: Any, config, groups: list[int], channels: list[int],
                 stats: LayerStats | None) -> None:
    """Cut one layer to ``groups`` and ``channels``; with ``stats``, FLAP's bias compensation:
    the removed inputs of o_proj / down_proj are replaced by their calibration means."""
    attn, mlp = layer.self_attn, layer.mlp
    if stats is not None:
        compensate_attention(attn, config, groups, stats.attn_mean())
        kept_c = set(channels)
        gone_ch = torch.as_tensor([c for c in range(mlp.down_proj.in_features)
                                   if c not in kept_c], dtype=torch.long)
        down_bias = mlp.down_proj.weight.data.double()[:, gone_ch] @ stats.mlp_mean()[gone_ch]
        mlp.down_proj = add_bias(mlp.down_proj, down_bias)
        add_biases(mlp, MLP_PROJECTIONS)
    keep_units(attn, config, groups)
    keep_channels(mlp, channels)


def compensate_attention(attn: Any, config, groups: list[int], attn_mean: torch.Tensor
                         ) -> None:
    """FLAP's bias compensation for keeping only ``groups``: o_proj gets a bias holding the
    removed heads' calibration-mean contribution (``attn_mean``: the mean o_proj input), and
    q/k/v get zero biases (the checkpoint is a biased Llama). ``groups`` are the kept pruning
    units (query heads for a single-KV-head model); the cut itself is ``keep_units``."""
    kept = set(groups)
    gone = [g for g in range(unit_count(config)) if g not in kept]
    cols = channels_of(unit_heads(config, gone), head_dim(config))
    o_bias = attn.o_proj.weight.data.double()[:, cols] @ attn_mean[cols]
    attn.o_proj = add_bias(attn.o_proj, o_bias)
    add_biases(attn, ATTENTION_PROJECTIONS)


def prune_structured(model, windows: torch.Tensor, method: str, ratio: float,
                     mlp_ratio: float = 0.0, allocation: str | None = None,
                     bias_compensation: bool | None = None, batch_size: int = 16,
                     progress: bool = True) -> StructuredResult:
    """Score ``model`` (HF, fp32) on ``windows`` and cut it in place; returns what was kept."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose {', '.join(METHODS)}")
    for name, value in (("--ratio", ratio), ("--mlp-ratio", mlp_ratio)):
        if not 0 <= value < 1:
            raise UserError(f"{name} must be in [0, 1), got {value}")
    allocation = allocation or DEFAULT_ALLOCATION[method]
    if allocation not in ("uniform", "global"):
        raise UserError(f"--allocation must be uniform or global, got {allocation!r}")
    compensate = method == "flap" if bias_compensation is None else bias_compensation
    config = model.config
    # head-pruned families whose vLLM code has no o_proj / down_proj bias
    no_bias = model_types(lambda f: f.heads and not f.compensation)
    if compensate and getattr(config, "model_type", None) in no_bias:
        raise UserError(f"bias compensation needs o_proj and down_proj biases, which vLLM's "
                        f"{config.model_type} code has not; use --no-bias-compensation")
    d, r = head_dim(config), unit_size(config)
    layers = model.model.layers
    n_groups = unit_count(config)
    if allocation == "uniform" and ratio > 0 and uniform_count(method, ratio, n_groups) == 0:
        raise UserError(f"--ratio {ratio} removes no attention group with uniform allocation "
                        f"({method}: {ratio} x {n_groups} groups per layer rounds to 0); use "
                        f"--ratio >= {1 / n_groups:.4f} or --allocation global")
    sequential = method == "wanda-sp" and allocation == "uniform"
    start = time.perf_counter()
    every: list[dict[int, dict]] = []  # per batch: every layer's own kwargs
    inputs = layer_inputs(model, windows, batch_size, every)
    all_stats: list[LayerStats] = []
    g_scores: list[torch.Tensor] = []
    c_scores: list[torch.Tensor] = []
    kept_g: list[list[int]] = []
    kept_c: list[list[int]] = []
    bar = tqdm(range(len(layers)), desc=f"{method} scoring", disable=not progress, unit="layer")
    for idx in bar:
        layer = layers[idx]
        stats = layer_stats(layer, d, inputs)
        g_scores.append(group_scores(method, stats, layer.self_attn.o_proj.weight.data, d, r))
        c_scores.append(channel_scores(method, stats, layer.mlp.down_proj.weight.data))
        all_stats.append(stats)
        if sequential:  # prune now; the next layer sees pruned activations
            kept_g.append(allocate([g_scores[-1]], ratio, "uniform", method)[0])
            kept_c.append(allocate([c_scores[-1]], mlp_ratio, "uniform", method)[0])
            _prune_layer(layer, config, kept_g[-1], kept_c[-1],
                         stats if compensate else None)
        if idx + 1 < len(layers):
            inputs = forward_layer(layer, inputs, [kws[idx + 1] for kws in every])
    if not sequential:
        kept_g = allocate(g_scores, ratio, allocation, method)
        kept_c = allocate(c_scores, mlp_ratio, allocation, method)
        for idx, layer in enumerate(layers):
            _prune_layer(layer, config, kept_g[idx], kept_c[idx],
                         all_stats[idx] if compensate else None)
    if compensate:
        declare_biases(config, attention=True, mlp=True)
    return StructuredResult(kept_groups=kept_g, kept_channels=kept_c,
                            group_scores=[[round(float(v), 6) for v in s] for s in g_scores],
                            seconds=time.perf_counter() - start)


def shapes_of(config, result: StructuredResult) -> dict[str, list[int]]:
    """The per-layer ``shapes`` section of the pruning spec for ``result``."""
    r, one_kv = unit_size(config), head_units(config)
    return {"num_attention_heads": [len(g) * r for g in result.kept_groups],
            "num_key_value_heads": [1 if one_kv else len(g) for g in result.kept_groups],
            "intermediate_size": [len(c) for c in result.kept_channels]}
