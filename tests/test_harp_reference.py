"""The HARP reference implementation on tiny random models of each supported family."""

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, own_model_type
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import eager_attention_forward

from harp_vllm import families
from harp_vllm.errors import UserError
from harp_vllm.families import post_norm
from harp_vllm.pruning.jobs.checkpoint import save_pruned
from harp_vllm.pruning.reference import decoder_layers, load_model, pruned
from harp_vllm.spec import PruningSpec

FAMILIES = [own_model_type(f) for f in families.FAMILIES]  # each family's own model type
IDENTITY_LAYERS: set[int] = set()


def identity_or_sdpa(module, query, key, value, attention_mask, **kwargs):
    """Real attention, but layers in IDENTITY_LAYERS get a diagonal-only mask (identity A)."""
    if module.layer_idx not in IDENTITY_LAYERS:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    t = query.shape[-2]
    diag = torch.full((t, t), float("-inf"), dtype=query.dtype)
    diag.fill_diagonal_(0.0)
    kwargs.pop("sliding_window", None)
    return eager_attention_forward(module, query, key, value, diag[None, None], **kwargs)


AttentionInterface.register("identity_test", identity_or_sdpa)


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory) -> Path:
    return make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


def ids(n=2, t=24, vocab=300, seed=1):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_pruned_layer_is_attention_with_identity_matrix(tiny):
    model = load_model(tiny)
    x = ids()
    model.config._attn_implementation = "identity_test"
    IDENTITY_LAYERS.update({1, 3})
    try:
        want = model(input_ids=x).logits
    finally:
        IDENTITY_LAYERS.clear()
        model.config._attn_implementation = "sdpa"
    with pruned(model, {1: 1.0, 3: 1.0}):
        got = model(input_ids=x).logits
    dense = model(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert not torch.allclose(dense, want, atol=1e-3)  # the test can tell the difference


@torch.no_grad()
def test_alpha_scales_the_attention_branch(tiny):
    model = load_model(tiny)
    layer = decoder_layers(model)[2]
    captured = []
    norm = layer.post_attention_layernorm if post_norm(model.config) else None
    target = norm if norm is not None else layer.self_attn

    def grab(module, args, out):
        captured.append(out[0] if isinstance(out, tuple) else out)

    for alpha in (1.0, 0.3):
        with pruned(model, {2: alpha}):
            handle = (target if norm is not None else layer.self_attn).register_forward_hook(
                grab)
            model(input_ids=ids())
            handle.remove()
    assert torch.allclose(captured[1], 0.3 * captured[0], atol=1e-6)


@torch.no_grad()
def test_alpha_zero_equals_skipping_the_sublayer(tiny):
    model = load_model(tiny)
    x = ids()
    layer = decoder_layers(model)[2]

    def zero_attention(module, args, out):
        return (torch.zeros_like(out[0]), *out[1:])

    handle = layer.self_attn.register_forward_hook(zero_attention)
    want = model(input_ids=x).logits
    handle.remove()
    with pruned(model, {2: 0.0}):
        got = model(input_ids=x).logits
    assert torch.equal(got, want)
    assert not torch.allclose(model(input_ids=x).logits, want, atol=1e-3)


@torch.no_grad()
def test_save_load_round_trip_is_bitwise(tiny, tmp_path):
    model = load_model(tiny)
    x = ids()
    spec = PruningSpec(layers={1: 0.4, 3: 0.0}, source_model=str(tiny))
    with pruned(model, spec.layers):
        want = model(input_ids=x).logits
    out = save_pruned(model, spec, tiny, tmp_path / "pruned")
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert not any(k.startswith(("model.layers.1.self_attn.q", "model.layers.1.self_attn.k"))
                   for k in keys)
    assert "model.layers.1.self_attn.v_proj.weight" in keys
    assert not any(k.startswith("model.layers.3.self_attn.") for k in keys)
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    reloaded = load_model(out)
    assert torch.equal(reloaded(input_ids=x).logits, want)


def test_out_of_range_layer_is_rejected(tiny_llama):
    model = load_model(tiny_llama)
    with pytest.raises(UserError, match="layer index 7 out of range"), pruned(model, {7: 1.0}):
        pass


def test_loading_checkpoint_with_missing_weights_fails_clearly(tiny_llama, tmp_path):
    import json

    model = load_model(tiny_llama)
    out = save_pruned(model, PruningSpec(layers={3: 0.5}), tiny_llama, tmp_path / "p")
    cfg = json.loads((out / "config.json").read_text())
    cfg["harp_pruning"]["layers"] = {"3": 0.5, "2": 0.5}  # layer 2 still has q/k on disk
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"unexpected \['model.layers.2.self_attn.k_proj"):
        load_model(out)
    cfg["harp_pruning"]["layers"] = {"3": 0.0}  # v/o on disk but not expected
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="unexpected"):
        load_model(out)


def test_unsupported_family_is_rejected(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(
        tmp_path)
    model = load_model(tmp_path)
    with pytest.raises(UserError, match="unsupported model family 'gpt2'"), pruned(model, {0: 1}):
        pass


@pytest.mark.parametrize(
    ("section", "message"),
    [("oops", "must be an object"), ({"version": 7, "layers": {}},
      "reads versions 1, 2, 3, 4, 5, 6"),
     ({"version": 1}, "layers' must be an object"),
     ({"version": 1, "layers": {"x": 1}}, "non-integer layer index"),
     ({"version": 1, "layers": {"1": "big"}}, "alpha must be a number"),
     ({"version": 1, "layers": {"9": 1.0}}, "out of range")],
)
def test_spec_validation(section, message):
    with pytest.raises(UserError, match=message):
        PruningSpec.from_config({"num_hidden_layers": 4, "harp_pruning": section})


def test_spec_round_trip():
    spec = PruningSpec(layers={3: 0.2, 1: 0.0}, source_model="m", calibration={"a": 1})
    again = PruningSpec.from_dict(spec.to_dict(), 4)
    assert again.layers == {1: 0.0, 3: 0.2} and again.calibration == {"a": 1}
