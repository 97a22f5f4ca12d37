"""The family records (harp_vllm.families) and the one vLLM-global swap helper."""

from __future__ import annotations

import importlib.util
import types
from types import SimpleNamespace

import pytest

from harp_vllm import families
from harp_vllm.errors import UserError


def test_each_family_names_a_plugin_class_in_an_existing_module():
    names = [f.harp_architecture for f in families.FAMILIES]
    assert len(names) == len(set(names))
    for f in families.FAMILIES:
        module, cls = f.plugin_class.split(":")
        assert importlib.util.find_spec(module) is not None, f.plugin_class
        assert cls == f.harp_architecture
        assert f.hf_architecture in families.HARP_ARCHITECTURES


def test_family_of_and_post_norm_read_the_model_type():
    assert families.family_of(SimpleNamespace(model_type="mistral")).hf_architecture in (
        "LlamaForCausalLM", "MistralForCausalLM")
    assert families.post_norm(SimpleNamespace(model_type="gemma2")) is True
    assert families.post_norm(SimpleNamespace(model_type="qwen2")) is False
    with pytest.raises(UserError, match="unsupported model family 'gpt2'"):
        families.family_of(SimpleNamespace(model_type="gpt2", architectures=["GPT2"]))


def test_derived_model_type_lists():
    assert families.STRUCTURED_MODEL_TYPES == ("llama", "mistral", "qwen2")
    assert families.NO_COMPENSATION_MODEL_TYPES == ("qwen2",)
    assert families.LINEAR_MODEL_TYPES == ("llama", "mistral")


def test_head_dim_prefers_the_explicit_value():
    cfg = SimpleNamespace(hidden_size=576, num_attention_heads=9, head_dim=None)
    assert families.head_dim(cfg) == 64
    assert families.head_dim(SimpleNamespace(hidden_size=576, num_attention_heads=9,
                                             head_dim=128)) == 128
    assert families.head_dim(None, 576, 6) == 96


def test_bias_rules():
    f = {x.harp_architecture: x for x in families.FAMILIES}
    assert f["HarpLlamaForCausalLM"].biases({"bias": True}) == (True, False)
    assert f["HarpQwen2ForCausalLM"].biases({}) == (True, False)
    gemma_kw = {"config": SimpleNamespace(attention_bias=True)}
    assert f["HarpGemma2ForCausalLM"].biases(gemma_kw) == (True, True)


@pytest.mark.timeout(300)
def test_swapped_global_checks_the_vllm_version_and_the_name(monkeypatch):
    import vllm  # the plugin's dependency: missing means failing, not skipping

    from harp_vllm.vllm_plugin import SKIP_VERSION_CHECK_ENV, UnsupportedVllmVersion
    from harp_vllm.vllm_plugin.version import swapped_global

    monkeypatch.delenv(SKIP_VERSION_CHECK_ENV, raising=False)
    mod = types.ModuleType("fake_vllm_models")
    mod.Attention = "old"
    with swapped_global(mod, "Attention", "new"):
        assert mod.Attention == "new"
    assert mod.Attention == "old"
    with pytest.raises(UnsupportedVllmVersion, match="has no such name"), \
            swapped_global(mod, "Renamed", "new"):
        pass
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with pytest.raises(UnsupportedVllmVersion, match="written for vLLM"), \
            swapped_global(mod, "Attention", "new"):
        pass
    assert mod.Attention == "old"
