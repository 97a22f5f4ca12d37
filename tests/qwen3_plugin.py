"""The sixth family's plugin classes (``qwen3_family.py`` has its record): vLLM's own Qwen3
with a per-layer choice of attention, as ``harp_vllm/vllm_plugin/qwen2.py`` does for Qwen2."""

from __future__ import annotations

import functools

from vllm.config import VllmConfig
from vllm.model_executor.models import qwen3 as vllm_qwen3
from vllm.model_executor.models.qwen2 import Qwen2Model
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM

from harp_vllm.families import family_of
from harp_vllm.vllm_plugin.checkpoint_spec import layer_alpha
from harp_vllm.vllm_plugin.factories import token_local_factory
from harp_vllm.vllm_plugin.mixins import HarpDecoderLayerMixin, HarpModelMixin
from harp_vllm.vllm_plugin.version import swapped_global


class HarpQwen3DecoderLayer(HarpDecoderLayerMixin, Qwen3DecoderLayer):
    """A Qwen3 decoder layer; pruned layers get token-local attention (or none, alpha = 0)."""

    def __init__(self, config, cache_config=None, quant_config=None, prefix: str = "") -> None:
        alpha = layer_alpha(config, prefix)
        if alpha is None:
            super().__init__(config, cache_config, quant_config, prefix)
        else:  # Qwen3DecoderLayer builds its attention by the module-level name
            attn = token_local_factory(alpha, family_of(config))
            with swapped_global(vllm_qwen3, "Qwen3Attention", attn):
                super().__init__(config, cache_config, quant_config, prefix)
        self.harp_alpha = alpha


class HarpQwen3ForCausalLM(HarpModelMixin, Qwen3ForCausalLM):
    """vLLM's Qwen3ForCausalLM for a HARP checkpoint."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        self.harp_read_spec(vllm_config.model_config.hf_config)
        # Qwen3ForCausalLM builds Qwen3Model (Qwen2Model with Qwen3's layers) by its name.
        model = functools.partial(Qwen2Model, decoder_layer_type=HarpQwen3DecoderLayer)
        with swapped_global(vllm_qwen3, "Qwen3Model", model):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
