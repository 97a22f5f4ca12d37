"""A retrieval floor for the solver (``--retrieval-floor``): which KV groups the recall
probe's answers read from far back, and a constraint that a layout keeps a share of them.

Measured on SmolLM2 (docs/results.md section 12): the recall probe's damage is not additive
over layers. Windowing any one of layers 0-11 at 2,048 tokens costs the probe at most 0.0024
nats, all twelve together 1.44: the model retrieves through whichever of those layers still
sees the fact. A per-layer price cannot see that; a linear constraint can (RazorAttention's
and DuoAttention's view: recall survives while enough retrieval heads keep their context).

Each KV group's **retrieval mass** is the attention its query heads put, at the probe's
recall positions (the digits of codes stated far back), on keys further back than a base
distance (``--retrieval-beyond``, default the largest window offered), the first
``SINK_TOKENS`` left out (attention sinks, not facts), summed over the group's heads and
averaged over the positions. A candidate keeps what its groups still see: all of it (keep; a
sharing layer attends over its target's whole cache), a group windowed to W the part within
W (its mass beyond the base less its mass beyond W: none when W is at most the base), a group
cut or mapped away nothing (a linear map or removal: no group). The floor: the layout's kept
mass is at least a fraction of the dense model's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...errors import UserError
from ..calibration.damage import DenseRecord
from ..reference import decoder_layers
from ..reference.window_sinks import SINK_TOKENS, project_qkv
from .choices import Choice
from .statistics import PlanStats


@dataclass(frozen=True)
class RetrievalFloor:
    """The solver's constraint: sum over layers of ``kept[j][choice]`` >= ``minimum``."""

    kept: dict[int, dict[str, float]]  # layer -> choice name -> retrieval mass it keeps
    minimum: float
    fraction: float  # of the dense model's mass (the report's number)


@torch.no_grad()
def group_retrieval(model: Any, probe: DenseRecord, beyond: tuple[int, ...],
                    skip_first: int = SINK_TOKENS) -> dict[int, torch.Tensor]:
    """Per distance ``b`` of ``beyond``: [layers, KV groups] attention mass on keys more than
    ``b`` tokens back (module docstring), on the probe record's windows (their recorded layer
    inputs: no forward pass)."""
    layers: Any = decoder_layers(model)
    cfg = model.config
    if any(hasattr(layer.self_attn, "q_norm") for layer in layers):
        raise UserError(f"the retrieval mass is computed for attention without query/key "
                        f"norms (Llama, Mistral); {cfg.model_type!r} has them")
    n_kv = cfg.num_key_value_heads
    rep = cfg.num_attention_heads // n_kv
    out = {b: torch.zeros(len(layers), n_kv, dtype=torch.float64) for b in beyond}
    for j, layer in enumerate(layers):
        attn, count = layer.self_attn, 0
        for i, h in enumerate(probe.inputs[j]):
            q, k, _ = project_qkv(attn, layer.input_layernorm(h),
                                  probe.kwargs[j]["position_embeddings"])
            rows, pos = probe.picks[i]
            t = torch.arange(k.shape[2])
            for r, p in zip(rows[:, 0].tolist(), pos, strict=True):
                keys = k[r].repeat_interleave(rep, 0)  # [heads, T, d]
                s = (q[r][:, p] @ keys.transpose(-1, -2)).float() * attn.scaling
                s = s.masked_fill(t[None, None, :] > p[None, :, None], float("-inf"))
                a = torch.softmax(s, -1)
                for b in beyond:
                    far = (t[None, :] < p[:, None] - b) & (t[None, :] >= skip_first)
                    mass = (a * far).sum(-1)  # [heads, positions]
                    out[b][j] += mass.view(n_kv, rep, -1).sum(1).sum(-1).double()
                count += p.numel()
        for b in beyond:
            out[b][j] /= max(count, 1)
    return out


def kept_mass(choice: Choice, j: int, mass: dict[int, torch.Tensor], stats: PlanStats
              ) -> float:
    """The retrieval mass layer ``j`` keeps under ``choice`` (module docstring); ``mass``
    from :func:`group_retrieval`, its smallest distance the base counted (and every window
    wider than it)."""
    start = min(mass)
    base = mass[start][j]
    groups = range(base.shape[0])
    if choice.kind == "window":
        assert choice.window is not None
        # what the windowed groups no longer see (all of it if the window is within the base)
        lost = mass[max(choice.window, start)][j]
        return float(sum(base[g] if g in choice.full_groups else base[g] - lost[g]
                         for g in groups))
    if choice.kind in ("linear", "remove"):
        return 0.0
    if choice.kind == "drop":
        kept = list(stats.flap_order[j][choice.groups:])
    elif choice.kind == "droplin":
        gone = stats.group_fits[j].gone[choice.groups]
        kept = [g for g in groups if g not in gone]
    else:  # keep, share
        kept = list(groups)
    return float(base[kept].sum())


def retrieval_floor(mass: dict[int, torch.Tensor], choices: list[Choice], stats: PlanStats,
                    fraction: float) -> RetrievalFloor:
    """The constraint that a layout keeps ``fraction`` of the dense model's retrieval mass."""
    n_layers = mass[min(mass)].shape[0]
    kept = {j: {c.name: kept_mass(c, j, mass, stats) for c in choices} for j in range(n_layers)}
    return RetrievalFloor(kept, fraction * float(mass[min(mass)].sum()), fraction)


def layout_mass(layout: dict[int, Choice], mass: dict[int, torch.Tensor], stats: PlanStats
                ) -> float:
    """The share of the dense model's retrieval mass ``layout`` keeps."""
    from .choices import KEEP

    base = mass[min(mass)]
    total = sum(kept_mass(layout.get(j, KEEP), j, mass, stats) for j in range(base.shape[0]))
    return total / float(base.sum())
