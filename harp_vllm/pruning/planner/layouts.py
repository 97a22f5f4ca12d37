"""A layout (layer -> ``Choice``) as modules: assembled temporarily for scoring, applied for
good before the checkpoint is written, summarised by the cost model and written as text."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ...families import head_dim
from ...spec import PruningSpec
from .. import costs
from ..heads import ATTENTION_PROJECTIONS, add_biases, declare_biases, group_size, keep_groups
from ..methods.structured import compensate_attention
from ..reference import (
    GroupMap,
    SharedKVAttention,
    TokenLocalAttention,
    WindowedAttention,
    attach_group_map,
    attention_restored,
    decoder_layers,
    install_map,
)
from .choices import KEEP, Choice
from .statistics import PlanStats, rank_key, share_key


def choice_module(model, j: int, choice: Choice, stats: PlanStats) -> nn.Module:
    """Layer ``j``'s attention under ``choice`` (a new module; the model is not changed)."""
    cfg = model.config
    dense: Any = decoder_layers(model)[j].self_attn
    if choice.kind == "linear":
        return stats.maps[rank_key(choice.rank)][j].module()
    if choice.kind == "remove":
        return TokenLocalAttention(None, None, 1, head_dim(cfg), 0.0)
    if choice.kind == "window":
        assert choice.window is not None
        return WindowedAttention(dense, choice.window, choice.full_groups)
    if choice.kind == "share":  # q/o refitted (share_fit.py), k/v are the target's
        assert choice.target is not None
        fit = stats.extra["share_fits"][share_key(j, choice.target)]
        own = copy.deepcopy(dense)
        with torch.no_grad():
            own.q_proj.weight.copy_(fit["q_weight"])
            own.o_proj.weight.copy_(fit["o_weight"])
        target: Any = decoder_layers(model)[choice.target].self_attn
        return SharedKVAttention(own, target, choice.target)
    if choice.kind == "drop":
        attn = copy.deepcopy(dense)
        kept = sorted(stats.flap_order[j][choice.groups:])
        compensate_attention(attn, cfg, kept, stats.attn_mean[j])
        keep_groups(attn, cfg, kept)
        return attn
    if choice.kind == "droplin":
        fit = stats.group_fits[j]
        attn = copy.deepcopy(dense)
        gone = fit.gone[choice.groups]
        in_w, in_b, out_w = fit.map_weights(dense.o_proj.weight.data, choice.groups,
                                            head_dim(cfg), group_size(cfg))
        keep_groups(attn, cfg, [g for g in range(cfg.num_key_value_heads) if g not in gone])
        gmap = GroupMap(cfg.hidden_size, in_w.shape[0])
        with torch.no_grad():
            gmap.in_proj.weight.copy_(in_w)
            gmap.in_proj.bias.copy_(in_b)
            gmap.out_proj.weight.copy_(out_w)
        attach_group_map(attn, gmap)
        return attn
    return dense


@contextlib.contextmanager
def installed(model, layout: dict[int, Choice], stats: PlanStats) -> Iterator[None]:
    """Temporarily give the model ``layout``'s attention modules."""
    layers: Any = decoder_layers(model)
    with attention_restored(model, layout):
        for j, c in layout.items():
            layers[j].self_attn = choice_module(model, j, c, stats)
        yield


def apply_layout(model, layout: dict[int, Choice], stats: PlanStats):
    """Give ``model`` the layout for good and return its ``PruningSpec`` (method ``plan``).

    Removed layers are left to ``apply_pruning`` (alpha = 0), and windows (``windows`` and
    ``group_windows`` in the spec, hooked there); maps are installed; KV-group cuts carry
    FLAP's o_proj bias, so the checkpoint is then a biased Llama: every layer that keeps its
    attention gets zero q/k/v/o biases and ``attention_bias`` is set.
    """
    cfg = model.config
    layers: Any = decoder_layers(model)
    drops = {j: c for j, c in layout.items() if c.kind in ("drop", "droplin")}
    maps: dict[int, dict[str, Any]] = {}
    for j, c in layout.items():
        if c.kind == "linear":
            install_map(layers[j], stats.maps[rank_key(c.rank)][j].module(), "normed")
            maps[j] = {"input": "normed", "rank": c.rank}
        elif c.kind in ("drop", "droplin", "share"):
            layers[j].self_attn = choice_module(model, j, c, stats)
        if c.kind == "droplin":
            maps[j] = {"input": "normed", "rank": c.shape(cfg).added_rank, "add": True}
    shapes = None
    if any(c.kind == "drop" for c in drops.values()):  # FLAP's o_proj bias: a biased Llama
        for j, layer in enumerate(layers):
            if j not in layout or layout[j].kind in ("droplin", "window"):
                add_biases(layer.self_attn, (*ATTENTION_PROJECTIONS, "o_proj"))
            elif layout[j].kind == "share":  # no k/v of its own
                add_biases(layer.self_attn, ("q_proj", "o_proj"))
        declare_biases(cfg, attention=True)
    if drops:
        r = group_size(cfg)
        kv = [cfg.num_key_value_heads - (drops[j].groups if j in drops else 0)
              for j in range(cfg.num_hidden_layers)]
        shapes = {"num_attention_heads": [k * r for k in kv], "num_key_value_heads": kv,
                  "intermediate_size": [cfg.intermediate_size] * cfg.num_hidden_layers}
    removed = {j: 0.0 for j, c in layout.items() if c.kind == "remove"}
    windows = {j: int(c.window) for j, c in layout.items()
               if c.kind == "window" and c.window is not None and not c.full_groups}
    group_windows = {j: {"window": int(c.window), "full_groups": list(c.full_groups)}
                     for j, c in layout.items()
                     if c.kind == "window" and c.window is not None and c.full_groups}
    sharing = {j: int(c.target) for j, c in layout.items()
               if c.kind == "share" and c.target is not None}
    return PruningSpec(layers=removed, maps=maps, shapes=shapes, windows=windows,
                       kv_sharing=sharing, group_windows=group_windows, method="plan")


def layout_summary(cfg: Any, layout: dict[int, Choice], contexts=(4096, 7168),
                   context: int | None = None) -> dict:
    """The cost model's summary of ``layout`` (KV bytes at ``context`` when windowed)."""
    shapes = [layout.get(j, KEEP).shape(cfg, j) for j in range(cfg.num_hidden_layers)]
    return costs.summary(cfg, shapes, contexts, context=context)


def layout_text(layout: dict[int, Choice]) -> str:
    """The ``--layout`` string of a layout (round-trips through ``parse_layout``)."""
    return ",".join(f"{j}:{c.name}" for j, c in sorted(layout.items()))
