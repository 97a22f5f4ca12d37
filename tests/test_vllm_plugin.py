"""The vLLM plugin: HARP checkpoints served by vLLM's own model code (issue 4).

Engine runs go through ``tests/probe.py`` in a subprocess (vLLM's CPU
platform spawns workers, so ``LLM`` must start from a ``__main__`` module); each engine is
started once per session and its JSON result shared between tests, also with
test_parallel.py and test_vllm_defaults.py (conftest's ``engines``, ``tiny_checkpoints`` and
``smol_harp8_run``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    PROMPTS,
    TINY_ALPHAS,
    TINY_PROMPTS,
    head_pruned,
    make_tiny,
    own_model_type,
    save,
)
from probe import engine_env, launch

from harp_vllm.families import FAMILIES
from harp_vllm.pruning.reference import load_model
from harp_vllm.vllm_plugin.fold import fold_o, fold_v, rank_heads

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- helpers


def run_probe(model: Path, workdir: Path, prompts: list | None = None, *,
              multiprocessing: bool = False, prompt_logprobs: bool = True,
              max_tokens: int = 32, max_model_len: int = 2048, env: dict | None = None,
              timeout: float = 900, try_models: bool = False) -> tuple[dict, str]:
    """Start vLLM on ``model`` (``probe.launch``: in-process engines in the session's probe
    worker); (result JSON, the run's stdout + stderr).
    With ``try_models``, ``model`` is a JSON list of checkpoints started in turn (in process)."""
    workdir.mkdir(parents=True, exist_ok=True)
    flags = ["--try-models" if try_models else "--model", str(model),
             "--max-tokens", str(max_tokens), "--max-model-len", str(max_model_len)]
    if prompts:
        (workdir / "prompts.json").write_text(json.dumps(prompts))
        flags += ["--prompts", str(workdir / "prompts.json")]
    if prompt_logprobs:
        flags.append("--prompt-logprobs")
    return launch(flags, workdir, engine_env(not multiprocessing, env), timeout)


def reference(model_dir: Path, prompts: list[list[int]], result: dict | None = None,
              max_tokens: int = 32) -> list[dict]:
    """The HF reference (eager attention, no KV cache) along the engine's own sequences: one
    forward over each prompt and the tokens ``result`` generated for it gives the prompt
    logprobs and, at every generated position, the reference's greedy token after the
    engine's tokens before it. Equal token lists mean the engine generated the reference's
    greedy sequence (by induction from the first token: ``greedy_without_cache``'s sequence,
    checked with one forward instead of one per token). Without ``result``: prompt logprobs
    only (``token_ids`` None)."""
    if result is not None:
        assert result["ok"], result.get("error")
        generated = [r["token_ids"] for r in result["results"]]
        assert [len(g) for g in generated] == [max_tokens] * len(prompts), generated
    model = load_model(model_dir)
    model.set_attn_implementation("eager")  # sdpa drops Gemma2's attention softcapping
    out = []
    with torch.no_grad():
        for k, ids in enumerate(prompts):
            new = generated[k] if result is not None else []
            logits = model(torch.tensor([ids + new]), use_cache=False).logits[0]
            logp = torch.log_softmax(logits[:len(ids)].double(), -1)
            lps = [None] + [logp[i - 1, t].item() for i, t in enumerate(ids) if i > 0]
            greedy = logits[len(ids) - 1:len(ids) - 1 + len(new)].argmax(-1).tolist()
            out.append({"token_ids": greedy if result is not None else None,
                        "prompt_logprobs": lps})
    return out


def max_logprob_diff(a: list, b: list) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True) if x is not None)


def assert_matches(result: dict, ref: list[dict], tol: float = 1e-3) -> None:
    assert result["ok"], result.get("error")
    for got, want in zip(result["results"], ref, strict=True):
        assert got["token_ids"] == want["token_ids"]
        assert max_logprob_diff(got["prompt_logprobs"], want["prompt_logprobs"]) < tol


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def edit_weights(path: Path, drop: tuple[str, ...] = (), add: dict | None = None) -> None:
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    state = load_file(f)
    for k in drop:
        del state[k]
    state.update(add or {})
    save_file(state, f, metadata={"format": "pt"})


# ---------------------------------------------------------------------------- fast unit tests


@pytest.mark.parametrize("n_q,n_kv,tp", [(4, 2, 1), (8, 2, 1), (8, 2, 2), (8, 2, 4),
                                         (6, 6, 3), (4, 1, 2)])
def test_fold_equals_repeat_kv_on_every_tp_split(n_q, n_kv, tp):
    """Sum over ranks of the folded two-matmul path == alpha * o(repeat_kv(v(x)))."""
    g = torch.Generator().manual_seed(0)
    d, dh, alpha = 24, 8, 0.37
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    wv = torch.randn(n_kv * dh, d, generator=g, dtype=torch.float64)
    bv = torch.randn(n_kv * dh, generator=g, dtype=torch.float64)
    wo = torch.randn(d, n_q * dh, generator=g, dtype=torch.float64)
    v = (x @ wv.T + bv).view(5, n_kv, dh).repeat_interleave(n_q // n_kv, dim=1)
    want = alpha * v.reshape(5, -1) @ wo.T
    got = torch.zeros_like(want)
    for rank in range(tp):
        kv_heads, _ = rank_heads(n_q, n_kv, tp, rank)
        assert len(kv_heads) == max(1, n_kv // tp)
        v_r = x @ fold_v(wv, dh, kv_heads).T + fold_v(bv, dh, kv_heads)
        o_r = fold_o(wo, n_q, n_kv, dh, alpha, tp, rank)
        assert o_r.shape == (d, len(kv_heads) * dh)
        got += v_r @ o_r.T
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_fold_rejects_bad_shapes():
    with pytest.raises(ValueError, match="must divide one another"):
        rank_heads(6, 3, 2)
    with pytest.raises(ValueError, match="expected num_attention_heads"):
        fold_o(torch.zeros(4, 12), 4, 2, 4)


def test_importing_the_plugin_does_not_import_vllm():
    code = ("import sys, harp_vllm, harp_vllm.vllm_plugin, harp_vllm.vllm_plugin.fold; "
            "print('vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_entry_point_is_installed_and_archs_match_the_spec():
    from importlib.metadata import entry_points

    from harp_vllm.vllm_plugin import plugin_classes

    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("harp_vllm") == "harp_vllm.vllm_plugin:register"
    assert set(plugin_classes()) == {f.harp_architecture for f in FAMILIES}


# ---------------------------------------------------------------------------- engine tests

vllm = pytest.mark.vllm


@vllm
@pytest.mark.timeout(300)
def test_register_is_reentrant_and_lazy():
    code = (
        "import sys\n"
        "from harp_vllm.vllm_plugin import plugin_classes, register\n"
        "register(); register()\n"
        "from vllm import ModelRegistry\n"
        "archs = set(ModelRegistry.get_supported_archs())\n"
        "assert set(plugin_classes()) <= archs, archs\n"
        "assert 'harp_vllm.vllm_plugin.llama' not in sys.modules\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=280)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.fixture(scope="session")
def smol_p0(smollm2_dir, tmp_path_factory) -> Path:
    return save(smollm2_dir, tmp_path_factory.mktemp("smol") / "p0", {})


@pytest.fixture(scope="session")
def run_smol_dense(smollm2_dir, smol_prompts, tmp_path_factory):
    return run_probe(smollm2_dir, tmp_path_factory.mktemp("run-dense"), smol_prompts,
                     prompt_logprobs=False)


@vllm
@pytest.mark.timeout(1200)
def test_pruned_smollm2_in_multiprocess_engine_matches_reference(smol_harp8_run, smollm2_harp8,
                                                                 smol_prompts):
    """The shared run (conftest's ``smol_harp8_run``) on ``PROMPTS`` against the reference;
    its last, 1,500-token prompt is for the engine comparisons of test_vllm_defaults."""
    result, log = smol_harp8_run
    assert result["ok"], result.get("error", "") + log[-3000:]
    assert result["architectures"] == ["HarpLlamaForCausalLM"]
    # vLLM's separate engine-core process built the model (its log lines carry its name)
    assert "(EngineCore pid=" in log
    assert len(result["results"]) == len(PROMPTS) + 1 and len(PROMPTS) >= 5
    results = result["results"][:len(PROMPTS)]
    ref = reference(smollm2_harp8, smol_prompts, {**result, "results": results})
    assert [r["prompt_token_ids"] for r in results] == smol_prompts
    diffs = [max_logprob_diff(g["prompt_logprobs"], w["prompt_logprobs"])
             for g, w in zip(results, ref, strict=True)]
    assert max(diffs) < 1e-3, diffs
    for got, want in zip(results, ref, strict=True):
        assert len(got["token_ids"]) == 32
        assert got["token_ids"] == want["token_ids"]


@vllm
@pytest.mark.timeout(1200)
def test_kv_cache_capacity_grows_by_layers_with_attention(smol_harp8_run, run_smol_dense):
    pruned, dense = smol_harp8_run[0], run_smol_dense[0]
    assert pruned["ok"] and dense["ok"], (pruned.get("error"), dense.get("error"))
    assert dense["architectures"] == ["LlamaForCausalLM"]
    ratio = pruned["kv_cache_tokens"] / dense["kv_cache_tokens"]
    assert ratio == pytest.approx(30 / 22, rel=0.01), (pruned, dense)


@vllm
@pytest.mark.timeout(1200)
def test_unpruned_harp_checkpoint_equals_stock_llama(smol_p0, smol_prompts, run_smol_dense,
                                                     tmp_path_factory):
    dense = run_smol_dense[0]
    result, log = run_probe(smol_p0, tmp_path_factory.mktemp("run-p0"), smol_prompts,
                            prompt_logprobs=False)
    assert result["ok"], result.get("error", "") + log[-3000:]
    assert result["architectures"] == ["HarpLlamaForCausalLM"]
    assert [r["token_ids"] for r in result["results"]] == \
        [r["token_ids"] for r in dense["results"]]
    assert result["kv_cache_tokens"] == dense["kv_cache_tokens"]


# Every family's own model type (harp_vllm.families), e.g. "mistral", "gemma3_text".
TINY_FAMILIES = [own_model_type(f) for f in FAMILIES]
# In families that serve cross-layer KV sharing, a layer ``TINY_ALPHAS`` leaves dense attends
# over another's keys and values (Gemma 3: two sliding-window layers, with QK-norm).
TINY_SHARING = {3: 1}


@pytest.fixture(scope="session")
def tiny_families(engines, tmp_path_factory) -> dict[str, tuple[Path, list[list[int]]]]:
    """{family: (its tiny model HARP-pruned at ``TINY_ALPHAS``, with ``TINY_SHARING`` where
    the family serves it, ``PROMPTS`` in its tokens)} for every family of ``TINY_FAMILIES``,
    with their single-rank engine runs done in one probe process per distinct tokenization
    (``engines.batch``; Qwen2's tokenizer splits the long prompt differently)."""
    from harp_vllm import models

    base = tmp_path_factory.mktemp("tiny-families")
    out = {}
    sharing = {own_model_type(f): TINY_SHARING for f in FAMILIES if f.kv_sharing}
    for f in TINY_FAMILIES:
        pruned = save(make_tiny(f, base / f / "dense"), base / f / "pruned", TINY_ALPHAS,
                      kv_sharing=sharing.get(f))
        tok = models.load_tokenizer(pruned)
        out[f] = (pruned, [tok(p)["input_ids"] for p in PROMPTS])
    groups: dict[str, list[Path]] = {}
    for pruned, prompts in out.values():
        groups.setdefault(json.dumps(prompts), []).append(pruned)
    for key, group in groups.items():
        engines.batch(group, json.loads(key))
    return out


@vllm
@pytest.mark.timeout(900)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_families_match_reference(family, tiny_families, engines):
    pruned, prompts = tiny_families[family]
    result, log = engines(pruned, prompts)
    assert result["ok"], result.get("error", "") + log[-3000:]
    assert_matches(result, reference(pruned, prompts, result))


# ---------------------------------------------------------------------------- load-time errors


@pytest.fixture(scope="session")
def tiny_pruned(tiny_checkpoints) -> Path:
    """Tiny Llama, 6 layers, pruned at {0: 0.7, 2: 0.0, 4: 0.4, 5: 1.0}."""
    return tiny_checkpoints["harp"]


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def expect_error(model: Path, workdir: Path, *messages: str, env: dict | None = None) -> None:
    result, log = run_probe(model, workdir, [[5, 6, 7]], max_tokens=2, max_model_len=512,
                            prompt_logprobs=False, env=env, timeout=600)
    assert not result["ok"], "the engine started but should have refused the checkpoint"
    text = result["error"] + "\n" + log
    for m in messages:
        assert m in text, f"{m!r} not in the error output:\n{text[-3000:]}"


@vllm
@pytest.mark.timeout(900)
def test_tiny_llama_matches_reference(tiny_pruned, tiny_engines):
    """The single-rank run test_parallel compares its TP=2 engine with."""
    result, log = tiny_engines(tiny_pruned, TINY_PROMPTS)
    assert result["ok"], result.get("error", "") + log[-3000:]
    assert_matches(result, reference(tiny_pruned, TINY_PROMPTS, result))


@vllm
@pytest.mark.timeout(600)
def test_error_missing_pruning_section(tiny_pruned, tmp_path):
    m = _copy(tiny_pruned, tmp_path / "m")
    edit_config(m, harp_pruning=None)
    expect_error(m, tmp_path / "run", "HarpLlamaForCausalLM", "no 'harp_pruning' section")


@vllm
@pytest.mark.timeout(600)
def test_without_the_plugin_vllm_refuses_the_architecture(tiny_pruned, tmp_path):
    # vLLM's own refusal of an unregistered architecture (not any log line naming the class)
    expect_error(tiny_pruned, tmp_path / "run",
                 "Model architectures ['HarpLlamaForCausalLM'] are not supported for now",
                 env={"VLLM_PLUGINS": "lora_filesystem_resolver"})


# Every other load-time refusal: the broken checkpoints are built from tiny_pruned (HARP) and
# tiny_linear (maps), and all started in turn in ONE probe process (``--try-models``: one vLLM
# import and plugin registration instead of one engine process each). Each test then checks
# that its checkpoint was refused with its message.


def _harp_copy(src: dict, out: Path) -> Path:
    return _copy(src["harp"], out)


def _harp_copy_with(src: dict, out: Path, **section) -> Path:
    """The HARP checkpoint with ``section``'s keys set in its pruning section."""
    m = _harp_copy(src, out)
    cfg = json.loads((m / "config.json").read_text())
    cfg["harp_pruning"].update(section)
    edit_config(m, harp_pruning=cfg["harp_pruning"])
    return m


def _linear_copy(src: dict, out: Path) -> Path:
    return _copy(src["linear"], out)


def broken_malformed_pruning_section(src: dict, out: Path) -> Path:
    m = _harp_copy(src, out)
    edit_config(m, harp_pruning={"version": 1, "layers": [2, 4]})
    return m


def broken_layer_index_out_of_range(src: dict, out: Path) -> Path:
    m = _harp_copy(src, out)
    cfg = json.loads((m / "config.json").read_text())
    cfg["harp_pruning"]["layers"]["6"] = 0.5
    edit_config(m, harp_pruning=cfg["harp_pruning"])
    return m


def broken_weight_missing_for_pruned_layer(src: dict, out: Path) -> Path:
    m = _harp_copy(src, out)
    edit_weights(m, drop=("model.layers.4.self_attn.o_proj.weight",))
    return m


def broken_unexpected_weight_for_pruned_layer(src: dict, out: Path) -> Path:
    m = _harp_copy(src, out)
    edit_weights(m, add={"model.layers.4.self_attn.q_proj.weight": torch.zeros(128, 128)})
    return m


def broken_weight_for_removed_layer(src: dict, out: Path) -> Path:
    m = _harp_copy(src, out)
    edit_weights(m, add={"model.layers.2.self_attn.v_proj.weight": torch.zeros(64, 128)})
    return m


def broken_pruned_layer_not_listed(src: dict, out: Path) -> Path:
    m = _harp_copy(src, out)
    cfg = json.loads((m / "config.json").read_text())
    del cfg["harp_pruning"]["layers"]["4"]
    edit_config(m, harp_pruning=cfg["harp_pruning"])
    return m


def broken_unsupported_family(src: dict, out: Path) -> Path:
    m = make_tiny("qwen2", out, layers=2)
    edit_config(m, architectures=["HarpLlamaForCausalLM"],
                harp_pruning={"version": 1, "method": "harp", "layers": {"1": 0.5}})
    return m


def broken_head_shapes_on_a_family_without_per_layer_heads(src: dict, out: Path) -> Path:
    base = make_tiny("gemma2", out / "gemma2", layers=2)
    pruned = save(base, out / "p", {})
    edit_config(pruned, harp_pruning={
        "version": 1, "method": "amp", "layers": {},
        "shapes": {"num_attention_heads": [2, 4], "num_key_value_heads": [1, 2],
                   "intermediate_size": [256, 256]}})
    return pruned


def broken_linear_map_weight_of_wrong_shape(src: dict, out: Path) -> Path:
    m = _linear_copy(src, out)
    edit_weights(m, add={"model.layers.2.self_attn.in_proj.weight": torch.zeros(16, 128)})
    return m


def broken_linear_map_weight_missing(src: dict, out: Path) -> Path:
    m = _linear_copy(src, out)
    edit_weights(m, drop=("model.layers.4.self_attn.out_proj.bias",))
    return m


def broken_linear_map_rank_larger_than_hidden_size(src: dict, out: Path) -> Path:
    m = _linear_copy(src, out)
    cfg = json.loads((m / "config.json").read_text())
    cfg["harp_pruning"]["maps"]["2"]["rank"] = 129
    edit_config(m, harp_pruning=cfg["harp_pruning"])
    return m


def broken_window_not_smaller_than_the_context(src: dict, out: Path) -> Path:
    return _harp_copy_with(src, out, version=3, windows={"1": 512})  # max positions 512


def broken_window_on_a_family_without_per_layer_windows(src: dict, out: Path) -> Path:
    base = make_tiny("qwen2", out / "qwen2", layers=2)
    pruned = save(base, out / "p", {})
    edit_config(pruned, harp_pruning={"version": 3, "method": "window", "layers": {},
                                      "windows": {"1": 64}})
    return pruned


def broken_kv_sharing_target_not_earlier(src: dict, out: Path) -> Path:
    return _harp_copy_with(src, out, version=4, kv_sharing={"1": 3})  # 1, 3 are dense


def broken_kv_weight_for_a_sharing_layer(src: dict, out: Path) -> Path:
    return _harp_copy_with(src, out, version=4, kv_sharing={"3": 1})  # 3 keeps k/v


def broken_kv_sharing_on_a_family_without_support(src: dict, out: Path) -> Path:
    base = make_tiny("qwen2", out / "qwen2", layers=2)
    pruned = save(base, out / "p", {})
    edit_config(pruned, harp_pruning={"version": 4, "method": "share", "layers": {},
                                      "kv_sharing": {"1": 0}})
    return pruned


BROKEN = {name[len("broken_"):]: fn for name, fn in list(globals().items())
          if name.startswith("broken_") and callable(fn)}


@pytest.fixture(scope="session")
def refused(tiny_pruned, tiny_linear, tmp_path_factory) -> dict[str, dict]:
    """{name: {"ok", "error"}} of every BROKEN checkpoint, all started in one probe process."""
    work = tmp_path_factory.mktemp("refused")
    src = {"harp": tiny_pruned, "linear": tiny_linear}
    models = {name: build(src, work / name) for name, build in BROKEN.items()}
    (work / "models.json").write_text(json.dumps([str(m) for m in models.values()]))
    result, log = run_probe(work / "models.json", work / "run", max_model_len=512,
                            prompt_logprobs=False, timeout=1200, try_models=True)
    assert result["ok"], result.get("error", "") + log[-3000:]
    runs = {r["model"]: r for r in result["runs"]}
    assert len(runs) == len(models)
    return {name: runs[str(m)] for name, m in models.items()}


def expect_refused(refused: dict, name: str, *messages: str) -> None:
    run = refused[name]
    assert not run["ok"], f"{name}: the engine started but should have refused the checkpoint"
    for m in messages:
        assert m in run["error"], f"{m!r} not in the error:\n{run['error'][-3000:]}"


@vllm
@pytest.mark.timeout(1500)
def test_error_window_not_smaller_than_the_context(refused):
    expect_refused(refused, "window_not_smaller_than_the_context",
                   "'harp_pruning.windows[1]' is 512 tokens", "max_position_embeddings = 512")


@vllm
@pytest.mark.timeout(1500)
def test_error_window_on_a_family_without_per_layer_windows(refused):
    expect_refused(refused, "window_on_a_family_without_per_layer_windows",
                   "sliding windows ('windows') are served for", "not 'qwen2'")


@vllm
@pytest.mark.timeout(1500)
def test_error_kv_sharing_target_not_earlier(refused):
    expect_refused(refused, "kv_sharing_target_not_earlier",
                   "'harp_pruning.kv_sharing'[1] is 3: layer 1 can only share the KV cache of "
                   "an earlier layer")


@vllm
@pytest.mark.timeout(1500)
def test_error_kv_weight_for_a_sharing_layer(refused):
    expect_refused(refused, "kv_weight_for_a_sharing_layer",
                   "unexpected weight model.layers.3.self_attn.",  # its k_proj or v_proj
                   "_proj.weight: layer 3 shares the KV cache of model.layers.1 "
                   "('harp_pruning.kv_sharing') and keeps only o_proj.weight, q_proj.weight")


@vllm
@pytest.mark.timeout(1500)
def test_error_kv_sharing_on_a_family_without_support(refused):
    expect_refused(refused, "kv_sharing_on_a_family_without_support",
                   "cross-layer KV sharing ('kv_sharing') is served for", "not 'qwen2'")


@vllm
@pytest.mark.timeout(1500)
def test_error_malformed_pruning_section(refused):
    expect_refused(refused, "malformed_pruning_section", "invalid 'harp_pruning' section",
                   "'harp_pruning.layers' must be an object")


@vllm
@pytest.mark.timeout(1500)
def test_error_layer_index_out_of_range(refused):
    expect_refused(refused, "layer_index_out_of_range", "layer index 6 out of range",
                   "6 layers")


@vllm
@pytest.mark.timeout(1500)
def test_error_weight_missing_for_pruned_layer(refused):
    expect_refused(refused, "weight_missing_for_pruned_layer", "weights missing for layer 4",
                   "model.layers.4.self_attn.o_proj.weight")


@vllm
@pytest.mark.timeout(1500)
def test_error_unexpected_weight_for_pruned_layer(refused):
    expect_refused(refused, "unexpected_weight_for_pruned_layer",
                   "unexpected weight model.layers.4.self_attn.q_proj.weight",
                   "layer 4 is pruned")


@vllm
@pytest.mark.timeout(1500)
def test_error_weight_for_removed_layer(refused):
    expect_refused(refused, "weight_for_removed_layer",
                   "unexpected weight model.layers.2.self_attn.v_proj.weight", "alpha = 0")


@vllm
@pytest.mark.timeout(1500)
def test_error_pruned_layer_not_listed(refused):
    expect_refused(refused, "pruned_layer_not_listed", "weights missing for layer 4 (dense",
                   "model.layers.4.self_attn.q_proj.weight")


@vllm
@pytest.mark.timeout(1500)
def test_error_unsupported_family(refused):
    expect_refused(refused, "unsupported_family",
                   "HarpLlamaForCausalLM does not support model_type 'qwen2'")


@vllm
@pytest.mark.timeout(1500)
def test_error_head_shapes_on_a_family_without_per_layer_heads(refused):
    expect_refused(refused, "head_shapes_on_a_family_without_per_layer_heads",
                   "per-layer head counts",
                   "served for llama, mistral, qwen2, gemma3_text models only, not 'gemma2'")


@vllm
@pytest.mark.timeout(1500)
def test_error_linear_map_weight_of_wrong_shape(refused):
    expect_refused(refused, "linear_map_weight_of_wrong_shape",
                   "model.layers.2.self_attn.in_proj.weight",
                   "checkpoint shape (16, 128), expected (32, 128)")


@vllm
@pytest.mark.timeout(1500)
def test_error_linear_map_weight_missing(refused):
    expect_refused(refused, "linear_map_weight_missing", "weights missing for layer 4",
                   "model.layers.4.self_attn.out_proj.bias")


@vllm
@pytest.mark.timeout(1500)
def test_error_linear_map_rank_larger_than_hidden_size(refused):
    expect_refused(refused, "linear_map_rank_larger_than_hidden_size",
                   "'harp_pruning.maps[2].rank' is 129", "larger than the hidden size 128")


def test_every_broken_checkpoint_has_its_test():
    tested = {n[len("test_error_"):] for n in globals() if n.startswith("test_error_")}
    assert set(BROKEN) <= tested, set(BROKEN) - tested


# ---------------------------------------------------------------------------- Gate-Norm (issue 8)


@vllm
@pytest.mark.timeout(1200)
def test_gate_norm_smollm2_matches_reference_and_grows_kv(smollm2_dir, smol_prompts,
                                                          run_smol_dense, tmp_path):
    """Gate-Norm removes attention sublayers wherever their score is lowest (not a top block):
    vLLM gives the reference's greedy tokens and L/(L-K) times the dense KV-cache tokens."""
    from typer.testing import CliRunner

    from harp_vllm.cli import app

    out = tmp_path / "gn8"
    res = CliRunner().invoke(app, ["prune", str(smollm2_dir), "--out", str(out), "--method",
                                   "gate-norm", "--layers", "8", "--eval-windows", "0"])
    assert res.exit_code == 0, res.output
    layers = json.loads((out / "config.json").read_text())["harp_pruning"]["layers"]
    assert len(layers) == 8 and set(layers.values()) == {0.0}
    assert sorted(map(int, layers)) != list(range(22, 30))  # scattered, not the top block
    result, log = run_probe(out, tmp_path / "run", smol_prompts)
    assert result["ok"], result.get("error", "") + log[-3000:]
    assert_matches(result, reference(out, smol_prompts, result))
    dense = run_smol_dense[0]
    assert result["kv_cache_tokens"] / dense["kv_cache_tokens"] == pytest.approx(30 / 22,
                                                                                   rel=0.01)


# ---------------------------------------------------------------------------- head/MLP pruning


@vllm
@pytest.mark.timeout(900)
def test_tiny_flap_with_per_layer_kv_heads_matches_reference(tiny_checkpoints,
                                                              tiny_engines):
    """FLAP (biases on o_proj/down_proj) with layers keeping 1 or 2 KV heads: vLLM's KV-cache
    manager sizes every layer on its own, and holds dense/pruned KV heads times more tokens."""
    pruned = tiny_checkpoints["flap_mlp"]  # heads and MLP cut
    kv = json.loads((pruned / "config.json").read_text())["harp_pruning"]["shapes"][
        "num_key_value_heads"]
    assert sum(kv) == 9 and set(kv) == {1, 2}  # 12 groups, 3 removed, unevenly
    result, log = tiny_engines(pruned, TINY_PROMPTS)
    assert result["ok"], result.get("error", "") + log[-3000:]
    assert_matches(result, reference(pruned, TINY_PROMPTS, result))
    base, base_log = tiny_engines(tiny_checkpoints["dense"], TINY_PROMPTS)
    assert base["ok"], base.get("error", "") + base_log[-3000:]
    assert result["kv_cache_tokens"] / base["kv_cache_tokens"] == pytest.approx(12 / 9,
                                                                                rel=0.01)


@vllm
@pytest.mark.timeout(1200)
def test_head_pruned_smollm2_matches_reference(smollm2_dir, smol_prompts, run_smol_dense,
                                               tmp_path):
    """FLAP (with its biases) at HARP P=8's head share (24 of 90 groups) plus 20% of MLP."""
    pruned = head_pruned(smollm2_dir, tmp_path / "flap", "flap", 0.2667, 0.2, "global")
    shapes = json.loads((pruned / "config.json").read_text())["harp_pruning"]["shapes"]
    assert sum(shapes["num_attention_heads"]) == 270 - 72
    result, log = run_probe(pruned, tmp_path / "run", smol_prompts)
    assert result["ok"], result.get("error", "") + log[-3000:]
    assert result["architectures"] == ["HarpLlamaForCausalLM"]
    assert_matches(result, reference(pruned, smol_prompts, result))
    dense = run_smol_dense[0]
    assert result["kv_cache_tokens"] / dense["kv_cache_tokens"] == pytest.approx(90 / 66,
                                                                                  rel=0.01)


@vllm
@pytest.mark.timeout(900)
def test_tiny_qwen2_with_per_layer_heads_matches_reference(tmp_path):
    """Qwen2 (q/k/v biases) cut by Wanda-sp into layers of 1 and 2 KV heads."""
    dense = make_tiny("qwen2", tmp_path / "dense")
    pruned = head_pruned(dense, tmp_path / "wanda", "wanda-sp", 0.25, 0.25, "global")
    kv = json.loads((pruned / "config.json").read_text())["harp_pruning"]["shapes"][
        "num_key_value_heads"]
    assert sum(kv) == 9 and set(kv) == {1, 2}
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], list(range(20, 120))]
    result, log = run_probe(pruned, tmp_path / "run", prompts, max_model_len=512)
    assert result["ok"], result.get("error", "") + log[-3000:]
    assert result["architectures"] == ["HarpQwen2ForCausalLM"]
    assert_matches(result, reference(pruned, prompts, result))


@vllm
@pytest.mark.timeout(900)
def test_tiny_gemma3_query_heads_cut_matches_reference(tmp_path):
    """Gemma 3 of one KV head cut by AMP into layers of 3 query heads (the KV head stays)
    and 3/4 of the MLP: vLLM builds each layer from its own head count and MLP width."""
    dense = make_tiny("gemma3_text", tmp_path / "dense", kv_heads=1)
    pruned = head_pruned(dense, tmp_path / "amp", "amp", 0.25, 0.25, "uniform")
    shapes = json.loads((pruned / "config.json").read_text())["harp_pruning"]["shapes"]
    assert shapes["num_attention_heads"] == [3] * 6 and shapes["intermediate_size"] == [192] * 6
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], list(range(20, 120))]
    result, log = run_probe(pruned, tmp_path / "run", prompts, max_model_len=512)
    assert result["ok"], result.get("error", "") + log[-3000:]
    assert result["architectures"] == ["HarpGemma3ForCausalLM"]
    assert_matches(result, reference(pruned, prompts, result))


# ---------------------------------------------------------------------------- linear maps
# (--method linear: attention replaced by fitted affine maps; issue 18)

@pytest.fixture(scope="session")
def tiny_linear(tiny_checkpoints) -> Path:
    """Tiny Llama with maps of both ranks and inputs (layer 0 raw: the first layer has no
    residual yet) beside HARP layers (alpha 0.5 and 0)."""
    return tiny_checkpoints["linear"]


@vllm
@pytest.mark.timeout(900)
def test_tiny_linear_maps_match_reference(tiny_linear, tiny_engines):
    """The single-rank run test_parallel compares its TP=2 engine with."""
    result, log = tiny_engines(tiny_linear, TINY_PROMPTS)
    assert result["ok"], result.get("error", "") + log[-3000:]
    assert_matches(result, reference(tiny_linear, TINY_PROMPTS, result))


@vllm
@pytest.mark.timeout(900)
def test_tiny_gemma3_linear_maps_match_reference(tiny_checkpoints, tiny_engines):
    """Gemma 3 (post-norm): maps of both ranks and inputs before the post-attention norm
    (layer 0 raw, on the first layer's embeddings) beside a HARP layer (alpha 0.5): only the
    dense layer 3 holds a KV cache."""
    pruned = tiny_checkpoints["gemma3_linear"]
    result, log = tiny_engines(pruned, TINY_PROMPTS)
    assert result["ok"], result.get("error", "") + log[-3000:]
    assert result["architectures"] == ["HarpGemma3ForCausalLM"]
    assert_matches(result, reference(pruned, TINY_PROMPTS, result))
    assert sum(g["layers"] for g in result["kv_groups"]) == 1, result["kv_groups"]


@pytest.fixture(scope="session")
def smol_linear(smollm2_dir, smol_prompts, tmp_path_factory) -> Path:
    """SmolLM2 with its top 8 layers replaced by linear maps, every rank/input combination
    (22-23 full normed, 24-25 rank 192 normed, 26-27 full raw, 28-29 rank 192 raw), fitted
    on 16 x 128 tokens of WikiText-2 validation."""
    from conftest import save_linear

    from harp_vllm import models
    from harp_vllm.evaluation import data as data_mod
    from harp_vllm.pruning.calibration.windows import calibration_windows

    tok = models.load_tokenizer(smollm2_dir)
    windows = calibration_windows(tok, data_mod.load_text("wikitext2", "validation"), 16, 128)
    groups = [([22, 23], None, "normed"), ([24, 25], 192, "normed"), ([26, 27], None, "raw"),
              ([28, 29], 192, "raw")]
    return save_linear(smollm2_dir, tmp_path_factory.mktemp("smol") / "linear", groups,
                       windows)


@vllm
@pytest.mark.real_model
@pytest.mark.timeout(1200)
def test_linear_smollm2_matches_reference_and_grows_kv(smol_linear, smol_prompts,
                                                       run_smol_dense, tmp_path):
    result, log = run_probe(smol_linear, tmp_path, smol_prompts)
    assert result["ok"], result.get("error", "") + log[-3000:]
    ref = reference(smol_linear, smol_prompts, result)
    assert len(result["results"]) == len(PROMPTS) >= 5
    assert all(len(got["token_ids"]) == 32 for got in result["results"])
    assert_matches(result, ref)
    dense = run_smol_dense[0]
    assert result["kv_cache_tokens"] / dense["kv_cache_tokens"] == pytest.approx(30 / 22,
                                                                                rel=0.01)


# ---------------------------------------------------------------------------- planned mixtures
# (harp-vllm plan: KV-group cuts, linear maps and removed sublayers in one checkpoint; issue 17)


def planned(src: Path, out: Path, layout: str, samples: int = 8, seq_len: int = 64) -> Path:
    """``harp-vllm plan SRC --layout LAYOUT`` (maps and FLAP statistics from WikiText-2
    validation, no evaluation, no statistics cache)."""
    from typer.testing import CliRunner

    from harp_vllm.cli import app

    res = CliRunner().invoke(app, [
        "plan", str(src), "--layout", layout, "--out", str(out), "--calib-samples",
        str(samples), "--calib-seq-len", str(seq_len), "--eval-windows", "0", "--no-cache",
        "--rescore-windows", "0",
        "--ranks", "full"])
    assert res.exit_code == 0, res.output
    return out


@vllm
@pytest.mark.timeout(900)
def test_tiny_planned_mixture_matches_reference_and_sizes_kv(tiny_checkpoints, tiny_engines,
                                                             tmp_path):
    """Every kind of layer choice in one tiny Llama: the engine gives the reference's greedy
    tokens and logprobs, and KV-cache tokens grow by dense over planned KV heads."""
    dense = tiny_checkpoints["dense"]
    layout = "0:drop1,1:linear32,2:remove,3:drop1lin,4:linearfull,5:drop1"
    pruned = planned(dense, tmp_path / "plan", layout)
    section = json.loads((pruned / "config.json").read_text())["harp_pruning"]
    assert section["shapes"]["num_key_value_heads"] == [1, 2, 2, 1, 2, 1]
    assert set(section["maps"]) == {"1", "3", "4"} and section["layers"] == {"2": 0.0}
    assert section["maps"]["3"]["add"] is True
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], list(range(20, 120)), [40] * 30]
    result, log = run_probe(pruned, tmp_path / "run", prompts, max_model_len=512)
    assert result["ok"], result.get("error", "") + log[-3000:]
    assert_matches(result, reference(pruned, prompts, result))
    base, base_log = tiny_engines(dense, TINY_PROMPTS)  # shared with the other tiny tests
    assert base["ok"], base.get("error", "") + base_log[-3000:]
    # KV heads per layer: 1, 0, 0, 1, 0, 1 = 3 of the dense 12.
    assert result["kv_cache_tokens"] / base["kv_cache_tokens"] == pytest.approx(4.0, rel=0.01)


@vllm
@pytest.mark.timeout(900)
def test_tiny_gemma3_planned_layout_matches_reference(tmp_path):
    """A planned Gemma 3 (post-norm; this one has 2 KV heads, so a KV-group cut is offered):
    maps of both ranks, a KV group cut with a map in its place, a removed sublayer, and
    sliding windows on a local layer (3) and on the global layer 5, which must keep the
    global rotary (base 1M, not the local layers' 10k) when vLLM serves it as a sliding
    layer; only layers 1 (one KV head), 3 and 5 keep a KV cache."""
    dense = make_tiny("gemma3_text", tmp_path / "dense")
    pruned = planned(dense, tmp_path / "plan",
                     "0:linearfull,1:drop1lin,2:remove,3:win16,4:linear32,5:win24")
    section = json.loads((pruned / "config.json").read_text())["harp_pruning"]
    assert set(section["maps"]) == {"0", "1", "4"} and section["layers"] == {"2": 0.0}
    assert section["windows"] == {"3": 16, "5": 24} and section["maps"]["1"]["add"] is True
    assert section["shapes"]["num_key_value_heads"] == [2, 1, 2, 2, 2, 2]
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], list(range(20, 120)), [40] * 30]
    result, log = run_probe(pruned, tmp_path / "run", prompts, max_model_len=512)
    assert result["ok"], result.get("error", "") + log[-3000:]
    assert result["architectures"] == ["HarpGemma3ForCausalLM"]
    assert_matches(result, reference(pruned, prompts, result))
    by_window: dict = {}
    for g in result["kv_groups"]:
        by_window[g["sliding_window"]] = by_window.get(g["sliding_window"], 0) + g["layers"]
    assert by_window[16] == 1 and by_window[24] == 1, result["kv_groups"]
    assert sum(by_window.values()) == 3, result["kv_groups"]


# The layout `harp-vllm plan smollm2-135m --kv-saving 0.27` chose (docs/results.md section 10):
# KV groups cut with group maps in their place, and full-rank maps.
SMOL_PLAN27 = ("0:drop1lin,5:drop1lin,6:drop2lin,7:drop2lin,8:drop2lin,9:drop2lin,15:drop1lin,"
               "19:drop1lin,21:drop2lin,24:drop1lin,25:drop2lin,26:drop1lin,27:drop2lin,"
               "28:linearfull,29:drop2lin")


@vllm
@pytest.mark.real_model
@pytest.mark.timeout(1200)
def test_smollm2_plan27_matches_reference_and_kv_equals_plan(smollm2_dir, smol_prompts,
                                                             run_smol_dense, tmp_path):
    """SmolLM2 with the 27% plan's layout (maps fitted on 16 x 128 tokens here): the engine's
    greedy tokens and prompt logprobs equal the reference's, and its KV-cache tokens grow by
    exactly dense / planned KV bytes per token (65 of 90 KV heads) within block rounding."""
    from harp_vllm.pruning import costs

    pruned = planned(smollm2_dir, tmp_path / "plan27", SMOL_PLAN27, samples=16, seq_len=128)
    cfg, shapes = costs.checkpoint_shapes(pruned)
    summary = costs.summary(cfg, shapes)
    assert summary["kv_bytes_per_token"] == 16640 and summary["kv_saving"] >= 0.27
    result, log = run_probe(pruned, tmp_path / "run", smol_prompts)
    assert result["ok"], result.get("error", "") + log[-3000:]
    assert result["architectures"] == ["HarpLlamaForCausalLM"]
    assert_matches(result, reference(pruned, smol_prompts, result))
    dense = run_smol_dense[0]
    want = summary["kv_bytes_per_token_dense"] / summary["kv_bytes_per_token"]
    rounding = 2 * result["block_size"] / dense["kv_cache_tokens"]  # a block on either side
    assert abs(result["kv_cache_tokens"] / dense["kv_cache_tokens"] - want) <= want * rounding


# ---------------------------------------------------------------------------- windows (issue 24)


def _windowed(src: Path, out: Path, windows: dict[int, int],
              kv_sharing: dict[int, int] | None = None,
              sinks: dict[int, torch.Tensor] | None = None,
              group_windows: dict[int, dict] | None = None) -> Path:
    from harp_vllm.pruning.jobs.checkpoint import save_pruned
    from harp_vllm.pruning.reference.window_sinks import attach_window_sinks
    from harp_vllm.spec import PruningSpec

    model = load_model(src)
    attach_window_sinks(model, windows, sinks or {})  # windowed layers with these sinks
    spec = PruningSpec(layers={}, windows=windows, kv_sharing=kv_sharing or {},
                       sinks=sorted(sinks or {}), group_windows=group_windows or {},
                       method="window", source_model=str(src))
    return save_pruned(model, spec, src, out)


def served_ratio(model: Path, context: int, block: int) -> float:
    """Dense over windowed (and shared) KV bytes per ``context``-token sequence, as vLLM
    allocates them (the dense model's own sliding windows included, Gemma's)."""
    from harp_vllm.pruning import costs

    cfg, shapes = costs.checkpoint_shapes(model)
    dense = costs.dense_shapes(cfg)
    served = costs.served_kv_bytes_per_sequence(cfg, shapes, context, block)
    return costs.served_kv_bytes_per_sequence(cfg, dense, context, block) / served


TINY_GROUP_WINDOWS = {0: {"window": 40, "full_groups": [0]},
                      4: {"window": 16, "full_groups": [1]}}


@vllm
@pytest.mark.timeout(900)
def test_tiny_windows_and_sharing_match_reference_past_the_window_and_size_kv(tmp_path):
    """Windowed layers (of three sizes) through vLLM's sliding-window attention, two of them
    with sink logits (vLLM's ``sinks``), two layers windowed in one of their two KV groups
    (``group_windows``: a vLLM attention per group), and two layers sharing an earlier
    layer's KV cache (one full, one windowed: ``kv_sharing_target_layer_name``): prompts
    longer than every window give the reference's greedy tokens and prompt logprobs, each
    windowed layer with its own cache gets a sliding-window KV group and each group-windowed
    layer two one-head caches (one windowed), the sharing layers none, and the sequences the
    KV pool holds at 512 tokens grow over dense as the cost model's served bytes say."""
    from harp_vllm.serving.kv_capacity import sequences_that_fit

    dense = make_tiny("llama", tmp_path / "dense", layers=8)
    sinks = {j: torch.randn(4, generator=torch.Generator().manual_seed(j)) * 3 for j in (1, 3)}
    model = _windowed(dense, tmp_path / "win", {1: 16, 3: 40, 5: 16, 7: 16},
                      kv_sharing={6: 2, 7: 5}, sinks=sinks, group_windows=TINY_GROUP_WINDOWS)
    g = torch.Generator().manual_seed(0)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], torch.randint(3, 250, (120,), generator=g).tolist(),
               [40] * 30 + torch.randint(3, 250, (100,), generator=g).tolist()]
    result, log = run_probe(model, tmp_path / "run", prompts, max_model_len=512)
    assert result["ok"], result.get("error", "") + log[-3000:]
    want = reference(model, prompts, result)
    assert_matches(result, want)
    # the sinks change the model: served without them, the logprobs would not match
    plain = _windowed(dense, tmp_path / "plain", {1: 16, 3: 40, 5: 16, 7: 16}, {6: 2, 7: 5},
                      group_windows=TINY_GROUP_WINDOWS)
    assert max_logprob_diff(reference(plain, prompts[1:2])[0]["prompt_logprobs"],
                            want[1]["prompt_logprobs"]) > 1e-2
    # own caches: full 2, 0's group 0, 4's group 1; 16: 1, 5, 4's group 0; 40: 3, 0's group 1
    windows = sorted(grp["sliding_window"] or 0 for grp in result["kv_groups"])
    assert windows == [0, 0, 0, 16, 16, 16, 40, 40]
    assert sum(grp["layers"] for grp in result["kv_groups"]) == 8  # 6 and 7 share
    # a one-head cache's block holds twice the tokens of a two-head layer's (one page size)
    assert sorted(grp["block_size"] for grp in result["kv_groups"]) == [128] * 4 + [256] * 4
    base, _ = run_probe(dense, tmp_path / "run-dense", None, max_model_len=512,
                        prompt_logprobs=False)
    got = sequences_that_fit(result, 512) / sequences_that_fit(base, 512)
    assert got == pytest.approx(served_ratio(model, 512, result["block_size"]), rel=0.01)


# Layers of several depths windowed, some shorter than most test prompts; three layers share
# an earlier layer's KV cache (two full, one windowed like its target).
SMOL_WINDOWS = {2: 64, 5: 32, 9: 128, 14: 64, 20: 256, 25: 32, 26: 32, 29: 100}
SMOL_SHARING = {11: 10, 17: 16, 26: 25}
# and two layers windowed in some KV groups only (the others kept whole)
SMOL_GROUP_WINDOWS = {0: {"window": 64, "full_groups": [2]},
                      12: {"window": 100, "full_groups": [0, 1]}}


@vllm
@pytest.mark.real_model
@pytest.mark.timeout(1200)
def test_smollm2_windows_match_reference_and_kv_equals_the_cost_model(
        smollm2_dir, smol_prompts, run_smol_dense, tmp_path):
    """SmolLM2 with eight windowed layers (two with sink logits), two windowed in some KV
    groups only and three sharing an earlier layer's KV cache: greedy tokens and prompt
    logprobs equal the reference's on the test prompts and on a 400-token WikiText passage
    (longer than every window), and the sequences
    of 2,048 tokens the KV pool holds grow over the dense run's as the cost model's served
    bytes predict."""
    from harp_vllm import models
    from harp_vllm.evaluation.domains import domain_text
    from harp_vllm.serving.kv_capacity import sequences_that_fit

    sinks = {j: torch.randn(9, generator=torch.Generator().manual_seed(j)) * 3 for j in (2, 20)}
    model = _windowed(smollm2_dir, tmp_path / "win", SMOL_WINDOWS, SMOL_SHARING, sinks,
                      SMOL_GROUP_WINDOWS)
    tok = models.load_tokenizer(smollm2_dir)
    long = tok(domain_text("wikitext", "dev", max_chars=8000))["input_ids"][:400]
    prompts = [*smol_prompts, long]
    result, log = run_probe(model, tmp_path / "run", prompts)
    assert result["ok"], result.get("error", "") + log[-3000:]
    assert_matches(result, reference(model, prompts, result))
    dense = run_smol_dense[0]
    got = sequences_that_fit(result, 2048) / sequences_that_fit(dense, 2048)
    assert got == pytest.approx(served_ratio(model, 2048, result["block_size"]), rel=0.01)
