"""Cross-layer KV sharing as a per-layer choice (issue 24): the pruning section's
``kv_sharing``, the HF reference, and the cost model (a sharing layer stores no KV)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import greedy_without_cache, make_tiny_model

from harp_vllm.errors import UserError
from harp_vllm.spec import PruningSpec

SMOL = SimpleNamespace(model_type="llama", hidden_size=576, num_attention_heads=9,
                       num_key_value_heads=3,
                       head_dim=64, intermediate_size=1536, num_hidden_layers=30,
                       vocab_size=49152, max_position_embeddings=8192)


def _escape(message: str) -> str:
    return message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace(
        "]", r"\]").replace(".", r"\.")


# ---------------------------------------------------------------------------- the spec


def test_sharing_round_trip_and_version():
    spec = PruningSpec(layers={0: 0.0}, windows={1: 64, 4: 64}, kv_sharing={4: 1, 3: 2})
    d = spec.to_dict()
    assert d["version"] == 4 and d["kv_sharing"] == {"3": 2, "4": 1}
    back = PruningSpec.from_dict(d, num_layers=8)
    assert back.kv_sharing == {3: 2, 4: 1} and back.windows == {1: 64, 4: 64}
    assert back.kv_heads(8, 3) == [0, 3, 3, 0, 0, 3, 3, 3]  # sharing layers store no KV
    # no sharing: the older versions are still written (and read)
    assert PruningSpec(layers={}, windows={1: 64}).to_dict()["version"] == 3
    assert "kv_sharing" not in PruningSpec(layers={2: 0.5}).to_dict()
    for version in (1, 2, 3):
        assert PruningSpec.from_dict({"version": version, "layers": {"2": 0.5}}).kv_sharing == {}


SHAPES = {"num_attention_heads": [4] * 6, "num_key_value_heads": [2, 2, 1, 2, 1, 2],
          "intermediate_size": [256] * 6}


@pytest.mark.parametrize("section, message", [
    ({"version": 3, "layers": {}, "kv_sharing": {"3": 1}}, "needs 'harp_pruning.version' 4"),
    ({"version": 4, "layers": {}, "kv_sharing": [1]}, "must be an object"),
    ({"version": 4, "layers": {}, "kv_sharing": {"3": "1"}}, "must be a layer index"),
    ({"version": 4, "layers": {}, "kv_sharing": {"9": 1}}, "layer index 9 out of range"),
    ({"version": 4, "layers": {}, "kv_sharing": {"3": 7}}, "layer index 7 out of range"),
    # the target must come earlier
    ({"version": 4, "layers": {}, "kv_sharing": {"3": 3}},
     "'harp_pruning.kv_sharing'[3] is 3: layer 3 can only share the KV cache of an earlier "
     "layer (0..2)"),
    ({"version": 4, "layers": {}, "kv_sharing": {"2": 4}},
     "layer 2 can only share the KV cache of an earlier layer"),
    # the target has its own attention
    ({"version": 4, "layers": {"1": 0.5}, "kv_sharing": {"3": 1}},
     "layer 1 has no KV cache to share: it is pruned"),
    ({"version": 4, "layers": {"1": 0.0}, "kv_sharing": {"3": 1}},
     "layer 1 has no KV cache to share: it is pruned"),
    ({"version": 4, "layers": {}, "maps": {"1": {"input": "normed", "rank": None}},
      "kv_sharing": {"3": 1}}, "layer 1 has no KV cache to share: it is replaced by a linear"),
    # no chains
    ({"version": 4, "layers": {}, "kv_sharing": {"3": 1, "5": 3}},
     "layer 3 itself shares layer 1's KV cache (no chains: point layer 5 at 1)"),
    # the same kind: window and KV heads
    ({"version": 4, "layers": {}, "windows": {"3": 64}, "kv_sharing": {"3": 1}},
     "a layer of another kind: layer 3 has window 64, layer 1 None"),
    ({"version": 4, "layers": {}, "windows": {"1": 64, "3": 32}, "kv_sharing": {"3": 1}},
     "layer 3 has window 32, layer 1 64"),
    ({"version": 4, "layers": {}, "shapes": SHAPES, "kv_sharing": {"3": 2}},
     "a layer of another kind: layer 3 has 2 KV heads, layer 2 1"),
    # the sharing layer has attention of its own
    ({"version": 4, "layers": {"3": 0.0}, "kv_sharing": {"3": 1}},
     "layer 3 is in 'harp_pruning.kv_sharing' but it is pruned"),
    ({"version": 4, "layers": {}, "maps": {"3": {"input": "raw", "rank": 8}},
      "kv_sharing": {"3": 1}}, "layer 3 is in 'harp_pruning.kv_sharing' but it is replaced"),
    ({"version": 4, "layers": {}, "shapes": SHAPES, "maps": {"3": {"input": "normed",
                                                                 "rank": 8, "add": True}},
      "kv_sharing": {"3": 1}}, "but it has a map added to its attention"),
])
def test_bad_sharing_is_refused(section, message):
    with pytest.raises(UserError, match=_escape(message)):
        PruningSpec.from_dict(section, num_layers=6)


def test_sharing_of_the_same_kind_is_accepted():
    spec = PruningSpec.from_dict(
        {"version": 4, "layers": {"0": 0.0}, "shapes": SHAPES,
         "windows": {"2": 16, "4": 16}, "kv_sharing": {"4": 2, "3": 1, "5": 1}}, num_layers=6)
    assert spec.kv_sharing == {3: 1, 4: 2, 5: 1}  # one target may serve several layers


def test_sharing_on_a_family_without_support_is_refused():
    from harp_vllm.families import model_types

    assert set(model_types(lambda f: f.kv_sharing)) == {"llama", "mistral", "gemma3_text"}
    # the planner refuses to offer it to such a family, naming why
    from harp_vllm.pruning.jobs.plan_options import PlanOptions, parse_kinds

    qwen = SimpleNamespace(**{**vars(SMOL), "model_type": "qwen2"})
    opts = PlanOptions(model="m", out=None, kv_saving=0.3, share_targets=2)  # type: ignore
    with pytest.raises(UserError, match="--share-targets: cross-layer KV sharing is not "
                                        "served for 'qwen2' models"):
        parse_kinds(opts, qwen)
    assert "share" in parse_kinds(opts, SMOL)


# ---------------------------------------------------------------------------- the reference


def _layer_inputs(model, idxs):
    """Forward hooks keeping each layer's normed attention input."""
    from harp_vllm.pruning.reference import decoder_layers

    seen: dict = {}
    handles = []
    for i in idxs:
        layer = decoder_layers(model)[i]
        handles.append(layer.input_layernorm.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(("x", i), out)))
    return seen, handles


def test_shared_reference_attends_with_its_queries_over_the_targets_keys(tiny_llama):
    """Layer 3 sharing layer 1: its attention output is HF's own eager attention of layer 3's
    rotated queries over layer 1's rotated keys and values, computed here from the two
    layers' normed inputs."""
    import torch
    from transformers.models.llama.modeling_llama import (
        apply_rotary_pos_emb,
        eager_attention_forward,
    )

    from harp_vllm.pruning.reference import decoder_layers, load_model, shared

    model = load_model(tiny_llama)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    layers = decoder_layers(model)
    i, j = 3, 1
    got: dict = {}
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with shared(model, {i: j}):
            assert not hasattr(layers[i].self_attn, "k_proj")
            hook = layers[i].self_attn.register_forward_hook(
                lambda m, a, out: got.__setitem__("attn", out[0]))
            seen, handles = _layer_inputs(model, (i, j))
            out = model(input_ids=ids).logits
            for hd in (*handles, hook):
                hd.remove()
        after = model(input_ids=ids).logits
        # HF's attention of layer i, with layer j's keys and values
        a_i, a_j = layers[i].self_attn, layers[j].self_attn
        pos = torch.arange(24)[None].expand(2, -1)
        cos, sin = model.model.rotary_emb(seen["x", i], pos)

        def heads(lin, x):
            return lin(x).view(2, 24, -1, a_i.head_dim).transpose(1, 2)

        q, _ = apply_rotary_pos_emb(heads(a_i.q_proj, seen["x", i]),
                                    heads(a_i.q_proj, seen["x", i]), cos, sin)
        _, k = apply_rotary_pos_emb(q, heads(a_j.k_proj, seen["x", j]), cos, sin)
        v = heads(a_j.v_proj, seen["x", j])
        causal = torch.full((24, 24), torch.finfo(q.dtype).min).triu(1)[None, None]
        want, _ = eager_attention_forward(a_i, q, k, v, causal, scaling=a_i.scaling)
        want = a_i.o_proj(want.reshape(2, 24, -1))
    assert torch.allclose(got["attn"], want, atol=1e-5)
    assert (out - dense).abs().max() > 1e-3  # sharing changes the model
    assert torch.allclose(after, dense, atol=1e-6)  # the dense attention is back


def test_shared_reference_generates_with_a_kv_cache_like_without(tiny_llama, tmp_path):
    """A saved checkpoint with sharing (one pair windowed) loads, has no k/v weights for the
    sharing layers, computes what ``shared`` + ``windowed`` compute on the dense model, and
    generates the same tokens with HF's KV cache as without."""
    import torch
    from safetensors.torch import load_file

    from harp_vllm.pruning.jobs.checkpoint import save_pruned
    from harp_vllm.pruning.reference import load_model, shared, windowed

    spec = PruningSpec(layers={}, windows={1: 6, 3: 6}, kv_sharing={3: 1, 2: 0},
                       method="share")
    out = save_pruned(load_model(tiny_llama), spec, tiny_llama, tmp_path / "share")
    weights = load_file(out / "model.safetensors")
    for i in (2, 3):
        assert f"model.layers.{i}.self_attn.q_proj.weight" in weights
        assert not any(f"layers.{i}.self_attn.{p}_proj" in n for n in weights for p in "kv")
    model = load_model(out)
    dense = load_model(tiny_llama)
    ids = torch.randint(0, 300, (1, 14), generator=torch.Generator().manual_seed(1))
    assert sorted(out.glob("*.safetensors")) == [out / "model.safetensors"]
    with torch.no_grad():
        with windowed(dense, {1: 6}), shared(dense, {3: 1, 2: 0}), windowed(dense, {3: 6}):
            want = dense(input_ids=ids).logits
        assert torch.allclose(model(input_ids=ids).logits, want, atol=1e-5)
        cached = model.generate(ids, max_new_tokens=10, do_sample=False)
        seq = greedy_without_cache(model, ids, 10)
    assert cached.tolist() == seq.tolist()


def test_gemma3_shared_reference_normalizes_its_queries_and_the_targets_keys(tmp_path):
    """Gemma 3 (QK-norm, query_pre_attn_scalar): layer 3 sharing layer 1 attends with its own
    ``q_norm``-ed rotated queries over layer 1's ``k_norm``-ed rotated keys and its values
    (HF's eager attention, computed here from the layers' inputs); the saved checkpoint keeps
    the layer's q_proj, q_norm and o_proj only, and generates with a KV cache as without."""
    import torch
    from safetensors.torch import load_file
    from transformers.models.gemma3.modeling_gemma3 import (
        apply_rotary_pos_emb,
        eager_attention_forward,
    )

    from harp_vllm.pruning.jobs.checkpoint import save_pruned
    from harp_vllm.pruning.reference import decoder_layers, load_model, shared

    src = make_tiny_model("gemma3_text", tmp_path / "dense", layers=4)
    model = load_model(src)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    layers = decoder_layers(model)
    i, j = 3, 1
    seen: dict = {}

    def keep(m, args, kw, k):
        seen[k] = kw

    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with shared(model, {i: j}):
            assert not hasattr(layers[i].self_attn, "k_proj")
            hooks = [layers[k].self_attn.register_forward_pre_hook(
                lambda m, a, kw, k=k: keep(m, a, kw, k), with_kwargs=True) for k in (i, j)]
            got = {}
            hooks.append(layers[i].self_attn.register_forward_hook(
                lambda m, a, out: got.__setitem__("attn", out[0])))
            out = model(input_ids=ids).logits
            for h in hooks:
                h.remove()
        a_i, a_j = layers[i].self_attn, layers[j].self_attn

        def heads(lin, norm, k):
            x = seen[k]["hidden_states"]
            return norm(lin(x).view(2, 24, -1, a_i.head_dim).transpose(1, 2))

        q = heads(a_i.q_proj, a_i.q_norm, i)
        k = heads(a_j.k_proj, a_j.k_norm, j)
        v = a_j.v_proj(seen[j]["hidden_states"]).view(2, 24, -1, a_i.head_dim).transpose(1, 2)
        q, _ = apply_rotary_pos_emb(q, q, *seen[i]["position_embeddings"])
        _, k = apply_rotary_pos_emb(k, k, *seen[j]["position_embeddings"])
        causal = torch.full((24, 24), torch.finfo(q.dtype).min).triu(1)[None, None]
        want, _ = eager_attention_forward(a_i, q, k, v, causal, scaling=a_i.scaling)
        want = a_i.o_proj(want.reshape(2, 24, -1))
    assert torch.allclose(got["attn"], want, atol=1e-5)
    assert (out - dense).abs().max() > 1e-3  # sharing changes the model
    spec = PruningSpec(layers={}, kv_sharing={i: j}, method="share")
    saved = save_pruned(load_model(src), spec, src, tmp_path / "share")
    names = [n for n in load_file(saved / "model.safetensors") if f"layers.{i}.self_attn" in n]
    assert sorted(n.rsplit("self_attn.", 1)[1] for n in names) == \
        ["o_proj.weight", "q_norm.weight", "q_proj.weight"]
    pruned = load_model(saved)
    with torch.no_grad():
        assert torch.allclose(pruned(input_ids=ids).logits, out, atol=1e-5)
        cached = pruned.generate(ids[:1, :14], max_new_tokens=10, do_sample=False)
        seq = greedy_without_cache(pruned, ids[:1, :14], 10)
    assert cached.tolist() == seq.tolist()


def test_shared_reference_refuses_families_without_support():
    from harp_vllm.pruning.reference import shared

    model = SimpleNamespace(config=SimpleNamespace(model_type="gemma2", architectures=None))
    with pytest.raises(UserError, match="served for llama, mistral, gemma3_text models only, "
                                        "not 'gemma2'"), shared(model, {3: 1}):
        pass


# ---------------------------------------------------------------------------- the cost model


def test_cost_model_a_sharing_layer_stores_no_kv():
    from harp_vllm.pruning import costs

    spec = PruningSpec(layers={}, windows={2: 1024, 9: 1024},
                       kv_sharing={i: i - 1 for i in range(11, 30, 2)} | {9: 2})
    shapes = costs.model_shapes(SMOL, spec)
    assert shapes[13].shares == 12 and shapes[9].shares == 2 and shapes[9].window == 1024
    assert costs.kv_bytes(SMOL, shapes[13]) == 0 == costs.kv_bytes(SMOL, shapes[9], context=7168)
    per_token = 2 * 3 * 64 * 2
    dense = costs.dense_shape(SMOL)
    # no k/v projections; the attention core is the target kind's (the window of layer 9)
    d, h = 576, 64
    assert costs.layer_params(SMOL, shapes[13]) == costs.layer_params(SMOL, dense) - 2 * d * 3 * h
    assert costs.layer_macs(SMOL, shapes[9], 7168, "decode") - costs.layer_params(
        SMOL, shapes[9]) == 9 * h * 2 * 1024
    s = costs.summary(SMOL, shapes, context=7168)
    assert s["kv_shared_layers"] == 11
    own = [i for i in range(30) if i not in spec.kv_sharing]  # 19 layers, one windowed
    assert s["kv_bytes_per_sequence"] == per_token * (18 * 7168 + 1024)
    assert s["kv_saving"] == pytest.approx(1 - (18 + 1024 / 7168) / 30, abs=1e-6)
    assert len(own) == 19
    # as vLLM allocates it: only the 19 layers with their own cache are grouped (18 full and
    # 1 windowed: groups of 1, no padding), 56 blocks per full layer, 9 for the window
    assert s["kv_saving_served"] == pytest.approx(1 - (18 * 56 + 9) / (30 * 56), abs=1e-6)
    served = costs.served_kv_bytes_per_sequence(SMOL, shapes, 7168, 128)
    assert served == per_token * 128 * (18 * 56 + 9)
    # without windows: sharing alone also reports the served saving
    plain = costs.summary(SMOL, costs.model_shapes(SMOL, PruningSpec(layers={},
                                                                     kv_sharing={5: 4})))
    assert plain["kv_saving"] == pytest.approx(1 / 30, abs=1e-6) and plain["kv_shared_layers"] == 1
    assert plain["kv_saving_served"] == pytest.approx(1 / 30, abs=1e-6)


# ---------------------------------------------------------------------------- the fit


def test_fit_refits_q_and_o_to_the_targets_keys(tiny_llama):
    """The closed-form refit lowers the logit and attention-output errors of a sharing layer,
    its errors match what the reference model computes with the fitted weights in place, and
    fitting a layer to its own keys gives back its own q_proj."""
    import torch

    from harp_vllm.pruning.methods.share_fit import fit_shared
    from harp_vllm.pruning.reference import decoder_layers, load_model

    model = load_model(tiny_llama)
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    own = fit_shared(model, 3, 3, ids)
    assert own.logit_error["shared"] < 1e-12 and own.logit_error["fitted"] < 1e-6
    attn = decoder_layers(model)[3].self_attn
    assert torch.allclose(own.q_weight, attn.q_proj.weight, atol=1e-4)
    fit = fit_shared(model, 3, 1, ids)
    assert fit.logit_error["fitted"] < fit.logit_error["shared"]
    assert fit.output_error["q+o"] < fit.output_error["q"]
    assert fit.output_error["q+o"] < fit.output_error["shared"]
    # the same errors from the reference model's own sharing attention
    errors = _reference_errors(model, ids, {"shared": None, "q+o": fit})
    for name in ("shared", "q+o"):
        assert errors[name] == pytest.approx(fit.output_error[name], rel=1e-3)


def _reference_errors(model, ids, fits: dict) -> dict[str, float]:
    """Per name: the relative error of layer 3's attention output when it shares layer 1's
    keys and values, with that fit's q/o written in (None: the dense weights), against its
    dense output; the dense weights are back afterwards."""
    import torch

    from harp_vllm.pruning.methods.share_fit import apply_fit
    from harp_vllm.pruning.reference import decoder_layers, shared

    attn = decoder_layers(model)[3].self_attn
    got: dict = {}
    with torch.no_grad():
        hook = attn.register_forward_hook(lambda m, a, out: got.__setitem__("dense", out[0]))
        model(input_ids=ids)
        hook.remove()
        for name, weights in fits.items():
            saved = attn.q_proj.weight.clone(), attn.o_proj.weight.clone()
            if weights is not None:
                apply_fit(model, 3, weights)
            with shared(model, {3: 1}):
                # the layers before 3 are dense, so layer 3's input is the dense model's
                h = decoder_layers(model)[3].self_attn.register_forward_hook(
                    lambda m, a, out, name=name: got.__setitem__(name, out[0]))
                model(input_ids=ids)
                h.remove()
            attn.q_proj.weight.copy_(saved[0])
            attn.o_proj.weight.copy_(saved[1])
    return {name: float((got[name] - got["dense"]).norm() / got["dense"].norm())
            for name in fits}


def test_serving_metrics_count_a_sharing_layer_as_holding_no_kv():
    from harp_vllm.serving.metrics import kv_layout

    cfg = {"architectures": ["HarpLlamaForCausalLM"],
           "harp_pruning": {"version": 4, "method": "share", "layers": {"0": 0.0},
                            "kv_sharing": {"3": 1, "5": 1}}}
    layout = kv_layout("m", cfg, total_layers=6, num_kv_heads=2, head_size=32, dtype_bytes=2)
    assert layout.bytes_per_token == 3 * 2 * 2 * 32 * 2  # layers 1, 2, 4 hold KV
    assert layout.dense_bytes_per_token == 6 * 2 * 2 * 32 * 2


def test_pipeline_stages_must_keep_a_sharing_layer_with_its_target(monkeypatch):
    from harp_vllm.vllm_plugin.checkpoint_spec import (
        HarpCheckpointError,
        check_pipeline_parallel,
    )

    monkeypatch.delenv("VLLM_PP_LAYER_PARTITION", raising=False)
    cfg = SimpleNamespace(num_hidden_layers=6)
    spec = PruningSpec(layers={}, kv_sharing={1: 0, 5: 3})
    check_pipeline_parallel(cfg, spec, 1)
    check_pipeline_parallel(cfg, spec, 2)  # stages 0..2 and 3..5
    with pytest.raises(HarpCheckpointError, match=r"puts layer 5 \(stage 2\) and the layer "
                       r"whose KV cache it shares, 3 \(stage 1\), on different stages \(layers "
                       r"per stage: 0\.\.1, 2\.\.3, 4\.\.5\)"):
        check_pipeline_parallel(cfg, spec, 3)


# ---------------------------------------------------------------------------- plan --layout


def test_share_choices_parse_and_are_checked():
    from harp_vllm.pruning.planner.choices import Choice, parse_layout
    from harp_vllm.pruning.planner.layouts import layout_text

    cfg = SimpleNamespace(**{**vars(SMOL)})
    layout = parse_layout("3:share1,5:share1,2:win256", cfg)
    assert layout[3] == Choice("share", target=1) and layout[5].name == "share1"
    assert layout[3].shape(cfg).shares == 1 and layout[3].shape(cfg).kv_heads == 3
    assert parse_layout(layout_text(layout), cfg) == layout
    for text, message in [("1:share3", "shares the KV cache of an earlier layer (0..0)"),
                          ("1:remove,3:share1", "layer 1 is remove; a sharing target keeps"),
                          ("2:share1,3:share2", "layer 2 is share1"),
                          ("1:win256,3:share1", "layer 1 is win256")]:
        with pytest.raises(UserError, match=_escape(message)):
            parse_layout(text, cfg)


def test_plan_layout_with_sharing_refits_and_writes_a_checkpoint(tiny_llama, tmp_path,
                                                                  monkeypatch):
    """``plan --layout 3:share1,2:linearfull``: the checkpoint's section shares, plan.json
    reports the refit's errors and the KV saving, and the reloaded checkpoint computes what
    the planner measured (the refitted q/o over layer 1's keys and values)."""
    import json

    import torch
    from test_plan import _calib, _logits_equal_reference, runner

    from harp_vllm.cli import app

    monkeypatch.setenv("HARP_VLLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "plan"
    layout = "2:linearfull,3:share1"
    res = runner.invoke(app, [
        "plan", str(tiny_llama), "--calib-file", str(_calib(tmp_path)), "--calib-samples",
        "16", "--calib-seq-len", "32", "--positions", "16", "--ranks", "16,full",
        "--eval-windows", "0", "--layout", layout, "--out", str(out)])
    assert res.exit_code == 0, res.output
    section = json.loads((out / "config.json").read_text())["harp_pruning"]
    assert section["version"] == 4 and section["kv_sharing"] == {"3": 1}
    plan = json.loads((out / "plan.json").read_text())
    assert plan["costs"]["kv_shared_layers"] == 1
    assert plan["costs"]["kv_saving"] == pytest.approx(0.5)  # layers 2 and 3 of 4
    fit = plan["share_fit"]["3"]
    assert fit["logit_error"]["fitted"] < fit["logit_error"]["shared"]
    assert fit["output_error"]["q+o"] < fit["output_error"]["shared"]
    assert torch.isfinite(torch.tensor(plan["measured_kl"]))
    _logits_equal_reference(out, tiny_llama, layout)


# ---------------------------------------------------------------------------- the planner


def test_solver_offers_sharing_only_beside_a_kept_target_and_is_exact():
    """``shareJ`` candidates in the MILP: each layer is offered its nearest targets only,
    a target is kept whole (no chain, no shared target that is itself changed), and the
    solve equals a brute force under those rules. A sharing choice cheaper than every
    other one does not rule them out: where its target cannot be kept, the layer still
    takes the next best."""
    import itertools

    import numpy as np

    from harp_vllm.pruning import costs
    from harp_vllm.pruning.planner.choices import (
        KEEP,
        candidates,
        share_targets,
        unoffered_shares,
    )
    from harp_vllm.pruning.planner.solve import Budget, solve_layouts

    cfg = SimpleNamespace(**{**vars(SMOL), "num_hidden_layers": 5})
    choices = candidates(cfg, [None], ("linear", "remove", "share"), shares=2)
    assert [c.name for c in choices if c.kind == "share"] == [f"share{t}" for t in range(4)]
    assert share_targets(cfg, 4, 2) == [3, 2] and share_targets(cfg, 0, 2) == []
    unoffered = unoffered_shares(cfg, choices, 2)
    assert (4, "share1") in unoffered and (4, "share2") not in unoffered
    assert (1, "share1") in unoffered and (1, "share0") not in unoffered

    def valid(combo) -> bool:
        return all((j, c.name) not in unoffered and (c.kind != "share" or combo[c.target] == KEEP)
                   for j, c in enumerate(combo))

    kv = {c: costs.kv_bytes(cfg, c.shape(cfg)) for c in choices}
    allowed = [(combo, sum(kv[c] for c in combo))
               for combo in itertools.product(choices, repeat=5) if valid(combo)]

    def brute(damage, saving):
        limit = (1 - saving) * kv[KEEP] * 5
        return min(sum(0.0 if c == KEEP else damage[j][c.name] for j, c in enumerate(combo))
                   for combo, bytes_ in allowed if bytes_ <= limit + 1e-6)

    rng = np.random.default_rng(1)
    for trial in range(3):
        # sharing cheapest everywhere it is offered: the rules alone stop it
        damage = {j: {c.name: float(rng.uniform(0.001, 0.01) if c.kind == "share"
                                    else rng.uniform(0.05, 1.0))
                      for c in choices if c != KEEP and (j, c.name) not in unoffered}
                  for j in range(5)}
        for saving in (0.2, 0.4, 0.6, 0.8):
            found = solve_layouts(cfg, damage, choices, Budget(saving), count=3,
                                  forbidden=unoffered)
            assert found[0][1] == pytest.approx(brute(damage, saving), abs=1e-9), (trial, saving)
            for layout, _ in found:
                assert valid([layout.get(j, KEEP) for j in range(5)]), layout
    # at 80% of 5 layers one layer keeps its KV cache, and only its next two may share it:
    # the other two take a map or removal, though sharing is cheaper everywhere
    layout = found[0][0]
    assert sum(c.kind == "share" for c in layout.values()) <= 2
    assert any(c.kind in ("linear", "remove") for c in layout.values())


def test_plan_offers_sharing_fits_only_offered_pairs_and_writes_a_valid_layout(
        tiny_llama, tmp_path, monkeypatch):
    """``plan --candidates share --share-targets 1 --kv-saving 0.5`` on a 4-layer model: each
    layer is offered only the layer before it, every offered pair is refitted and scored
    (and no other), and the one layout that saves half with a kept target under each sharer,
    no chain, is ``1:share0,3:share2``; its checkpoint reloads to what the planner
    measured."""
    import json

    import torch
    from test_plan import _calib, _logits_equal_reference, runner

    from harp_vllm.cli import app

    monkeypatch.setenv("HARP_VLLM_CACHE", str(tmp_path / "cache"))
    calib = _calib(tmp_path)
    out = tmp_path / "plan"
    res = runner.invoke(app, [
        "plan", str(tiny_llama), "--calib-file", str(calib), "--calib-samples", "16",
        "--calib-seq-len", "32", "--positions", "16", "--eval-windows", "0",
        "--candidates", "share", "--share-targets", "1", "--kv-saving", "0.5",
        "--out", str(out)])
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["layout"] == "1:share0,3:share2"
    assert plan["settings"]["share_targets"] == {"0": [], "1": [0], "2": [1], "3": [2]}
    assert set(plan["share_fit"]) == {"1", "3"}
    section = json.loads((out / "config.json").read_text())["harp_pruning"]
    assert section["kv_sharing"] == {"1": 0, "3": 2}
    _logits_equal_reference(out, tiny_llama, plan["layout"])
    stats, = (torch.load(f, weights_only=False)
              for f in (tmp_path / "cache" / "plan-stats").glob("*.pt"))
    assert sorted(stats["extra"]["share_fits"]) == ["1:0", "2:1", "3:2"]
    assert {j: sorted(v) for j, v in stats["damage"].items()} == {
        1: ["share0"], 2: ["share1"], 3: ["share2"]}
    bad = runner.invoke(app, [
        "plan", str(tiny_llama), "--calib-file", str(calib), "--candidates", "share",
        "--share-targets", "0", "--kv-saving", "0.5", "--out", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "--share-targets must be >= 1" in bad.output
    assert not (tmp_path / "bad").exists()
    both = runner.invoke(app, [
        "plan", str(tiny_llama), "--calib-file", str(calib), "--layout", "3:share2",
        "--share-targets", "1", "--out", str(tmp_path / "bad")])
    assert both.exit_code != 0 and "a --layout names its sharing layers" in both.output
    assert not (tmp_path / "bad").exists()


def test_fit_with_qk_norm_refits_o_only_and_its_errors_are_the_references(tmp_path):
    """Gemma 3 (QK-norm): the closed-form refit keeps q_proj, fits o_proj, lowers the
    attention-output error of the sharing layer, and the errors it reports are what the
    reference model's sharing attention gives before and after the fitted o_proj is written
    in; Adam steps of local reconstruction on q and o lower it further."""
    import torch

    from harp_vllm.pruning.methods.share_fit import fit_shared
    from harp_vllm.pruning.reference import decoder_layers, load_model

    model = load_model(make_tiny_model("gemma3_text", tmp_path / "dense", layers=4))
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    attn = decoder_layers(model)[3].self_attn
    fit = fit_shared(model, 3, 1, ids)
    assert torch.equal(fit.q_weight, attn.q_proj.weight)
    assert fit.output_error["o"] < 0.8 * fit.output_error["shared"]
    saved = attn.o_proj.weight.clone()
    errors = _reference_errors(model, ids, {"shared": None, "o": fit})
    for name in ("shared", "o"):
        assert errors[name] == pytest.approx(fit.output_error[name], rel=1e-3)
    # local reconstruction steps on q and o lower the error further; the model is unchanged
    q0 = attn.q_proj.weight.clone()
    steps = fit_shared(model, 3, 1, ids, local_steps=30, lr=3e-3)
    assert steps.output_error["q+o"] < 0.8 * steps.output_error["o"]
    assert not torch.equal(steps.q_weight, q0) and torch.equal(attn.q_proj.weight, q0)
    assert torch.equal(attn.o_proj.weight, saved)
