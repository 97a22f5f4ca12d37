"""HARP Llama and Mistral: vLLM's own Llama with a per-layer choice of attention."""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
)

from .checkpoint_spec import (
    layer_alpha,
    layer_config,
    layer_map,
)
from .factories import layer_attention
from .mixins import HarpDecoderLayerMixin, HarpModelMixin
from .sharing import SharedKVLlamaAttention


class HarpLlamaDecoderLayer(HarpDecoderLayerMixin, LlamaDecoderLayer):
    """A Llama decoder layer; pruned layers get token-local attention (or none, alpha = 0),
    replaced layers a fitted linear map (on the normed input, or on the residual stream
    itself: ``raw``, with no input norm), layers with KV groups removed a map added in their
    place, layers sharing an earlier layer's KV cache their own queries over it."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None,
                 attn_layer_type: type = LlamaAttention) -> None:
        config = config or vllm_config.model_config.hf_config
        alpha = layer_alpha(config, prefix)
        linear_map = layer_map(config, prefix)
        attn_layer_type = layer_attention(config, prefix, attn_layer_type,
                                          SharedKVLlamaAttention)
        config = layer_config(config, prefix)
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config,
                         attn_layer_type=attn_layer_type)
        self.harp_alpha = alpha
        self.harp_raw_input = linear_map is not None and linear_map["input"] == "raw"
        if self.harp_raw_input:  # the map reads the residual stream: no input norm
            del self.input_layernorm

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.harp_raw_input:
            return super().forward(positions, hidden_states, residual, **kwargs)
        # The residual add vLLM fuses into the input norm, without the norm: the map reads the
        # residual stream itself.
        residual = hidden_states if residual is None else hidden_states + residual
        hidden_states = self.self_attn(positions=positions, hidden_states=residual)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class HarpLlamaForCausalLM(HarpModelMixin, LlamaForCausalLM):
    """vLLM's LlamaForCausalLM for a HARP checkpoint (see ``harp_vllm.spec``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "",
                 layer_type: type = HarpLlamaDecoderLayer) -> None:
        self.harp_read_spec(vllm_config.model_config.hf_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)


class HarpMistralForCausalLM(HarpLlamaForCausalLM):
    """HF-format Mistral checkpoints run on vLLM's Llama code (as vLLM did before 0.1x)."""
