"""HARP Gemma2 and Gemma3: vLLM's own models with a per-layer choice of attention.

Gemma normalizes the attention output (post_attention_layernorm) before the residual add, so
alpha is applied after that norm: the fold uses alpha = 1 and the layer scales the normed
output.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models import gemma2 as vllm_gemma2
from vllm.model_executor.models import gemma3 as vllm_gemma3
from vllm.model_executor.models.gemma2 import Gemma2DecoderLayer, Gemma2ForCausalLM
from vllm.model_executor.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM

from .layers import (
    check_attention_weights,
    layer_alpha,
    patched,
    pruning_spec,
    recording,
    token_local_factory,
)


def _gemma_biases(kw: dict) -> tuple[bool, bool]:
    bias = bool(getattr(kw["config"], "attention_bias", False))
    return bias, bias


class _HarpGemmaLayerMixin:
    """Pruned-layer forward for Gemma2/Gemma3 decoder layers (dense layers: the parent's)."""

    harp_alpha: float | None

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if self.harp_alpha is None:
            return super().forward(positions, hidden_states, residual, **kwargs)
        if self.harp_alpha == 0.0:  # the attention branch is skipped
            if residual is None:
                residual = hidden_states
                hidden_states = self.pre_feedforward_layernorm(hidden_states)
            else:
                hidden_states, residual = self.pre_feedforward_layernorm(hidden_states,
                                                                         residual)
        else:
            if residual is None:
                residual = hidden_states
                hidden_states = self.input_layernorm(hidden_states)
            else:
                hidden_states, residual = self.input_layernorm(hidden_states, residual)
            hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
            hidden_states = self.post_attention_layernorm(hidden_states)
            if self.harp_alpha != 1.0:
                hidden_states = hidden_states * self.harp_alpha
            hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.post_feedforward_layernorm(hidden_states)
        return hidden_states, residual


def _init_layer(layer, parent, module, attn_name, config, cache_config, quant_config, prefix):
    alpha = layer_alpha(config, prefix)
    if alpha is None:
        parent.__init__(layer, config, cache_config, quant_config, prefix=prefix)
    else:  # the parent layer builds its attention by the module-level name
        attn = token_local_factory(alpha, post_norm=True, biases=_gemma_biases)
        with patched(module, attn_name, attn):
            parent.__init__(layer, config, cache_config, quant_config, prefix=prefix)
    layer.harp_alpha = alpha


class HarpGemma2DecoderLayer(_HarpGemmaLayerMixin, Gemma2DecoderLayer):
    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        _init_layer(self, Gemma2DecoderLayer, vllm_gemma2, "Gemma2Attention", config,
                    cache_config, quant_config, prefix)


class HarpGemma3DecoderLayer(_HarpGemmaLayerMixin, Gemma3DecoderLayer):
    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        _init_layer(self, Gemma3DecoderLayer, vllm_gemma3, "Gemma3Attention", config,
                    cache_config, quant_config, prefix)


class _HarpGemmaMixin:
    harp_arch: str
    harp_families: tuple[str, ...]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        seen: set[str] = set()
        loaded = super().load_weights(recording(weights, seen))
        check_attention_weights(self, self.model.layers, self.model.start_layer,
                                self.model.end_layer, seen, self.harp_spec, "model.layers")
        return loaded


class HarpGemma2ForCausalLM(_HarpGemmaMixin, Gemma2ForCausalLM):
    """vLLM's Gemma2ForCausalLM for a HARP checkpoint (see ``harp_vllm.spec``)."""

    harp_arch = "HarpGemma2ForCausalLM"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        self.harp_spec = pruning_spec(vllm_config.model_config.hf_config, self.harp_arch,
                                      ("gemma2",))
        # Gemma2Model builds its layers by the module-level class name.
        with patched(vllm_gemma2, "Gemma2DecoderLayer", HarpGemma2DecoderLayer):
            super().__init__(vllm_config=vllm_config, prefix=prefix)


class HarpGemma3ForCausalLM(_HarpGemmaMixin, Gemma3ForCausalLM):
    """vLLM's (text-only) Gemma3ForCausalLM for a HARP checkpoint."""

    harp_arch = "HarpGemma3ForCausalLM"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        self.harp_spec = pruning_spec(vllm_config.model_config.hf_config, self.harp_arch,
                                      ("gemma3_text",))
        with patched(vllm_gemma3, "Gemma3DecoderLayer", HarpGemma3DecoderLayer):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
