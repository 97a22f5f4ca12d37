"""One record per model family HARP supports: every family fact lives here.

The offline side (pruning, the reference model, the checkpoint writer) and the vLLM plugin
both read these records; nothing else keeps a list of model types or architectures. Adding a
family is one ``Family`` record here plus a small plugin subclass (README: "Adding a model
family"). This module imports neither torch nor vLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import UserError

BiasRule = Callable[[dict[str, Any]], tuple[bool, bool]]


def _llama_biases(kw: dict[str, Any]) -> tuple[bool, bool]:
    return bool(kw.get("bias", False)), bool(kw.get("bias_o_proj", False))


def _qwen2_biases(kw: dict[str, Any]) -> tuple[bool, bool]:
    return True, False  # Qwen2: q/k/v have biases, o has none


def _gemma_biases(kw: dict[str, Any]) -> tuple[bool, bool]:
    bias = bool(getattr(kw["config"], "attention_bias", False))
    return bias, bias


@dataclass(frozen=True)
class Family:
    """What HARP knows about one HF architecture."""

    hf_architecture: str  # the dense checkpoint's config.json "architectures" entry
    model_types: tuple[str, ...]  # config.json "model_type" values the plugin class accepts
    harp_architecture: str  # the architecture a pruned checkpoint declares (vLLM registry)
    plugin_class: str  # "module:Class" of the plugin's implementation
    post_norm: bool  # alpha scales after a post-attention norm (Gemma), else the o_proj output
    heads: bool  # head/MLP-level pruning (amp, flap, wanda-sp) is served
    # --method linear checkpoints are served (post-norm: the map replaces the attention before
    # the post-attention norm, which stays)
    linear_maps: bool
    compensation: bool  # vLLM's code has o_proj / down_proj biases for FLAP's compensation
    biases: BiasRule  # (v_bias, o_bias) of a pruned layer from the attention's keyword args
    # per-layer sliding windows are served: vLLM's attention of the family reads the layer's
    # ``layer_types`` and ``sliding_window`` (Qwen2's takes one model-wide window only)
    windows: bool = False
    # cross-layer KV sharing is served: the plugin's sharing attention (q/o only, vLLM's
    # ``kv_sharing_target_layer_name``) is written for the family's attention
    kv_sharing: bool = False
    # a windowed layer's per-head sink logits are served (``sinks``: Llama-like attention, no
    # QK norm; the reference's ``window_sinks.py`` and the plugin's ``with_sinks``)
    window_sinks: bool = False
    # a layer windowed in some KV groups only is served (``group_windows``: the plugin's
    # ``group_windows.py`` splits Llama's attention into a vLLM attention per KV group)
    group_windows: bool = False


_PLUGIN = "harp_vllm.vllm_plugin"
FAMILIES: tuple[Family, ...] = (
    Family("LlamaForCausalLM", ("llama", "mistral"), "HarpLlamaForCausalLM",
           f"{_PLUGIN}.llama:HarpLlamaForCausalLM",
           post_norm=False, heads=True, linear_maps=True, compensation=True,
           biases=_llama_biases, windows=True, kv_sharing=True, window_sinks=True,
           group_windows=True),
    # HF-format Mistral checkpoints run on vLLM's Llama code.
    Family("MistralForCausalLM", ("llama", "mistral"), "HarpMistralForCausalLM",
           f"{_PLUGIN}.llama:HarpMistralForCausalLM",
           post_norm=False, heads=True, linear_maps=True, compensation=True,
           biases=_llama_biases, windows=True, kv_sharing=True, window_sinks=True,
           group_windows=True),
    Family("Qwen2ForCausalLM", ("qwen2",), "HarpQwen2ForCausalLM",
           f"{_PLUGIN}.qwen2:HarpQwen2ForCausalLM",
           post_norm=False, heads=True, linear_maps=False, compensation=False,
           biases=_qwen2_biases),
    Family("Gemma2ForCausalLM", ("gemma2",), "HarpGemma2ForCausalLM",
           f"{_PLUGIN}.gemma:HarpGemma2ForCausalLM",
           post_norm=True, heads=False, linear_maps=True, compensation=False,
           biases=_gemma_biases, windows=True),
    # heads: one KV head (270M) is cut by query heads (``pruning/heads.py``); no o_proj /
    # down_proj biases in vLLM's Gemma code, so FLAP without its compensation
    Family("Gemma3ForCausalLM", ("gemma3_text",), "HarpGemma3ForCausalLM",
           f"{_PLUGIN}.gemma:HarpGemma3ForCausalLM",
           post_norm=True, heads=True, linear_maps=True, compensation=False,
           biases=_gemma_biases, windows=True, kv_sharing=True),
)

# Everything below reads FAMILIES when called (nothing is derived from it at import), so a
# family added to FAMILIES is known everywhere at once (tests/test_families.py adds one).


def model_types(served: Callable[[Family], bool] = lambda f: True) -> tuple[str, ...]:
    """The ``model_type`` values of the families ``served`` accepts (all by default), in
    FAMILIES order without repeats: e.g. ``model_types(lambda f: f.heads)``, the model types
    whose head-pruned checkpoints the plugin serves."""
    return tuple(dict.fromkeys(mt for f in FAMILIES if served(f) for mt in f.model_types))


def check_served(config: Any, served: Callable[[Family], bool], what: str) -> None:
    """UserError unless ``config``'s family serves a kind of change (``served`` reads its
    record); ``what`` names it with its verb, e.g. "linear maps are"."""
    if not served(family_of(config)):
        raise UserError(f"{what} served for {', '.join(model_types(served))} models only, "
                        f"not {getattr(config, 'model_type', None)!r}")


def by_harp_architecture(name: str) -> Family | None:
    """The family whose pruned checkpoints declare architecture ``name`` (None: not HARP's)."""
    return next((f for f in FAMILIES if f.harp_architecture == name), None)


def plugin_family(cls: type) -> Family:
    """The family whose ``plugin_class`` is ``cls`` (the plugin's model class reads its record
    through this); LookupError if no record names it."""
    name = f"{cls.__module__}:{cls.__qualname__}"
    for f in FAMILIES:
        if f.plugin_class == name:
            return f
    raise LookupError(f"no family in harp_vllm.families names the plugin class {name}")


def family_of(config: Any) -> Family:
    """The family of a HF config by its ``model_type``; UserError if HARP does not support it."""
    mt = getattr(config, "model_type", None)
    for f in FAMILIES:
        if mt in f.model_types:
            return f
    raise UserError(f"unsupported model family {mt!r} (architectures "
                    f"{getattr(config, 'architectures', None)}); supported: "
                    f"{', '.join(sorted(model_types()))}")


def post_norm(config: Any) -> bool:
    """Whether the family scales after the post-attention norm; UserError if unsupported."""
    return family_of(config).post_norm


def harp_architecture(config) -> str:
    """The HARP architecture name for a dense config (clear error if unsupported)."""
    family_of(config)  # UserError for an unsupported family
    archs = getattr(config, "architectures", None) or []
    harp = {f.hf_architecture: f.harp_architecture for f in FAMILIES}
    for a in archs:
        if a in harp:
            return harp[a]
        if a in harp.values():
            return a
    raise UserError(f"unsupported architecture {archs}; supported: {', '.join(harp)}")


def head_dim(config: Any, hidden_size: int | None = None, num_heads: int | None = None) -> int:
    """The attention head size: ``config.head_dim`` if set, else hidden size / head count
    (``hidden_size`` / ``num_heads`` override the config's, as vLLM's attention passes them)."""
    explicit = getattr(config, "head_dim", None)
    if explicit:
        return int(explicit)
    hidden = hidden_size or config.hidden_size
    return int(hidden // (num_heads or config.num_attention_heads))
