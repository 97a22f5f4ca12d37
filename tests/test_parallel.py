"""Tensor and pipeline parallel on vLLM's CPU backend (issue 15): real multi-rank engines.

vLLM's CPU platform runs TP/PP as one worker process per rank on this machine (``mp``
executor, shared-memory collectives); ``VLLM_CPU_OMP_THREADS_BIND="0|1"`` gives each rank one
of the two cores. Every parallel engine is compared with the single-rank engine on the same
checkpoint: identical greedy tokens (32 per prompt) and prompt logprobs within 1e-4. Each
engine starts once per session (conftest's ``engines``) and its JSON result (with what every
rank holds: its layers and the KV-cache spec of each attention layer it registered) is shared
between the tests; the single-rank runs of ``tiny_checkpoints`` are the ones
test_vllm_plugin.py checks against the reference (``tiny_pp``, the PP checkpoint, is HARP-pruned
as the ``harp`` one is).

PP on vLLM 0.32's CPU backend in eager mode needs the plugin's workaround for a vLLM bug (a
later stage's input buffer is never allocated; see ``harp_vllm/vllm_plugin/pp_buffers.py``):
without it stage 1 fails with ``assert self.intermediate_tensors is not None`` (dense too).

Select with ``pytest -m parallel``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TINY_PROMPTS, save
from probe import run_engine
from test_vllm_plugin import max_logprob_diff

TOL = 1e-4  # prompt logprobs, parallel vs single rank (fp32)


def assert_same_as_single_rank(par: tuple[dict, str], single: tuple[dict, str],
                               n_prompts: int) -> float:
    """Identical greedy tokens, prompt logprobs within TOL; returns the largest difference."""
    (p, plog), (s, slog) = par, single
    assert s["ok"], s.get("error", "") + slog[-3000:]
    assert p["ok"], p.get("error", "") + plog[-3000:]
    assert len(p["results"]) == len(s["results"]) == n_prompts >= 3
    worst = 0.0
    for got, want in zip(p["results"], s["results"], strict=True):
        assert len(got["token_ids"]) == 32
        assert got["token_ids"] == want["token_ids"]
        worst = max(worst, max_logprob_diff(got["prompt_logprobs"], want["prompt_logprobs"]))
    assert worst < TOL, worst
    return worst


def rank_blocks(rank: dict) -> int:
    """KV-cache blocks this rank's own attention layers fit in its VLLM_CPU_KVCACHE_SPACE."""
    per_block = sum(s["page_size_bytes"] for s in rank["kv_cache_spec"].values())
    return rank["kv_cache_memory_bytes"] // per_block


def spec_heads(rank: dict) -> dict[int, int]:
    """{layer index: KV heads on this rank} of the attention layers with a KV cache."""
    return {int(name.split(".")[2]): s["num_kv_heads"]
            for name, s in rank["kv_cache_spec"].items()}


# ---------------------------------------------------------------------------- fast checks


def test_tp_split_check_names_the_layer_and_its_counts():
    """The plugin's up-front check (vLLM itself checks only the config's head count)."""
    from harp_vllm.spec import PruningSpec
    from harp_vllm.vllm_plugin.checkpoint_spec import HarpCheckpointError, check_tensor_parallel

    cfg = SimpleNamespace(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=256)
    shapes = {"num_attention_heads": [4, 2, 4], "num_key_value_heads": [2, 1, 2],
              "intermediate_size": [256, 192, 193]}
    spec = PruningSpec(layers={}, method="flap", shapes=shapes)
    check_tensor_parallel(cfg, spec, 1)
    with pytest.raises(HarpCheckpointError, match=r"cannot split layer 2 .*4 query heads, 2 KV "
                       r"heads, MLP width 193.*intermediate_size 193"):
        check_tensor_parallel(cfg, spec, 2)
    shapes["intermediate_size"][2] = 192
    check_tensor_parallel(cfg, spec, 2)  # a 1-KV-head layer is replicated: fine
    with pytest.raises(HarpCheckpointError, match=r"layer 1 .*2 query heads, 1 KV heads.*"
                       r"divisible by the tensor parallel size \(4\)"):
        check_tensor_parallel(cfg, spec, 4)
    smol = SimpleNamespace(num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3,
                           intermediate_size=1536)
    harp = PruningSpec(layers={1: 0.0})  # alpha = 0: layer 1 has no attention to split
    with pytest.raises(HarpCheckpointError, match=r"layer 0 .*9 query heads, 3 KV heads"):
        check_tensor_parallel(smol, harp, 2)
    sinks = PruningSpec(layers={}, windows={1: 16}, sinks=[1])  # the split is not served yet
    check_tensor_parallel(cfg, sinks, 1)
    with pytest.raises(HarpCheckpointError, match=r"sink logits of layers \[1\] are not "
                       r"served with tensor parallelism"):
        check_tensor_parallel(cfg, sinks, 2)


# ---------------------------------------------------------------------------- TP = 2 (tiny)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoints, tiny_engines) -> dict[str, Path]:
    """conftest's tiny Llama (4 query / 2 KV heads, head_dim 32, 6 layers): HARP-pruned at
    {0: 0.7, 2: 0.0, 4: 0.4, 5: 1.0}, FLAP-cut (heads only, and heads and MLP) into 1- and
    2-KV-head layers, and with linear maps of both ranks and inputs beside HARP layers; their
    single-rank runs done (``tiny_engines``: in one probe process)."""
    return tiny_checkpoints


def parallel(fn):
    """An engine test: marked vllm and parallel, with room for engine starts."""
    return pytest.mark.vllm(pytest.mark.parallel(pytest.mark.timeout(1500)(fn)))


@parallel
@pytest.mark.parametrize("name", ["flap", "linear"])
def test_tp2_matches_single_rank(name, tiny, engines):
    """TP = 2 engines of the FLAP checkpoint (KV groups of 1 and 2 heads) and of the linear
    one (maps of both ranks and inputs, a HARP token-local layer and a removed sublayer);
    the HARP-only checkpoint adds no layer kind to these two, so it gets no TP engine."""
    single = engines(tiny[name], TINY_PROMPTS)
    par = engines(tiny[name], TINY_PROMPTS, tp=2)
    worst = assert_same_as_single_rank(par, single, len(TINY_PROMPTS))
    print(f"{name}: TP=2 vs TP=1 max |d prompt logprob| = {worst:.2e}")
    p = par[0]
    assert p["architectures"] == ["HarpLlamaForCausalLM"]
    assert [(r["tp_rank"], r["pp_rank"]) for r in p["ranks"]] == [(0, 0), (1, 0)]


@parallel
def test_tp2_builds_token_local_and_removed_layers_on_both_ranks_without_kv(tiny, engines):
    """The linear checkpoint under TP=2: both ranks build every layer as the single rank does
    (maps in 0, 2, 4, 5, HARP's token-local path at alpha 0.5 in 1, nothing in 3) and
    register no KV cache for any of them."""
    single, par = engines(tiny["linear"], TINY_PROMPTS)[0], engines(tiny["linear"],
                                                                    TINY_PROMPTS, tp=2)[0]
    assert par["ok"] and single["ok"]
    (one,) = single["ranks"]
    kinds = one["attention_modules"]
    assert (kinds["1"], kinds["3"]) == ("FoldedTokenLocalAttention", "RemovedAttention")
    assert "LlamaAttention" not in {kinds[i] for i in "0245"}, kinds
    assert spec_heads(one) == {}
    for rank in par["ranks"]:
        assert rank["attention_modules"] == kinds
        assert spec_heads(rank) == {}


@parallel
def test_tp2_serves_windows_and_sharing_as_one_rank_does(tiny, engines, tmp_path_factory):
    """Issue 24's layer kinds under TP = 2 (sink logits are refused there, above): windowed
    layers of 16 and 40 tokens and a layer sharing an earlier layer's KV cache give one
    rank's greedy tokens and prompt logprobs on prompts longer than every window; each rank
    holds half of every own cache's KV heads, with the layer's window, and none for the
    sharing layer."""
    import torch
    from test_vllm_plugin import _windowed

    ckpt = _windowed(tiny["dense"], tmp_path_factory.mktemp("tp2-win") / "win",
                     {1: 16, 3: 40}, kv_sharing={4: 2})
    g = torch.Generator().manual_seed(1)
    prompts = [*TINY_PROMPTS[:2], torch.randint(3, 250, (100,), generator=g).tolist(),
               [40] * 30 + torch.randint(3, 250, (90,), generator=g).tolist()]
    single, par = engines(ckpt, prompts), engines(ckpt, prompts, tp=2)
    worst = assert_same_as_single_rank(par, single, len(prompts))
    print(f"windows and sharing: TP=2 vs TP=1 max |d prompt logprob| = {worst:.2e}")
    for rank in par[0]["ranks"]:
        assert spec_heads(rank) == {0: 1, 1: 1, 2: 1, 3: 1, 5: 1}  # 4 shares 2's cache
        assert {int(name.split(".")[2]): s["sliding_window"]
                for name, s in rank["kv_cache_spec"].items()} == {
            0: None, 1: 16, 2: None, 3: 40, 5: None}


@parallel
def test_tp2_flap_replicates_one_kv_head_layers(tiny, engines):
    """FLAP layers keep 1 or 2 KV heads: a 2-head layer is split (1 per rank), a 1-head layer
    is replicated on both ranks, and the capacity follows from what each rank holds."""
    shapes = json.loads((tiny["flap"] / "config.json").read_text())["harp_pruning"]["shapes"]
    kv = shapes["num_key_value_heads"]
    assert 1 in kv and 2 in kv and set(shapes["intermediate_size"]) == {256}
    single, par = engines(tiny["flap"], TINY_PROMPTS)[0], engines(tiny["flap"], TINY_PROMPTS,
                                                                  tp=2)[0]
    assert par["ok"] and single["ok"]
    assert spec_heads(single["ranks"][0]) == dict(enumerate(kv))
    for rank in par["ranks"]:
        assert spec_heads(rank) == {i: max(1, n // 2) for i, n in enumerate(kv)}
        assert rank["num_blocks"] == rank_blocks(rank) == par["num_gpu_blocks"]
    ratio = par["kv_cache_tokens"] / single["kv_cache_tokens"]
    assert ratio == pytest.approx(sum(kv) / len(kv), rel=0.01)  # 1 head per layer per rank


@parallel
def test_tp2_refuses_an_mlp_width_it_cannot_split(tiny, tmp_path):
    """FLAP with MLP pruning leaves odd MLP widths: TP=2 fails with the layer named, raised by
    the plugin's config check in the process that builds the engine (the error LLM() raises
    is the plugin's own, not vLLM's "engine core initialization failed"), before any worker
    starts."""
    widths = json.loads((tiny["flap_mlp"] / "config.json").read_text())["harp_pruning"][
        "shapes"]["intermediate_size"]
    odd = next(i for i, w in enumerate(widths) if w % 2)
    result, log = run_engine(tiny["flap_mlp"], tmp_path, [[5, 6, 7]], tp=2, timeout=900)
    assert not result["ok"]
    error = result["error"]
    assert error.startswith("HarpCheckpointError: "), error + log[-3000:]
    assert (f"tensor parallel size 2 cannot split layer {odd} of this checkpoint" in error
            and f"intermediate_size {widths[odd]}" in error), error
    assert "(EngineCore" not in log and "(Worker" not in log, log[-3000:]


# ---------------------------------------------------------------------------- SmolLM2


@parallel
@pytest.mark.real_model
def test_tp2_on_smollm2_fails_naming_its_head_counts(smollm2_harp8, tmp_path):
    """SmolLM2 has 9 query heads (3 KV heads): TP=2 cannot split them. The plugin's config
    check says so (naming the first layer and its counts) before vLLM's own check of the
    config's head count, and before any worker starts."""
    result, log = run_engine(smollm2_harp8, tmp_path, [[5, 6, 7]], tp=2, timeout=600)
    assert not result["ok"]
    error = result["error"]
    assert error.startswith("HarpCheckpointError: tensor parallel size 2 cannot split layer 0 "
                            "of this checkpoint (9 query heads, 3 KV heads"), error
    assert "num_attention_heads (9) must be divisible by the tensor parallel size (2)" in error
    assert "(EngineCore" not in log and "(Worker" not in log, log[-3000:]


# ---------------------------------------------------------------------------- PP = 2 (tiny)
# The pipeline split needs no real model: a tiny HARP checkpoint whose top two layers are
# pruned has stages of unequal attention, as SmolLM2 HARP P = 8 has (docs/results.md).

PP_ALPHAS = {4: 0.5, 5: 0.0}  # stage 1 (layers 3-5) keeps one attention layer of three


@pytest.fixture(scope="module")
def tiny_pp(tiny_checkpoints, tmp_path_factory) -> Path:
    """The tiny Llama HARP-pruned in its top two layers (token-local at 4, removed at 5)."""
    return save(tiny_checkpoints["dense"], tmp_path_factory.mktemp("tiny-pp") / "harp-top2",
                PP_ALPHAS)


@parallel
def test_pp2_harp_matches_single_rank(tiny_pp, engines):
    single = engines(tiny_pp, TINY_PROMPTS)
    par = engines(tiny_pp, TINY_PROMPTS, pp=2)
    worst = assert_same_as_single_rank(par, single, len(TINY_PROMPTS))
    print(f"tiny HARP top 2: PP=2 vs PP=1 max |d prompt logprob| = {worst:.2e}")
    assert [(r["tp_rank"], r["pp_rank"]) for r in par[0]["ranks"]] == [(0, 0), (0, 1)]


@parallel
def test_pp2_kv_capacity_follows_each_stages_attention_layers(tiny_pp, engines):
    """Stage 0 builds layers 0-2 (3 with attention), stage 1 layers 3-5 (attention in 3,
    token-local 4, removed 5). Each stage fits its own layers in its KV-cache memory and the
    engine takes the smaller: 3 attention layers' worth, 4/3 of the single rank's 4."""
    single = engines(tiny_pp, TINY_PROMPTS)[0]
    par = engines(tiny_pp, TINY_PROMPTS, pp=2)[0]
    assert single["ok"] and par["ok"]
    first, second = par["ranks"]
    assert (first["start_layer"], first["end_layer"]) == (0, 3)
    assert (second["start_layer"], second["end_layer"]) == (3, 6)
    assert spec_heads(first) == {0: 2, 1: 2, 2: 2} and spec_heads(second) == {3: 2}
    assert (second["attention_modules"]["4"], second["attention_modules"]["5"]) == (
        "FoldedTokenLocalAttention", "RemovedAttention")
    assert rank_blocks(second) > rank_blocks(first)
    for rank in (first, second):
        assert rank["num_blocks"] == par["num_gpu_blocks"] == rank_blocks(first)
    (one,) = single["ranks"]
    assert len(spec_heads(one)) == 4 and one["num_blocks"] == rank_blocks(one)
    assert par["kv_cache_tokens"] / single["kv_cache_tokens"] == pytest.approx(4 / 3, rel=0.01)
