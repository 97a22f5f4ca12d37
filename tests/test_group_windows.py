"""A window on some KV groups of a layer, the others kept whole (issue 24's "per KV group",
DuoAttention's retrieval and streaming heads): the pruning section's ``group_windows``
(version 6), the HF reference's per-head mask, the cost model's two parts, the planner's
``winWkG`` candidates, and the refusals. vLLM serving them is checked beside the whole-layer
windows (test_vllm_plugin's tiny and SmolLM2 window tests)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from test_plan import _calib
from test_windows import SMOL, generates_like_without_cache
from typer.testing import CliRunner

from harp_vllm.cli import app
from harp_vllm.errors import UserError
from harp_vllm.pruning import costs
from harp_vllm.pruning.planner.choices import Choice, candidates, parse_layout
from harp_vllm.pruning.reference import WindowedAttention, decoder_layers, load_model, windowed
from harp_vllm.pruning.reference.sliding_windows import group_window_mask, window_mask
from harp_vllm.spec import PruningSpec

runner = CliRunner()
GW = {"window": 16, "full_groups": [1]}


# ---------------------------------------------------------------------------- the spec


def test_group_windows_round_trip_and_version():
    spec = PruningSpec(layers={0: 0.0}, windows={1: 64},
                       group_windows={2: {"window": 32, "full_groups": [1]},
                                      4: {"window": 64, "full_groups": [2, 0]}})
    d = spec.to_dict()
    assert d["version"] == 6
    assert d["group_windows"] == {"2": {"window": 32, "full_groups": [1]},
                                  "4": {"window": 64, "full_groups": [0, 2]}}
    back = PruningSpec.from_dict(json.loads(json.dumps(d)), num_layers=6)
    assert back.group_windows == {2: {"window": 32, "full_groups": [1]},
                                  4: {"window": 64, "full_groups": [0, 2]}}
    assert PruningSpec(layers={}, windows={1: 64}).to_dict()["version"] == 3  # unchanged


def _section(**extra) -> dict:
    return {"version": 6, "layers": {}, **extra}


@pytest.mark.parametrize("section, message", [
    ({**_section(group_windows={"1": GW}), "version": 5}, "needs 'harp_pruning.version' 6"),
    (_section(group_windows={"1": {"window": 16}}), "exactly 'window' and 'full_groups'"),
    (_section(group_windows={"1": {"window": 0, "full_groups": [1]}}), "positive number"),
    (_section(group_windows={"1": {"window": 16, "full_groups": []}}), "non-empty list"),
    (_section(group_windows={"1": {"window": 16, "full_groups": [1, 1]}}), "distinct"),
    (_section(group_windows={"1": GW}, windows={"1": 16}), "and in 'harp_pruning.windows'"),
    (_section(group_windows={"1": GW}, layers={"1": 0.5}), "and in 'harp_pruning.layers'"),
    (_section(group_windows={"1": GW}, kv_sharing={"3": 1}),
     r"kv_sharing \(as a target\)"),
    (_section(group_windows={"3": GW}, kv_sharing={"3": 1}), "and in 'harp_pruning.kv_sharing'"),
    (_section(group_windows={"9": GW}), "out of range"),
])
def test_bad_group_windows_are_refused(section, message):
    with pytest.raises(UserError, match=message):
        PruningSpec.from_dict(section, num_layers=6)


def test_group_windows_are_checked_against_the_models_groups_and_context():
    cfg = {"num_hidden_layers": 6, "num_key_value_heads": 2, "num_attention_heads": 4,
           "max_position_embeddings": 512}

    def load(gw: dict):
        return PruningSpec.from_config({**cfg, "harp_pruning": _section(group_windows=gw)})

    assert load({"1": GW}).group_windows[1]["full_groups"] == [1]
    with pytest.raises(UserError, match=r"full_groups is \[2\], but layer 1 has 2 KV groups"):
        load({"1": {"window": 16, "full_groups": [2]}})
    with pytest.raises(UserError, match="none: use 'windows'"):  # all kept: nothing windowed
        load({"1": {"window": 16, "full_groups": [0, 1]}})
    with pytest.raises(UserError, match=r"group_windows\[1\]' is 512 tokens, not smaller"):
        load({"1": {"window": 512, "full_groups": [0]}})


def test_tensor_parallel_and_other_families_are_refused():
    from harp_vllm.families import FAMILIES
    from harp_vllm.vllm_plugin.checkpoint_spec import HarpCheckpointError, check_tensor_parallel

    cfg = SimpleNamespace(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=256)
    spec = PruningSpec(layers={}, group_windows={1: GW})
    check_tensor_parallel(cfg, spec, 1)
    with pytest.raises(HarpCheckpointError, match=r"windowed per KV group \(\[1\], "
                       r"'group_windows'\) are not served with tensor parallelism"):
        check_tensor_parallel(cfg, spec, 2)
    assert [f.hf_architecture for f in FAMILIES if f.group_windows] == [
        "LlamaForCausalLM", "MistralForCausalLM"]
    gemma = SimpleNamespace(**{**vars(SMOL), "model_type": "gemma3_text",
                               "num_key_value_heads": 1})
    with pytest.raises(UserError, match="single KV head per layer: no KV group to keep"):
        parse_layout("2:win512k0", gemma)


# ---------------------------------------------------------------------------- the reference


def test_group_window_mask_matches_the_definition():
    m = group_window_mask(3, (1,), heads=6, kv_heads=3, q_len=5, k_len=8, dtype=torch.float32)
    assert m.shape == (1, 6, 5, 8)
    win, full = window_mask(3, 5, 8, torch.float32)[0, 0], window_mask(8, 5, 8, torch.float32)[
        0, 0]
    for h in range(6):  # group 1 = query heads 2 and 3 see every earlier key
        assert torch.equal(m[0, h], full if h in (2, 3) else win)


def _o_proj_inputs(model, idx: int, ids: torch.Tensor) -> torch.Tensor:
    got = []
    attn = decoder_layers(model)[idx].self_attn
    attn = getattr(attn, "attn", attn)  # the planner's stand-in wraps the module
    h = attn.o_proj.register_forward_pre_hook(
        lambda m, a: got.append(a[0].detach().clone()))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    return got[0]


def test_group_windowed_heads_are_the_dense_ones_and_the_windowed_ones(tiny_llama, tmp_path):
    """Layer 2 of the tiny Llama (2 KV groups of 2 query heads) windowed to 16 tokens but in
    group 1: the kept group's heads compute exactly the dense layer's, the other group's
    exactly the whole-layer window's, on 60 tokens (the rest of the model unchanged)."""
    from harp_vllm.pruning.jobs.checkpoint import save_pruned

    spec = PruningSpec(layers={}, group_windows={2: GW})
    model = load_model(save_pruned(load_model(tiny_llama), spec, tiny_llama, tmp_path / "gw"))
    dense = load_model(tiny_llama)
    ids = torch.randint(3, 250, (1, 60), generator=torch.Generator().manual_seed(0))
    got = _o_proj_inputs(model, 2, ids)
    full = _o_proj_inputs(dense, 2, ids)
    with windowed(dense, {2: 16}):
        win = _o_proj_inputs(dense, 2, ids)
    width = full.shape[-1] // 2  # group 0: heads 0-1, group 1: heads 2-3
    assert torch.allclose(got[..., width:], full[..., width:], atol=1e-6)
    assert torch.allclose(got[..., :width], win[..., :width], atol=1e-6)
    assert not torch.allclose(win[..., :width], full[..., :width], atol=1e-3)  # 60 > 16
    # the planner's stand-in computes the same as the checkpoint's hook
    layers = decoder_layers(dense)
    attn = layers[2].self_attn
    layers[2].self_attn = WindowedAttention(attn, 16, (1,))
    try:
        again = _o_proj_inputs(dense, 2, ids)
    finally:
        layers[2].self_attn = attn
    assert torch.allclose(again, got, atol=1e-6)


def test_group_windowed_reference_generates_with_a_kv_cache_like_without(tiny_llama, tmp_path):
    spec = PruningSpec(layers={}, group_windows={0: {"window": 5, "full_groups": [0]},
                                                 3: {"window": 9, "full_groups": [1]}})
    generates_like_without_cache(tiny_llama, tmp_path, spec)


# ---------------------------------------------------------------------------- the cost model


def test_cost_model_counts_the_kept_groups_whole_and_the_others_windowed():
    gw = costs.LayerShape("dense", 9, 3, None, 1536, window=1024, whole_kv_heads=1)
    head = 2 * 64 * 2  # K and V of one KV head, one token
    assert gw.parts() == [(3, 1, None), (6, 2, 1024)]
    assert costs.kv_bytes(SMOL, gw) == 3 * head
    assert costs.kv_bytes(SMOL, gw, context=7168) == pytest.approx(
        head * (7168 + 2 * 1024) / 7168)
    # decode: 3 query heads over the whole context, 6 over the window
    base = costs.layer_params(SMOL, gw)
    assert costs.layer_macs(SMOL, gw, 7168, "decode") == base + 64 * 2 * (3 * 7168 + 6 * 1024)
    spec = PruningSpec(layers={}, group_windows={4: {"window": 1024, "full_groups": [2]}})
    assert costs.model_shapes(SMOL, spec)[4] == gw
    # as vLLM serves it: one-head caches whose blocks hold 3 x 128 tokens (the page of a
    # 3-head layer), a window holding at most cdiv(W - 1, block) + 1 blocks
    dense = costs.dense_shape(SMOL)
    n, page = 7168, 3 * head * 128
    served = costs.served_kv_bytes_per_sequence(SMOL, [gw] * 10 + [dense] * 20, n, 128)
    # 20 full 3-head layers (56 blocks), 10 full one-head caches (cdiv(7168, 384) = 19
    # blocks), 20 windowed ones (cdiv(1023, 384) + 1 = 4); groups of 10: no padding
    assert served == (20 * 56 + 10 * 19 + 20 * 4) * page
    ideal = costs.kv_bytes_per_sequence(SMOL, [gw] * 10 + [dense] * 20, n, block_size=128)
    assert ideal == (20 * 3 * 56 * 128 + 10 * (19 * 384 + 2 * 4 * 384)) * head


def test_served_model_matches_what_vllm_built_for_a_tiny_mixture():
    """The KV groups vLLM 0.32 built for test_vllm_plugin's tiny windows test (8 layers of
    2 KV heads; whole windows, group windows, sharing): its ``kv_groups`` as recorded there,
    30 blocks of one page per 512-token sequence, which the model reproduces."""
    tiny = SimpleNamespace(**{**vars(SMOL), "num_attention_heads": 4, "num_key_value_heads": 2,
                              "head_dim": 32, "hidden_size": 128, "num_hidden_layers": 8})
    spec = PruningSpec(layers={}, windows={1: 16},
                       group_windows={2: {"window": 16, "full_groups": [1]},
                                      4: {"window": 40, "full_groups": [0]}})
    shapes = costs.model_shapes(tiny, spec)
    page = 2 * 2 * 32 * 2 * 128
    assert costs.served_kv_bytes_per_sequence(tiny, shapes, 512, 128) == 30 * page


# ---------------------------------------------------------------------------- the planner


def test_group_window_choices_parse_and_price():
    layout = parse_layout("3:win1024k2,4:win512k0k2,5:win512", SMOL)
    assert layout[3] == Choice("window", window=1024, full_groups=(2,))
    assert layout[4].name == "win512k0k2" and layout[5].name == "win512"
    assert layout[3].shape(SMOL).parts() == [(3, 1, None), (6, 2, 1024)]
    for bad, message in (("3:win512k3", "3 KV groups"), ("3:win512k0k1k2", "3 KV groups"),
                         ("3:win512k1k1", "each once"), ("3:win512kx", "unknown layer choice")):
        with pytest.raises(UserError, match=message):
            parse_layout(bad, SMOL)
    names = [c.name for c in candidates(SMOL, [None], ("window", "group-window"), (256,))]
    assert names == ["keep", "win256", "win256k0", "win256k1", "win256k2"]
    names = [c.name for c in candidates(SMOL, [None], ("window", "group-window"), (256, 512),
                                        group_sizes=(2048,))]
    assert names == ["keep", "win256", "win512", "win2048k0", "win2048k1", "win2048k2"]


def test_plan_offers_group_windows_and_writes_a_checkpoint_that_computes_the_plan(
        tiny_llama, tmp_path, monkeypatch):
    """A tiny plan offered only windows that keep one KV group whole: the checkpoint's
    layers are windowed per group (version 6), the saving is counted at the context with
    the kept groups whole, and the reloaded checkpoint computes what the planner scored."""
    monkeypatch.setenv("HARP_VLLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "plan"
    common = ["plan", str(tiny_llama), "--calib-file", str(_calib(tmp_path)), "--calib-samples",
              "8", "--calib-seq-len", "32", "--positions", "16", "--eval-windows", "0",
              "--long-positions", "64", "--long-seq-len", "256", "--context", "2048"]
    res = runner.invoke(app, [*common, "--top-k", "2", "--candidates", "group-window",
                              "--group-windows", "16,48", "--kv-saving", "0.25", "--out",
                              str(out)])
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    section = json.loads((out / "config.json").read_text())["harp_pruning"]
    assert section["version"] == 6 and section["group_windows"] and "windows" not in section
    assert all(len(g["full_groups"]) == 1 and g["window"] in (16, 48)
               for g in section["group_windows"].values())
    assert plan["costs"]["kv_saving_served"] >= 0.25
    reloaded = load_model(out)
    dense = load_model(tiny_llama)
    layers = decoder_layers(dense)
    for k, g in section["group_windows"].items():
        layers[int(k)].self_attn = WindowedAttention(layers[int(k)].self_attn, g["window"],
                                                     tuple(g["full_groups"]))
    ids = torch.randint(0, 300, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, dense(input_ids=ids).logits,
                              atol=1e-5)
    for args, message in ((["--group-windows", "16,x", "--kv-saving", "0.2"],
                           "--group-windows must be a comma list of token counts"),
                          (["--group-windows", "16", "--layout", "1:win16k0"],
                           "with --layout name them in the layout"),
                          (["--candidates", "linear", "--windows", "16", "--kv-saving", "0.2"],
                           "--windows is given but --candidates 'linear' offers no window"),
                          (["--candidates", "window", "--windows", "16", "--group-windows",
                            "16", "--kv-saving", "0.2"], "offers no group-window candidate"),
                          (["--candidates", "window", "--windows", "16", "--share-targets", "1",
                            "--kv-saving", "0.2"], "offers no share candidate")):
        res = runner.invoke(app, [*common, *args, "--out", str(tmp_path / "bad")])
        assert res.exit_code != 0 and message in res.output, res.output
        assert not (tmp_path / "bad").exists()
