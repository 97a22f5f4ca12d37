"""HARP Gemma2 and Gemma3: vLLM's own models with a per-layer choice of attention.

Gemma normalizes the attention output (post_attention_layernorm) before the residual add, so
alpha is applied after that norm: the fold uses alpha = 1 and the layer scales the normed
output. A fitted linear map (``maps``) takes the attention's place before that norm, which
stays: ``h + post_norm(map(x))`` with ``x`` the normed input, or the residual stream itself
(``raw``: no input norm).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models import gemma2 as vllm_gemma2
from vllm.model_executor.models import gemma3 as vllm_gemma3
from vllm.model_executor.models.gemma2 import Gemma2DecoderLayer, Gemma2ForCausalLM
from vllm.model_executor.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM

from .checkpoint_spec import layer_alpha, layer_config, layer_map
from .factories import layer_attention
from .mixins import HarpModelMixin, add_norm
from .sharing import SharedKVGemma3Attention
from .version import swapped_global


class HarpPostNormDecoderLayerMixin:
    """The pruned-layer forward of a Gemma decoder layer (listed before vLLM's class). Dense
    layers (``harp_alpha`` None) run the parent's forward; a pruned layer scales the normed
    attention output by alpha here (its token-local path was folded with alpha = 1); alpha = 0
    skips the attention branch and runs only the MLP half. A layer whose map reads the
    residual stream (``harp_raw_input``) has no input norm: the residual add vLLM fuses into
    that norm is done here."""

    harp_alpha: float | None = None
    harp_raw_input: bool = False

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None, **kwargs: Any
                ) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.harp_alpha
        layer: Any = self
        if self.harp_raw_input:  # a map on the residual stream, then the post-attention norm
            residual = hidden_states if residual is None else hidden_states + residual
            hidden_states = layer.self_attn(positions=positions, hidden_states=residual)
            hidden_states = layer.post_attention_layernorm(hidden_states)
            hidden_states, residual = layer.pre_feedforward_layernorm(hidden_states, residual)
        elif alpha is None:  # dense, or a map on the normed input (the parent's forward)
            return super().forward(positions, hidden_states, residual, **kwargs)  # type: ignore[misc]
        elif alpha == 0.0:
            hidden_states, residual = add_norm(layer.pre_feedforward_layernorm, hidden_states,
                                               residual)
        else:
            hidden_states, residual = add_norm(layer.input_layernorm, hidden_states, residual)
            hidden_states = layer.self_attn(positions=positions, hidden_states=hidden_states)
            hidden_states = layer.post_attention_layernorm(hidden_states)
            if alpha != 1.0:
                hidden_states = hidden_states * alpha
            hidden_states, residual = layer.pre_feedforward_layernorm(hidden_states, residual)
        hidden_states = layer.mlp(hidden_states)
        hidden_states = layer.post_feedforward_layernorm(hidden_states)
        return hidden_states, residual


def _init_layer(layer, parent, module, attn_name, config, cache_config, quant_config, prefix,
                shared_cls: type | None = None):
    alpha = layer_alpha(config, prefix)
    linear_map = layer_map(config, prefix)
    attn = layer_attention(config, prefix, getattr(module, attn_name), shared_cls)
    # the layer's own head counts and MLP width (head pruning) and sliding window (windows)
    config = layer_config(config, prefix)
    # the parent layer builds its attention by the module-level name (dense: its own)
    with swapped_global(module, attn_name, attn):
        parent.__init__(layer, config, cache_config, quant_config, prefix=prefix)
    layer.harp_alpha = alpha
    layer.harp_raw_input = linear_map is not None and linear_map["input"] == "raw"
    if layer.harp_raw_input:  # the map reads the residual stream: no input norm
        del layer.input_layernorm


class HarpGemma2DecoderLayer(HarpPostNormDecoderLayerMixin, Gemma2DecoderLayer):
    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        _init_layer(self, Gemma2DecoderLayer, vllm_gemma2, "Gemma2Attention", config,
                    cache_config, quant_config, prefix)


class HarpGemma3DecoderLayer(HarpPostNormDecoderLayerMixin, Gemma3DecoderLayer):
    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        _init_layer(self, Gemma3DecoderLayer, vllm_gemma3, "Gemma3Attention", config,
                    cache_config, quant_config, prefix, shared_cls=SharedKVGemma3Attention)


class HarpGemma2ForCausalLM(HarpModelMixin, Gemma2ForCausalLM):
    """vLLM's Gemma2ForCausalLM for a HARP checkpoint (see ``harp_vllm.spec``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        self.harp_read_spec(vllm_config.model_config.hf_config)
        # Gemma2Model builds its layers by the module-level class name.
        with swapped_global(vllm_gemma2, "Gemma2DecoderLayer", HarpGemma2DecoderLayer):
            super().__init__(vllm_config=vllm_config, prefix=prefix)


class HarpGemma3ForCausalLM(HarpModelMixin, Gemma3ForCausalLM):
    """vLLM's (text-only) Gemma3ForCausalLM for a HARP checkpoint."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        self.harp_read_spec(vllm_config.model_config.hf_config)
        with swapped_global(vllm_gemma3, "Gemma3DecoderLayer", HarpGemma3DecoderLayer):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
