"""HARP Qwen2: vLLM's own Qwen2 with a per-layer choice of attention."""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models import qwen2 as vllm_qwen2
from vllm.model_executor.models.llama import LlamaAttention
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model

from .layers import (
    HarpCheckpointError,
    check_attention_weights,
    layer_alpha,
    layer_config,
    patched,
    pruning_spec,
    recording,
    token_local_factory,
)


def _qwen2_biases(kw: dict) -> tuple[bool, bool]:
    return True, False  # Qwen2: q/k/v have biases, o has none


def _attention_with_head_dim(config):
    """vLLM's Qwen2 attention derives head_dim from the head count, wrong once heads are
    removed; vLLM's Llama attention computes the same thing (q/k/v bias, RoPE, attention,
    o_proj) with head_dim from the config, so a head-pruned Qwen2 layer uses it."""

    def make(**kw):
        if kw.get("qk_norm") or kw.get("dual_chunk_attention_config"):
            raise HarpCheckpointError(f"{kw['prefix']}: head-pruned Qwen2 layers with qk_norm or "
                                      f"dual-chunk attention are not supported")
        return LlamaAttention(
            config=config, hidden_size=kw["hidden_size"], num_heads=kw["num_heads"],
            num_kv_heads=kw["num_kv_heads"], max_position_embeddings=kw["max_position"],
            quant_config=kw.get("quant_config"), bias=True,
            bias_o_proj=bool(getattr(config, "attention_bias", False)),
            cache_config=kw.get("cache_config"), prefix=kw["prefix"],
            attn_type=kw.get("attn_type", "decoder"))

    return make


class HarpQwen2DecoderLayer(Qwen2DecoderLayer):
    """A Qwen2 decoder layer; pruned layers get token-local attention (or none, alpha = 0)."""

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        alpha = layer_alpha(config, prefix)
        layer_cfg = layer_config(config, prefix)
        if layer_cfg is not config:  # head-pruned: its own head counts and MLP width
            with patched(vllm_qwen2, "Qwen2Attention", _attention_with_head_dim(layer_cfg)):
                super().__init__(layer_cfg, cache_config, quant_config, prefix)
        elif alpha is None:
            super().__init__(config, cache_config, quant_config, prefix)
        else:  # Qwen2DecoderLayer builds its attention by the module-level name
            attn = token_local_factory(alpha, post_norm=False, biases=_qwen2_biases)
            with patched(vllm_qwen2, "Qwen2Attention", attn):
                super().__init__(config, cache_config, quant_config, prefix)
        self.harp_alpha = alpha

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.harp_alpha != 0.0:
            return super().forward(positions, hidden_states, residual)
        if residual is None:  # alpha = 0: skip the attention branch
            residual = hidden_states
            hidden_states = self.post_attention_layernorm(hidden_states)
        else:
            hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class HarpQwen2ForCausalLM(Qwen2ForCausalLM):
    """vLLM's Qwen2ForCausalLM for a HARP checkpoint (see ``harp_vllm.spec``)."""

    harp_arch = "HarpQwen2ForCausalLM"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        self.harp_spec = pruning_spec(vllm_config.model_config.hf_config.get_text_config(),
                                      self.harp_arch, ("qwen2",))
        # Qwen2ForCausalLM builds Qwen2Model (by module-level name) without a layer type.
        model = functools.partial(Qwen2Model, decoder_layer_type=HarpQwen2DecoderLayer)
        with patched(vllm_qwen2, "Qwen2Model", model):
            super().__init__(vllm_config=vllm_config, prefix=prefix)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        seen: set[str] = set()
        loaded = super().load_weights(recording(weights, seen))
        check_attention_weights(self, self.model.layers, self.model.start_layer,
                                self.model.end_layer, seen, self.harp_spec, "model.layers")
        return loaded
