"""A sixth family, added the way README "Adding a model family" says: this one record, and
the small plugin classes of ``qwen3_plugin.py`` (tests/test_families.py serves it).

Qwen3 is Llama-shaped with q/k norms inside the attention, which HARP's pruned layers drop
with q/k; vLLM's Qwen3 attention has no o_proj bias and a q/k/v bias when ``attention_bias``
is set. Importing this module changes nothing: a test adds ``FAMILY`` to
``harp_vllm.families.FAMILIES`` (and ``tests/probe.py --add-family qwen3_family`` in the
engine's process).
"""

from __future__ import annotations

from typing import Any

from harp_vllm.families import Family


def _qwen3_biases(kw: dict[str, Any]) -> tuple[bool, bool]:
    return bool(kw.get("qkv_bias", False)), False


FAMILY = Family("Qwen3ForCausalLM", ("qwen3",), "HarpQwen3ForCausalLM",
                "qwen3_plugin:HarpQwen3ForCausalLM",
                post_norm=False, heads=False, linear_maps=False, compensation=False,
                biases=_qwen3_biases)
