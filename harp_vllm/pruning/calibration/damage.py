"""Damage of changing layers, measured on calibration text: KL(dense || changed) per token.

One dense pass records every chosen layer's input hidden states, the layers' keyword
arguments (mask, rotary), sampled token positions and the dense next-token log-probabilities
there. A change to layer ``j`` (or to several layers from ``j`` up) is then scored by running
only layers ``j..L-1`` from the recorded input, so scoring every layer costs about half a model
forward per layer. Used by ``--method linear --select damage`` and by the planner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..reference import decoder_layers
from .logits import head_logits, normed_head_logits


@dataclass
class DenseRecord:
    """The dense model's view of the damage windows (see the module docstring)."""

    inputs: dict[int, list[torch.Tensor]]  # layer -> its input hidden states, per batch
    kwargs: dict
    picks: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    teacher: list[torch.Tensor] = field(default_factory=list)  # dense log-probs at the picks

    @property
    def tokens(self) -> int:
        return sum(int(p[1].numel()) for p in self.picks)


def run_layer(layer, h: torch.Tensor, kw: dict) -> torch.Tensor:
    out = layer(h, **kw)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def record_dense(model, windows: torch.Tensor, layers: list[int], batch: int = 8,
                 positions: int = 64, seed: int = 0) -> DenseRecord:
    """One dense pass over ``windows``: inputs of ``layers`` and the teacher log-probs at
    ``positions`` random positions per window (all positions if the windows are not longer)."""
    all_layers = decoder_layers(model)
    rec = DenseRecord(inputs={j: [] for j in layers}, kwargs={})

    def hook_for(j):
        def hook(module, args, kw):
            rec.inputs[j].append(args[0] if args else kw["hidden_states"])
            if not rec.kwargs:
                rec.kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        return hook

    g = torch.Generator().manual_seed(seed)
    handles = [all_layers[j].register_forward_pre_hook(hook_for(j), with_kwargs=True)
               for j in layers]
    try:
        for i in range(0, len(windows), batch):
            w = windows[i:i + batch]
            h = model.model(input_ids=w, use_cache=False).last_hidden_state
            n, t = w.shape
            pos = (torch.arange(t).expand(n, t) if positions >= t
                   else torch.randint(t, (n, positions), generator=g))
            rows = torch.arange(n)[:, None]
            rec.picks.append((rows, pos))
            rec.teacher.append(
                torch.log_softmax(normed_head_logits(model, h[rows, pos]).float(), -1))
    finally:
        for handle in handles:
            handle.remove()
    return rec


@torch.no_grad()
def suffix_kl(model, rec: DenseRecord, start: int) -> float:
    """KL(dense || model) in nats per token at the recorded positions, running the model's
    current layers ``start..L-1`` from the dense input of layer ``start``."""
    all_layers = decoder_layers(model)
    kl, count = 0.0, 0
    for b, h in enumerate(rec.inputs[start]):
        for k in range(start, len(all_layers)):
            h = run_layer(all_layers[k], h, rec.kwargs)
        logp = torch.log_softmax(head_logits(model, h[rec.picks[b]]).float(), -1)
        t = rec.teacher[b]
        kl += float((t.exp() * (t - logp)).sum())
        count += logp.shape[0] * logp.shape[1]
    return kl / count
