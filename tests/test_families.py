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


def test_family_of_and_post_norm_read_the_model_type():
    assert families.family_of(SimpleNamespace(model_type="mistral")).hf_architecture in (
        "LlamaForCausalLM", "MistralForCausalLM")
    assert families.post_norm(SimpleNamespace(model_type="gemma2")) is True
    assert families.post_norm(SimpleNamespace(model_type="qwen2")) is False
    with pytest.raises(UserError, match="unsupported model family 'gpt2'"):
        families.family_of(SimpleNamespace(model_type="gpt2", architectures=["GPT2"]))


def test_derived_model_type_lists():
    assert families.model_types() == ("llama", "mistral", "qwen2", "gemma2", "gemma3_text")
    assert families.model_types(lambda f: f.heads) == ("llama", "mistral", "qwen2",
                                                       "gemma3_text")
    assert families.model_types(lambda f: f.heads and not f.compensation) == ("qwen2",
                                                                              "gemma3_text")
    assert families.model_types(lambda f: f.linear_maps) == ("llama", "mistral", "gemma2",
                                                             "gemma3_text")


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


@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_a_sixth_family_is_one_record_and_one_small_plugin_class(monkeypatch, tmp_path):
    """Qwen3, unknown to HARP, becomes a served family by its record (``qwen3_family.py``)
    and its plugin classes (``qwen3_plugin.py``) alone: pruned offline by the reference and
    the checkpoint writer, refused by nothing, and served by vLLM with the reference's greedy
    tokens and prompt logprobs."""
    import json

    from conftest import TINY_ALPHAS, TINY_PROMPTS, make_tiny, save
    from probe import run_engine
    from qwen3_family import FAMILY
    from test_vllm_plugin import assert_matches, reference

    dense = make_tiny("qwen3", tmp_path / "dense")
    with pytest.raises(UserError, match="unsupported model family 'qwen3'"):
        save(dense, tmp_path / "refused", TINY_ALPHAS)
    monkeypatch.setattr(families, "FAMILIES", (*families.FAMILIES, FAMILY))
    pruned = save(dense, tmp_path / "pruned", TINY_ALPHAS)
    assert json.loads((pruned / "config.json").read_text())["architectures"] == [
        "HarpQwen3ForCausalLM"]
    result, log = run_engine(pruned, tmp_path / "run", TINY_PROMPTS,
                             extra=("--add-family", "qwen3_family"))
    assert result.get("ok"), result.get("error", "") + log[-3000:]
    assert result["architectures"] == ["HarpQwen3ForCausalLM"]
    kinds = result["ranks"][0]["attention_modules"]
    assert {kinds[str(i)] for i in TINY_ALPHAS if TINY_ALPHAS[i]} == {
        "FoldedTokenLocalAttention"}
    assert kinds["2"] == "RemovedAttention" and kinds["1"] == "Qwen3Attention"
    assert_matches(result, reference(pruned, TINY_PROMPTS, result))
