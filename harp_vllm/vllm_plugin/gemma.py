"""HARP Gemma2 and Gemma3: vLLM's own models with a per-layer choice of attention.

Gemma normalizes the attention output (post_attention_layernorm) before the residual add, so
alpha is applied after that norm: the fold uses alpha = 1 and the layer scales the normed
output.
"""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.model_executor.models import gemma2 as vllm_gemma2
from vllm.model_executor.models import gemma3 as vllm_gemma3
from vllm.model_executor.models.gemma2 import Gemma2DecoderLayer, Gemma2ForCausalLM
from vllm.model_executor.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM

from ..families import BY_HARP_ARCHITECTURE
from .layers import (
    HarpDecoderLayerMixin,
    HarpModelMixin,
    layer_alpha,
    pruning_spec,
    swapped_global,
    token_local_factory,
)


def _init_layer(layer, parent, module, attn_name, config, cache_config, quant_config, prefix):
    alpha = layer_alpha(config, prefix)
    if alpha is None:
        parent.__init__(layer, config, cache_config, quant_config, prefix=prefix)
    else:  # the parent layer builds its attention by the module-level name
        attn = token_local_factory(alpha, BY_HARP_ARCHITECTURE[layer.harp_arch])
        with swapped_global(module, attn_name, attn):
            parent.__init__(layer, config, cache_config, quant_config, prefix=prefix)
    layer.harp_alpha = alpha


class HarpGemma2DecoderLayer(HarpDecoderLayerMixin, Gemma2DecoderLayer):
    harp_arch = "HarpGemma2ForCausalLM"
    harp_post_norm = True

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        _init_layer(self, Gemma2DecoderLayer, vllm_gemma2, "Gemma2Attention", config,
                    cache_config, quant_config, prefix)


class HarpGemma3DecoderLayer(HarpDecoderLayerMixin, Gemma3DecoderLayer):
    harp_arch = "HarpGemma3ForCausalLM"
    harp_post_norm = True

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        _init_layer(self, Gemma3DecoderLayer, vllm_gemma3, "Gemma3Attention", config,
                    cache_config, quant_config, prefix)


class HarpGemma2ForCausalLM(HarpModelMixin, Gemma2ForCausalLM):
    """vLLM's Gemma2ForCausalLM for a HARP checkpoint (see ``harp_vllm.spec``)."""

    harp_arch = "HarpGemma2ForCausalLM"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        self.harp_spec = pruning_spec(vllm_config.model_config.hf_config, self.harp_arch)
        # Gemma2Model builds its layers by the module-level class name.
        with swapped_global(vllm_gemma2, "Gemma2DecoderLayer", HarpGemma2DecoderLayer):
            super().__init__(vllm_config=vllm_config, prefix=prefix)


class HarpGemma3ForCausalLM(HarpModelMixin, Gemma3ForCausalLM):
    """vLLM's (text-only) Gemma3ForCausalLM for a HARP checkpoint."""

    harp_arch = "HarpGemma3ForCausalLM"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        self.harp_spec = pruning_spec(vllm_config.model_config.hf_config, self.harp_arch)
        with swapped_global(vllm_gemma3, "Gemma3DecoderLayer", HarpGemma3DecoderLayer):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
