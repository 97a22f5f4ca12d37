"""The decoder layers of an HF causal LM, and the range check of layer indices."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ...errors import UserError


def decoder_layers(model) -> nn.ModuleList:
    return model.model.layers


def check_layers(model, layers: Mapping) -> None:
    """UserError naming the first index of ``layers`` (its keys) outside the model."""
    n = len(decoder_layers(model))
    bad = sorted(i for i in layers if not 0 <= i < n)
    if bad:
        raise UserError(f"layer index {bad[0]} out of range (the model has {n} layers: "
                        f"0..{n - 1})")
