"""The mixins every family's classes use: the pruned-layer forward of a decoder layer and the
model's checked ``load_weights`` (after vLLM's own loading, every layer got the attention
weights its pruning status requires).

Imported only by the model modules, i.e. inside vLLM processes (it imports vLLM).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..families import plugin_family
from ..spec import CONFIG_KEY, PruningSpec
from .attention import RemovedAttention, TokenLocalLinear
from .checkpoint_spec import HarpCheckpointError, pruning_spec


def check_attention_weights(model: nn.Module, layers: nn.ModuleList, start: int, end: int,
                            seen: set[str], spec: PruningSpec, layer_prefix: str) -> None:
    """After loading: every layer got the attention weights its pruning status requires.

    ``seen`` holds the checkpoint's own weight names. A dense layer needs q/k/v/o (vLLM's own
    check cannot see a missing q or k: they share the stacked qkv parameter with v).
    """
    for idx in range(start, end):
        attn = getattr(layers[idx], "self_attn", None)
        base = f"{layer_prefix}.{idx}.self_attn"
        if isinstance(attn, TokenLocalLinear):
            missing = attn.missing()
            if missing:
                what = (f"alpha = {spec.layers[idx]}" if idx in spec.layers
                        else f"linear map {spec.maps[idx]}")
                raise HarpCheckpointError(
                    f"weights missing for layer {idx} (pruned, {what}): "
                    f"{', '.join(missing)} not in the checkpoint")
        elif isinstance(attn, RemovedAttention):
            continue
        elif idx in spec.kv_sharing:  # q/o only: the keys and values are its target's
            missing = [n for n in (f"{base}.{p}_proj.weight" for p in ("q", "o"))
                       if n not in seen]
            if missing:
                raise HarpCheckpointError(
                    f"weights missing for layer {idx} (sharing layer {spec.kv_sharing[idx]}'s "
                    f"KV cache): {', '.join(missing)} not in the checkpoint")
        else:
            group_map = getattr(attn, "group_map", None)
            if isinstance(group_map, TokenLocalLinear) and group_map.missing():
                raise HarpCheckpointError(
                    f"weights missing for layer {idx} (KV groups removed, a map in their "
                    f"place: {spec.maps[idx]}): {', '.join(group_map.missing())} not in the "
                    f"checkpoint")
            need = [f"{base}.{p}_proj.weight" for p in ("q", "k", "v", "o")]
            need += [f"{base}.sinks"] if idx in spec.sinks else []
            missing = [n for n in need if n not in seen]
            if missing:
                raise HarpCheckpointError(
                    f"weights missing for layer {idx} (dense: not in '{CONFIG_KEY}.layers'): "
                    f"{', '.join(missing)} not in the checkpoint; if the layer is pruned, its "
                    f"index must be listed in '{CONFIG_KEY}.layers'")


def recording(weights: Iterable[tuple[str, torch.Tensor]], seen: set[str]
              ) -> Iterator[tuple[str, torch.Tensor]]:
    for name, w in weights:
        seen.add(name)
        yield name, w


def add_norm(norm: nn.Module, hidden_states: torch.Tensor, residual: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's fused residual add + norm (the first layer has no residual yet)."""
    if residual is None:
        return norm(hidden_states), hidden_states
    return norm(hidden_states, residual)


class HarpDecoderLayerMixin:
    """The pruned-layer forward of a pre-norm family's decoder layer (Llama, Qwen2; listed
    before vLLM's class). Dense layers (``harp_alpha`` None) and pruned ones run the parent's
    forward, whose attention is the token-local module; alpha = 0: the attention branch is
    skipped and only the MLP half runs. Post-norm families have their own forward
    (``gemma.py``).
    """

    harp_alpha: float | None = None

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None, **kwargs: Any
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.harp_alpha != 0.0:
            return super().forward(positions, hidden_states, residual, **kwargs)  # type: ignore[misc]
        layer: Any = self
        hidden_states, residual = add_norm(layer.post_attention_layernorm, hidden_states,
                                           residual)
        return layer.mlp(hidden_states), residual


class HarpModelMixin:
    """What every family's model class (listed before vLLM's) shares: its pruning section,
    validated for its family (``harp_read_spec``), and the checked ``load_weights``: after
    vLLM's own loading, every layer got the attention weights its pruning status requires
    (``check_attention_weights``)."""

    harp_spec: PruningSpec

    def harp_read_spec(self, config: Any) -> None:
        """Set ``harp_spec``: ``config``'s pruning section, validated for this class's family
        (the record in ``harp_vllm.families`` whose ``plugin_class`` names the class)."""
        self.harp_spec = pruning_spec(config, plugin_family(type(self)))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        seen: set[str] = set()
        loaded = super().load_weights(recording(weights, seen))  # type: ignore[misc]
        model: Any = self
        check_attention_weights(model, model.model.layers, model.model.start_layer,
                                model.model.end_layer, seen, self.harp_spec, "model.layers")
        return loaded
