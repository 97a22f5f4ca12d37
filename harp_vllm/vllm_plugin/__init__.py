"""vLLM plugin: serve HARP-pruned checkpoints with vLLM's own model code.

Installed as the ``vllm.general_plugins`` entry point ``harp_vllm``; vLLM calls ``register``
in every process it starts. The model classes are registered lazily by "module:Class" name,
so importing this package (or ``harp_vllm``) does not import vLLM.
"""

from __future__ import annotations

# HARP architecture name -> "module:Class" of its vLLM implementation.
MODELS = {
    "HarpLlamaForCausalLM": "harp_vllm.vllm_plugin.llama:HarpLlamaForCausalLM",
    "HarpMistralForCausalLM": "harp_vllm.vllm_plugin.llama:HarpMistralForCausalLM",
    "HarpQwen2ForCausalLM": "harp_vllm.vllm_plugin.qwen2:HarpQwen2ForCausalLM",
    "HarpGemma2ForCausalLM": "harp_vllm.vllm_plugin.gemma:HarpGemma2ForCausalLM",
    "HarpGemma3ForCausalLM": "harp_vllm.vllm_plugin.gemma:HarpGemma3ForCausalLM",
}


def register() -> None:
    """Register the HARP architectures with vLLM's ModelRegistry (safe to call repeatedly)."""
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for arch, target in MODELS.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
