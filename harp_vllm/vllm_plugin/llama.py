"""HARP Llama and Mistral: vLLM's own Llama with a per-layer choice of attention."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
)

from .layers import (
    check_attention_weights,
    layer_alpha,
    layer_config,
    layer_map,
    linear_map_factory,
    pruning_spec,
    recording,
    token_local_factory,
)

LLAMA_FAMILIES = ("llama", "mistral")


def _llama_biases(kw: dict) -> tuple[bool, bool]:
    return bool(kw.get("bias", False)), bool(kw.get("bias_o_proj", False))


class HarpLlamaDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer; pruned layers get token-local attention (or none, alpha = 0),
    replaced layers a fitted linear map (on the normed input, or on the residual stream
    itself: ``raw``, with no input norm)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None,
                 attn_layer_type: type = LlamaAttention) -> None:
        config = config or vllm_config.model_config.hf_config
        alpha = layer_alpha(config, prefix)
        linear_map = layer_map(config, prefix)
        config = layer_config(config, prefix)
        if alpha is not None:
            attn_layer_type = token_local_factory(alpha, post_norm=False, biases=_llama_biases)
        elif linear_map is not None:
            attn_layer_type = linear_map_factory(linear_map["rank"])
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=config,
                         attn_layer_type=attn_layer_type)
        self.harp_alpha = alpha
        self.harp_raw_input = linear_map is not None and linear_map["input"] == "raw"
        if self.harp_raw_input:  # the map reads the residual stream: no input norm
            del self.input_layernorm

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.harp_raw_input:
            # The residual add vLLM fuses into the input norm, without the norm: the map reads
            # the residual stream itself.
            residual = hidden_states if residual is None else hidden_states + residual
            hidden_states = self.self_attn(positions=positions, hidden_states=residual)
            hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        elif self.harp_alpha == 0.0:  # the attention branch is skipped: only the MLP half runs
            if residual is None:
                residual = hidden_states
                hidden_states = self.post_attention_layernorm(hidden_states)
            else:
                hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        else:
            return super().forward(positions, hidden_states, residual)
        return self.mlp(hidden_states), residual


class HarpLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's LlamaForCausalLM for a HARP checkpoint (see ``harp_vllm.spec``)."""

    harp_arch = "HarpLlamaForCausalLM"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "",
                 layer_type: type = HarpLlamaDecoderLayer) -> None:
        self.harp_spec = pruning_spec(vllm_config.model_config.hf_config, self.harp_arch,
                                      LLAMA_FAMILIES)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        seen: set[str] = set()
        loaded = super().load_weights(recording(weights, seen))
        check_attention_weights(self, self.model.layers, self.model.start_layer,
                                self.model.end_layer, seen, self.harp_spec, "model.layers")
        return loaded


class HarpMistralForCausalLM(HarpLlamaForCausalLM):
    """HF-format Mistral checkpoints run on vLLM's Llama code (as vLLM did before 0.1x)."""

    harp_arch = "HarpMistralForCausalLM"
