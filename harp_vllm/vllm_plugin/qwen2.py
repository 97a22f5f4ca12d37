"""HARP Qwen2: vLLM's own Qwen2 with a per-layer choice of attention."""

from __future__ import annotations

import functools

from vllm.config import VllmConfig
from vllm.model_executor.models import qwen2 as vllm_qwen2
from vllm.model_executor.models.llama import LlamaAttention
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model

from ..families import family_of
from .checkpoint_spec import HarpCheckpointError, layer_alpha, layer_config
from .factories import token_local_factory
from .mixins import HarpDecoderLayerMixin, HarpModelMixin
from .version import swapped_global


def _attention_with_head_dim(config):
    """vLLM's Qwen2 attention derives head_dim from the head count, wrong once heads are
    removed; vLLM's Llama attention computes the same thing (q/k/v bias, RoPE, attention,
    o_proj) with head_dim from the config, so a head-pruned Qwen2 layer uses it."""

    def make(**kw):
        if kw.get("qk_norm") or kw.get("dual_chunk_attention_config"):
            raise HarpCheckpointError(f"{kw['prefix']}: head-pruned Qwen2 layers with qk_norm or "
                                      f"dual-chunk attention are not supported")
        qkv_bias, o_bias = family_of(config).biases(kw)  # the family's: q/k/v, not o_proj
        return LlamaAttention(
            config=config, hidden_size=kw["hidden_size"], num_heads=kw["num_heads"],
            num_kv_heads=kw["num_kv_heads"], max_position_embeddings=kw["max_position"],
            quant_config=kw.get("quant_config"), bias=qkv_bias, bias_o_proj=o_bias,
            cache_config=kw.get("cache_config"), prefix=kw["prefix"],
            attn_type=kw.get("attn_type", "decoder"))

    return make


class HarpQwen2DecoderLayer(HarpDecoderLayerMixin, Qwen2DecoderLayer):
    """A Qwen2 decoder layer; pruned layers get token-local attention (or none, alpha = 0)."""

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        alpha = layer_alpha(config, prefix)
        layer_cfg = layer_config(config, prefix)
        if layer_cfg is not config:  # head-pruned: its own head counts and MLP width
            with swapped_global(vllm_qwen2, "Qwen2Attention",
                                _attention_with_head_dim(layer_cfg)):
                super().__init__(layer_cfg, cache_config, quant_config, prefix)
        elif alpha is None:
            super().__init__(config, cache_config, quant_config, prefix)
        else:  # Qwen2DecoderLayer builds its attention by the module-level name
            attn = token_local_factory(alpha, family_of(config))
            with swapped_global(vllm_qwen2, "Qwen2Attention", attn):
                super().__init__(config, cache_config, quant_config, prefix)
        self.harp_alpha = alpha


class HarpQwen2ForCausalLM(HarpModelMixin, Qwen2ForCausalLM):
    """vLLM's Qwen2ForCausalLM for a HARP checkpoint (see ``harp_vllm.spec``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        self.harp_read_spec(vllm_config.model_config.hf_config.get_text_config())
        # Qwen2ForCausalLM builds Qwen2Model (by module-level name) without a layer type.
        model = functools.partial(Qwen2Model, decoder_layer_type=HarpQwen2DecoderLayer)
        with swapped_global(vllm_qwen2, "Qwen2Model", model):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
