"""Damage of changing layers, measured on calibration text: KL(dense || changed) per token.

One dense pass records every chosen layer's input hidden states, every layer's keyword
arguments (mask, rotary: per layer, as Gemma 3's sliding and global layers get different
ones), sampled token positions and the dense next-token log-probabilities there. A change to
layer ``j`` (or to several layers from ``j`` up) is then scored by running only layers
``j..L-1`` from the recorded input, so scoring every layer costs about half a model forward
per layer. Used by ``--method linear --select damage`` and by the planner.
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
    kwargs: dict[int, dict]  # layer -> its keyword arguments (every layer of the model)
    picks: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    teacher: list[torch.Tensor] = field(default_factory=list)  # dense log-probs at the picks
    groups: list[str] = field(default_factory=list)  # per batch: which part of the objective
    weights: dict[str, float] = field(default_factory=lambda: {"text": 1.0})

    def batch_groups(self) -> list[str]:
        return self.groups or ["text"] * len(self.picks)

    @property
    def tokens(self) -> int:
        return sum(int(p[1].numel()) for p in self.picks)


def run_layer(layer, h: torch.Tensor, kw: dict) -> torch.Tensor:
    out = layer(h, **kw)
    return out[0] if isinstance(out, tuple) else out


def kwargs_hooks(layers, kwargs: dict[int, dict], start: int = 0) -> list:
    """Forward pre-hooks that keep each layer's (from ``start`` up) first keyword arguments
    (all but the hidden states) in ``kwargs``: a family whose layers differ in mask or rotary
    embedding (Gemma 3's sliding and global layers) is run layer by layer with each one's
    own. The caller removes the returned handles."""

    def hook_for(j):
        def hook(module, args, kw):
            if j not in kwargs:
                kwargs[j] = {k: v for k, v in kw.items() if k != "hidden_states"}
        return hook

    return [layers[j].register_forward_pre_hook(hook_for(j), with_kwargs=True)
            for j in range(start, len(layers))]


def merge_records(text: DenseRecord, probe: DenseRecord, weight: float) -> DenseRecord:
    """One record scoring ``text``'s KL plus ``weight`` times ``probe``'s (each a mean over its
    own positions). Both must come from windows of one length (their layer kwargs are shared)."""
    if text.inputs.keys() != probe.inputs.keys():
        raise ValueError("records of different layers cannot be merged")
    first = next(iter(text.inputs))
    if text.inputs[first][0].shape[1:] != probe.inputs[first][0].shape[1:]:
        raise ValueError("records of windows of different lengths cannot be merged")
    return DenseRecord(
        inputs={j: text.inputs[j] + probe.inputs[j] for j in text.inputs}, kwargs=text.kwargs,
        picks=text.picks + probe.picks, teacher=text.teacher + probe.teacher,
        groups=[*text.batch_groups(), *(["probe"] * len(probe.picks))],
        weights={**text.weights, "probe": weight})


@torch.no_grad()
def record_dense(model, windows: torch.Tensor, layers: list[int], batch: int = 8,
                 positions: int = 64, seed: int = 0, picks: torch.Tensor | None = None
                 ) -> DenseRecord:
    """One dense pass over ``windows``: inputs of ``layers`` and the teacher log-probs at
    ``positions`` random positions per window (all positions if the windows are not longer),
    or at the given ``picks`` [windows, k] positions."""
    all_layers = decoder_layers(model)
    rec = DenseRecord(inputs={j: [] for j in layers}, kwargs={})

    def hook_for(j):
        def hook(module, args, kw):
            rec.inputs[j].append(args[0] if args else kw["hidden_states"])
        return hook

    g = torch.Generator().manual_seed(seed)
    handles = [all_layers[j].register_forward_pre_hook(hook_for(j), with_kwargs=True)
               for j in layers] + kwargs_hooks(all_layers, rec.kwargs)
    try:
        for i in range(0, len(windows), batch):
            w = windows[i:i + batch]
            h = model.model(input_ids=w, use_cache=False).last_hidden_state
            n, t = w.shape
            if picks is not None:
                pos = picks[i:i + batch]
            elif positions >= t:
                pos = torch.arange(t).expand(n, t)
            else:
                pos = torch.randint(t, (n, positions), generator=g)
            rows = torch.arange(n)[:, None]
            rec.picks.append((rows, pos))
            rec.teacher.append(
                torch.log_softmax(normed_head_logits(model, h[rows, pos]).float(), -1))
    finally:
        for handle in handles:
            handle.remove()
    return rec


@torch.no_grad()
def suffix_kl_parts(model, rec: DenseRecord, start: int) -> dict[str, float]:
    """KL(dense || model) in nats per token at each group's recorded positions, running the
    model's current layers ``start..L-1`` from the dense input of layer ``start``."""
    all_layers = decoder_layers(model)
    kl: dict[str, float] = {}
    count: dict[str, int] = {}
    for b, (h, group) in enumerate(zip(rec.inputs[start], rec.batch_groups(), strict=True)):
        for k in range(start, len(all_layers)):
            h = run_layer(all_layers[k], h, rec.kwargs[k])
        logp = torch.log_softmax(head_logits(model, h[rec.picks[b]]).float(), -1)
        t = rec.teacher[b]
        kl[group] = kl.get(group, 0.0) + float((t.exp() * (t - logp)).sum())
        count[group] = count.get(group, 0) + logp.shape[0] * logp.shape[1]
    return {g: kl[g] / count[g] for g in kl}


def objective(rec: DenseRecord, parts: dict[str, float]) -> float:
    """The record's objective from its parts' KL per token: each times its group's weight,
    summed (just the KL per token for a record of plain text)."""
    return sum(rec.weights[g] * v for g, v in parts.items())


def suffix_kl(model, rec: DenseRecord, start: int) -> float:
    """The record's :func:`objective` with layers ``start..L-1`` run (:func:`suffix_kl_parts`)."""
    return objective(rec, suffix_kl_parts(model, rec, start))
