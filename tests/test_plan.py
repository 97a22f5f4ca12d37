"""``harp-vllm plan`` (issue 17) on tiny models: cost model, exact solver, mixed checkpoints."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from harp_vllm.cli import app
from harp_vllm.errors import UserError
from harp_vllm.pruning import costs
from harp_vllm.pruning.methods.held_out import RIDGE_GRID
from harp_vllm.pruning.planner import scoring
from harp_vllm.pruning.planner.choices import KEEP, Choice, candidates, parse_layout
from harp_vllm.pruning.planner.solve import Budget, solve_layouts
from harp_vllm.pruning.reference import load_model
from harp_vllm.spec import PruningSpec

SMOL = SimpleNamespace(model_type="llama", hidden_size=576, num_attention_heads=9,
                       num_key_value_heads=3,
                       head_dim=64, intermediate_size=1536, num_hidden_layers=30,
                       vocab_size=49152)
runner = CliRunner()


def test_cost_model_counts_by_hand():
    d, n = 576, 4096
    dense = costs.dense_shape(SMOL)
    proj = 2 * d * 576 + 2 * d * 192
    assert costs.layer_params(SMOL, dense) == proj + 3 * d * 1536
    assert costs.layer_macs(SMOL, dense, n) == proj + 3 * d * 1536 + 576 * (n + 1)
    assert costs.layer_macs(SMOL, dense, n, "decode") == proj + 3 * d * 1536 + 2 * 576 * n
    assert costs.kv_bytes(SMOL, dense) == 2 * 3 * 64 * 2
    lin = costs.LayerShape("linear", rank=192, intermediate=1536)
    assert costs.layer_macs(SMOL, lin, n) == 2 * d * 192 + 3 * d * 1536
    assert costs.kv_bytes(SMOL, lin) == 0
    # A mixed spec: layer 0 one KV group fewer, layer 1 a full-rank map, layer 2 removed.
    shapes = {"num_attention_heads": [6] + [9] * 29, "num_key_value_heads": [2] + [3] * 29,
              "intermediate_size": [1536] * 30}
    spec = PruningSpec(layers={2: 0.0}, maps={1: {"input": "normed", "rank": None}},
                       shapes=shapes)
    got = costs.model_shapes(SMOL, spec)
    assert got[0] == costs.LayerShape("dense", 6, 2, None, 1536)
    assert got[1] == costs.LayerShape("linear", 0, 0, None, 1536)
    assert got[2].attention == "removed" and got[3] == dense
    s = costs.summary(SMOL, got)
    assert s["kv_bytes_per_token"] == 768 * 30 - 256 - 768 * 2
    expected = (costs.model_macs(SMOL, [dense] * 30, 7168)
                / costs.model_macs(SMOL, got, 7168))
    assert s["predicted_speedup"]["prefill@7168"] == pytest.approx(expected, abs=1e-4)
    assert s["predicted_speedup"]["prefill@7168"] > s["predicted_speedup"]["prefill@4096"] > 1


def _brute_force(cfg, damage, choices, budget, forbidden=frozenset()):
    limit = (1 - budget.kv_saving) * costs.kv_bytes(cfg, costs.dense_shape(cfg)) * len(damage)
    best = None
    for combo in itertools.product(choices, repeat=len(damage)):
        kv = sum(costs.kv_bytes(cfg, c.shape(cfg)) for c in combo)
        if kv > limit + 1e-6 or any((j, c.name) in forbidden for j, c in enumerate(combo)):
            continue
        val = sum(0.0 if c == KEEP else damage[j][c.name] for j, c in enumerate(combo))
        if best is None or val < best[0] - 1e-12:
            best = (val, combo)
    return best


def test_solver_is_exact_and_k_best_are_distinct_and_ordered():
    cfg = SimpleNamespace(**{**vars(SMOL), "num_hidden_layers": 5})
    choices = candidates(cfg, [192, None])
    rng = np.random.default_rng(0)
    for trial in range(4):
        damage = {j: {c.name: float(rng.uniform(0.01, 1.0)) for c in choices if c != KEEP}
                  for j in range(5)}
        for saving in (0.1, 0.3, 0.55):
            budget = Budget(saving)
            found = solve_layouts(cfg, damage, choices, budget, count=4)
            best_val, _ = _brute_force(cfg, damage, choices, budget)
            assert found[0][1] == pytest.approx(best_val, abs=1e-9), (trial, saving)
            values = [v for _, v in found]
            assert values == sorted(values)
            assert len({tuple(sorted((j, c.name) for j, c in lay.items())) for lay, _ in found}
                       ) == len(found)
            for layout, _ in found:
                kv = sum(costs.kv_bytes(cfg, layout.get(j, KEEP).shape(cfg)) for j in range(5))
                assert kv <= (1 - saving) * 768 * 5 + 1e-6
    # Pairs not offered (``forbidden``): the best layout without them, exactly; the pick
    # changes when the unconstrained best uses one.
    best = found[0][0]
    forbidden = frozenset((j, c.name) for j, c in best.items())
    (other, val), = solve_layouts(cfg, damage, choices, budget, forbidden=forbidden)
    assert not forbidden & {(j, c.name) for j, c in other.items()}
    assert val == pytest.approx(_brute_force(cfg, damage, choices, budget, forbidden)[0],
                                abs=1e-9)
    # A speed budget the candidates cannot meet is refused clearly.
    with pytest.raises(UserError, match="no layout meets the budget"):
        solve_layouts(cfg, damage, choices, Budget(0.1, speedup=50.0, context=7168))
    # The speed budget binds: at a 10% KV saving, a 1.3x prefill speed-up forces more changes.
    free = solve_layouts(cfg, damage, choices, Budget(0.1))[0][0]
    fast = solve_layouts(cfg, damage, choices, Budget(0.1, speedup=1.3, context=7168))[0][0]
    shapes = [fast.get(j, KEEP).shape(cfg) for j in range(5)]
    assert costs.predicted_speedup(cfg, shapes, 7168) >= 1.3 - 1e-9
    assert len(fast) >= len(free)


def test_layout_parsing_and_errors():
    cfg = SimpleNamespace(**vars(SMOL))
    lay = parse_layout("7:linear192,28-29:remove,3:drop1,4:keep,5:linearfull,6:drop2lin", cfg)
    assert lay == {7: Choice("linear", rank=192), 28: Choice("remove"), 29: Choice("remove"),
                   3: Choice("drop", groups=1), 5: Choice("linear", rank=None),
                   6: Choice("droplin", groups=2)}
    assert {c.name: parse_layout(f"0:{c.name}", cfg)[0] for c in candidates(
        cfg, [192, None]) if c != KEEP} == {c.name: c for c in candidates(cfg, [192, None])
                                            if c != KEEP}
    # The added map's width is the removed heads' (2 groups x 3 heads x 64); KV as drop2.
    assert lay[6].shape(cfg) == costs.LayerShape("dense", 3, 1, None, 1536, added_rank=384)
    assert costs.layer_params(SMOL, lay[6].shape(cfg)) == (
        costs.layer_params(SMOL, Choice("drop", groups=2).shape(cfg)) + 2 * 576 * 384)
    for text, message in [("7:drop3", "drop 1..2"), ("7:drop0lin", "drop 1..2"),
                          ("7:linear999", "unknown layer choice"),
                          ("30:remove", "out of range"), ("7", "use LAYERS:CHOICE"),
                          ("7:remove,7:keep", "given twice")]:
        with pytest.raises(UserError, match=message):
            parse_layout(text, cfg)


def _calib(tmp_path: Path) -> Path:
    calib = tmp_path / "calib.txt"
    calib.write_text(Path(__file__).with_name("conftest.py").read_text() * 4)
    return calib


def _tiny_args(tiny_llama: Path, tmp_path: Path) -> list[str]:
    return ["plan", str(tiny_llama), "--calib-file", str(_calib(tmp_path)),
            "--calib-samples", "16", "--calib-seq-len", "32", "--positions", "16",
            "--ranks", "16,full", "--eval-windows", "0", "--top-k", "3"]


def _logits_equal_reference(ckpt: Path, tiny_llama: Path, layout_text: str) -> None:
    """The written checkpoint, reloaded, computes what the planner's in-memory layout did."""
    from harp_vllm.pruning.planner.layouts import installed

    reloaded = load_model(ckpt)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    # Rebuild the same layout on the dense model from a fresh session's statistics.
    from harp_vllm.pruning.jobs.plan_options import PlanOptions
    from harp_vllm.pruning.jobs.plan_session import open_session

    s = open_session(PlanOptions(model=str(tiny_llama), out=ckpt, layout=layout_text,
                                 calib_file=ckpt.parent / "calib.txt", calib_samples=16,
                                 calib_seq_len=32, positions=16, eval_windows=0,
                                 ranks="16,full", use_cache=False), progress=False)
    with torch.no_grad(), installed(s.model, parse_layout(layout_text, s.cfg), s.stats):
        want = s.model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_plan_cli_writes_a_mixed_checkpoint_that_reloads_identically(tiny_llama, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("HARP_VLLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "plan"
    res = runner.invoke(app, [*_tiny_args(tiny_llama, tmp_path), "--kv-saving", "0.5",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    section = cfg["harp_pruning"]
    assert section["method"] == "plan" and section["calibration"]["plan"]["layout"]
    assert plan["costs"]["kv_saving"] >= 0.5
    assert len(plan["tried"]) == 3 and plan["measured_kl"] == min(
        t["measured_kl"] for t in plan["tried"])
    assert plan["per_layer"].count("keep") == 4 - len(parse_layout(
        plan["layout"], SimpleNamespace(model_type="llama", num_key_value_heads=2,
                                        hidden_size=64,
                                        num_hidden_layers=4)))
    _logits_equal_reference(out, tiny_llama, plan["layout"])
    # The load-test report's cost-model line reads the served checkpoint's shapes.
    from harp_vllm.loadtest.report_plots import predicted_ratios

    found = costs.checkpoint_shapes(out)
    assert found is not None and costs.summary(*found)["kv_saving"] >= 0.5
    pred = predicted_ratios({"pruned_root": str(out), "output_len": 16}, [64, 256])
    assert pred == {n: costs.request_speedup(*found, n, 16) for n in (64, 256)}
    assert 1 < pred[64] < pred[256]
    assert predicted_ratios({"pruned_root": "no-such-dir", "output_len": 16}, [64]) == {}
    stats_files = list((tmp_path / "cache" / "plan-stats").glob("*.pt"))
    assert len(stats_files) == 1
    # The second plan reuses the cached statistics: same damage table, no new file.
    before = stats_files[0].stat().st_mtime_ns
    res = runner.invoke(app, [*_tiny_args(tiny_llama, tmp_path), "--kv-saving", "0.25",
                              "--rounds", "2", "--out", str(tmp_path / "plan2")])
    assert res.exit_code == 0, res.output
    plan2 = json.loads((tmp_path / "plan2" / "plan.json").read_text())
    assert {t["round"] for t in plan2["tried"]} <= {1, 2} and plan2["settings"]["rounds"] == 2
    assert plan2["measured_kl"] == min(t["measured_kl"] for t in plan2["tried"])
    assert stats_files[0].stat().st_mtime_ns == before
    assert list((tmp_path / "cache" / "plan-stats").glob("*.pt")) == stats_files


def test_explicit_layout_mixes_every_choice_in_one_checkpoint(tiny_llama, tmp_path):
    out = tmp_path / "mixed"
    layout = "0:drop1,1:linear16,2:remove,3:drop1lin"
    res = runner.invoke(app, [*_tiny_args(tiny_llama, tmp_path), "--layout", layout,
                              "--no-cache", "--out", str(out)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    section = cfg["harp_pruning"]
    assert section["layers"] == {"2": 0.0}
    width = cfg["hidden_size"] // cfg["num_key_value_heads"]  # one group's query channels
    assert section["maps"] == {"1": {"input": "normed", "rank": 16},
                               "3": {"input": "normed", "rank": width, "add": True}}
    assert section["shapes"]["num_key_value_heads"] == [1, 2, 2, 1]
    assert cfg["attention_bias"] is True
    plan = json.loads((out / "plan.json").read_text(), parse_constant=lambda c: pytest.fail(
        f"plan.json is not strict JSON: {c}"))  # no per-layer damage measured: no prediction
    assert plan["predicted_kl"] is None and plan["measured_kl"] >= 0
    assert "predicted - (explicit layout)" in res.output
    spec = PruningSpec.from_config(cfg)
    assert spec.kv_heads(cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == [1, 0, 0, 1]
    _logits_equal_reference(out, tiny_llama, layout)


def test_plan_cli_refuses_bad_input_and_leaves_nothing(tiny_llama, tmp_path):
    base = _tiny_args(tiny_llama, tmp_path)
    cases = [(["--kv-saving", "1.5"], "--kv-saving must be in (0, 1)"),
             (["--kv-saving", "0.3", "--layout", "0:remove"], "give --kv-saving S"),
             ([], "give --kv-saving S"),
             (["--kv-saving", "0.3", "--speedup", "0.9"], "--speedup must be > 1"),
             (["--kv-saving", "0.3", "--speedup", "40"], "no layout meets the budget"),
             (["--layout", "0:drop5"], "drop 1..1"),
             (["--kv-saving", "0.3", "--ranks", "65"], "--rank 65 is out of range"),
             (["--kv-saving", "0.3", "--candidates", "drop,bogus"],
              "unknown candidate kind 'bogus'"),
             (["--frontier", "--kv-saving", "0.3"], "--frontier sweeps --budgets"),
             (["--frontier", "--budgets", "0.2,1.2"], "--budgets must be KV savings"),
             (["--kv-saving", "0.3", "--rescore-windows", "-1"],
              "--rescore-windows must be >= 0"),
             (["--kv-saving", "0.3", "--calib-mix", "wikitext"],
              "give one of --calib-mix, --calib-file and --calib-self")]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"bad{i}"
        res = runner.invoke(app, [*base, "--no-cache", *args, "--out", str(out)])
        assert res.exit_code == 2, (args, res.output)
        assert message in " ".join(res.output.split()), (args, res.output)
        assert not out.exists()
        assert not list(tmp_path.glob(f".bad{i}*"))


def test_frontier_writes_table_and_plots(tiny_llama, tmp_path):
    compare = tmp_path / "compare.json"
    compare.write_text(json.dumps({"_source": "test", "linear": [
        {"kv_saving": 0.25, "ppl": 300.0}, {"kv_saving": 0.5, "ppl": 400.0}]}))
    out = tmp_path / "frontier"
    res = runner.invoke(app, [*_tiny_args(tiny_llama, tmp_path), "--frontier", "--budgets",
                              "0.25,0.5", "--compare", str(compare), "--no-cache",
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "frontier.json").read_text())
    assert [p["budget"]["kv_saving"] for p in report["plans"]] == [0.25, 0.5]
    assert report["plans"][1]["costs"]["kv_saving"] >= 0.5
    assert report["plans"][0]["predicted_kl"] <= report["plans"][1]["predicted_kl"]
    for name in ("frontier.md", "frontier.png", "layouts.png"):
        assert (out / name).stat().st_size > 0
    assert "| 0.5 |" in (out / "frontier.md").read_text()


def test_group_fit_recovers_linear_heads_and_removes_the_predictable_groups():
    """Heads whose outputs are an exact affine function of the input are recovered by the
    fit and are the ones chosen for removal; a context-dependent (noise) group is kept."""
    from harp_vllm.pruning.methods.group_fit import HeadMoments, fit_groups
    from harp_vllm.pruning.methods.linear import Moments

    g = torch.Generator().manual_seed(0)
    d, hd, r, groups = 16, 4, 2, 3  # 3 KV groups of 2 query heads of width 4
    width = groups * r * hd
    a_true = torch.randn(d, width, generator=g, dtype=torch.float64)
    c_true = torch.randn(width, generator=g, dtype=torch.float64)
    w_o = torch.randn(d, width, generator=g)
    mx, mz = Moments(d), HeadMoments(d, width)
    for _ in range(4):
        x = torch.randn(256, d, generator=g, dtype=torch.float64)
        z = x @ a_true + c_true
        z[:, 8:16] = torch.randn(256, 8, generator=g, dtype=torch.float64)  # group 1: noise
        z[:, 16:] += 0.05 * torch.randn(256, 8, generator=g, dtype=torch.float64)  # 2: nearly
        mx.add(x, x)  # only the input moments are read
        mz.add(x, z)
    fit = fit_groups(mx, mz, w_o, hd, r, ridge=0.0)
    assert fit.gone == {1: [0], 2: [0, 2]}
    assert fit.residual[1] < 1e-8 < fit.residual[2] < 1e-3
    in_w, in_b, out_w = fit.map_weights(w_o, 1, hd, r)
    cols = list(range(8))
    assert torch.allclose(in_w.T.double(), a_true[:, cols], atol=1e-4)
    assert torch.allclose(in_b.double(), c_true[cols], atol=1e-4)
    assert torch.equal(out_w, w_o[:, cols])


def test_rescore_windows_are_disjoint_from_the_fit_windows(tiny_llama):
    """The planner cuts calib_samples + rescore_windows windows and fits on the first ones:
    the fit windows are those it would cut alone, and no re-scoring window is one of them."""
    from harp_vllm import models
    from harp_vllm.evaluation.domains import domain_text
    from harp_vllm.pruning.calibration.windows import (
        calibration_windows,
        mixed_calibration_windows,
    )

    tiny_tokenizer = models.load_tokenizer(tiny_llama)
    text = domain_text("wikitext", "dev")[:200_000]
    both = calibration_windows(tiny_tokenizer, text, 20, 64, seed=0)
    fits = calibration_windows(tiny_tokenizer, text, 16, 64, seed=0)
    assert torch.equal(both[:16], fits)
    fit_rows = {tuple(r.tolist()) for r in fits}
    assert not any(tuple(r.tolist()) in fit_rows for r in both[16:])

    mixed, calib, _ = mixed_calibration_windows(tiny_tokenizer, ["wikitext", "python"], 6, 64)
    assert calib == {"mix": ["wikitext", "python"], "part": "dev"}
    wiki = calibration_windows(tiny_tokenizer, domain_text("wikitext", "dev"), 3, 64, seed=0)
    assert torch.equal(mixed[0::2], wiki)  # interleaved: every other window is WikiText's
    assert not torch.equal(mixed[1], wiki[0])
    with pytest.raises(UserError, match="--calib-mix is empty"):
        mixed_calibration_windows(tiny_tokenizer, [], 4, 64)


def test_self_calibration_samples_seeded_full_length_text_and_caches_it(tiny_llama, tmp_path,
                                                                        monkeypatch):
    """Self-calibration: every sequence has its full length with no special token in it, the
    temperature falls linearly, the seed fixes the text, and the text is cached per settings."""
    from harp_vllm import models
    from harp_vllm.pruning.calibration import self_text
    from harp_vllm.pruning.calibration.self_text import (
        SelfCalibration,
        sample_sequences,
        self_calibration_text,
        temperatures,
    )

    tok = models.load_tokenizer(tiny_llama)
    model = load_model(tiny_llama)
    spec = SelfCalibration(sequences=3, tokens=12, batch=2)
    seqs = sample_sequences(model, tok, spec, progress=False)
    assert [len(s) for s in seqs] == [12, 12, 12]
    specials = set(tok.all_special_ids)
    assert not specials & {t for s in seqs for t in s}
    assert seqs == sample_sequences(model, tok, spec, progress=False)
    assert seqs != sample_sequences(model, tok, SelfCalibration(3, 12, seed=1, batch=2),
                                    progress=False)
    assert len({tuple(s) for s in seqs}) == 3  # sampled, not greedy: the rows differ
    t = temperatures(spec)
    assert t[0] == 1.0 and abs(float(t[-1]) - 0.7) < 1e-6 and bool((t[1:] < t[:-1]).all())

    text, calib = self_calibration_text(model, tok, spec, "tiny", tmp_path, progress=False)
    assert calib["self"]["tokens"] == 12 and calib["self"]["model"] == "tiny"
    assert len(text.split("\n\n")) == 3
    (cached,) = tmp_path.glob("self-calibration-*.txt")

    def no_sampling(*a, **k):
        raise AssertionError("sampled again")

    monkeypatch.setattr(self_text, "sample_sequences", no_sampling)
    assert self_calibration_text(model, tok, spec, "tiny", tmp_path)[0] == text
    with pytest.raises(AssertionError):  # other settings: another text
        self_calibration_text(model, tok, SelfCalibration(3, 12, seed=2), "tiny", tmp_path)
    with pytest.raises(UserError, match="at least 1 sequence"):
        SelfCalibration(0, 12).check()


def test_plan_cli_calibrates_on_the_models_own_text(tiny_llama, tmp_path, monkeypatch):
    """--calib-self: the plan fits and scores on text sampled from the model, recorded in
    plan.json's statistics settings (the statistics cache's key), and that text is cached."""
    monkeypatch.setenv("HARP_VLLM_CACHE", str(tmp_path / "cache"))
    args = _tiny_args(tiny_llama, tmp_path)
    i = args.index("--calib-file")
    del args[i:i + 2]
    out = tmp_path / "self"
    res = runner.invoke(app, [*args, "--calib-self", "--kv-saving", "0.3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    calib = plan["settings"]["calibration"]
    assert calib["self"]["tokens"] == 32 and calib["self"]["sequences"] >= 20
    assert plan["costs"]["kv_saving"] >= 0.3
    assert len(list((tmp_path / "cache").glob("self-calibration-*.txt"))) == 1
    assert len(list((tmp_path / "cache" / "plan-stats").glob("*.pt"))) == 1


def test_plan_chooses_each_maps_ridge_by_held_out_error_and_reuses_window_damage(
        tiny_llama, tmp_path, monkeypatch):
    """--ridge held-out: plan.json records every layer's chosen ridge per rank with its
    curve; the statistics (and the maps) differ from a fixed ridge's; the windows' damage,
    which no map changes, is measured once and reused; a bad --ridge is refused."""
    monkeypatch.setenv("HARP_VLLM_CACHE", str(tmp_path / "cache"))
    scored: list[list[str]] = []
    real = scoring.score_candidates

    def spy(model, stats, rec, choices, *a, **k):
        scored.append([c.kind for c in choices])
        return real(model, stats, rec, choices, *a, **k)

    monkeypatch.setattr(scoring, "score_candidates", spy)
    base = [*_tiny_args(tiny_llama, tmp_path), "--kv-saving", "0.3", "--windows", "64,128",
            "--context", "256", "--long-positions", "64"]
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "fixed")])
    assert res.exit_code == 0, res.output
    assert sum("window" in kinds for kinds in scored) == 1
    scored.clear()
    res = runner.invoke(app, [*base, "--ridge", "held-out", "--out", str(tmp_path / "ho")])
    assert res.exit_code == 0, res.output
    assert scored and not any("window" in kinds for kinds in scored)  # reused, not re-measured
    plan = json.loads((tmp_path / "ho" / "plan.json").read_text())
    assert plan["settings"]["ridge"] == "held-out"
    ridges = plan["settings"]["map_ridges"]
    layers = json.loads((tiny_llama / "config.json").read_text())["num_hidden_layers"]
    assert set(ridges) == {"16", "full"}
    for by_layer in ridges.values():
        assert len(by_layer) == layers
        for c in by_layer.values():
            assert c["ridge"] in RIDGE_GRID and len(c["curve"]) == len(RIDGE_GRID)
            assert c["held_out"] == min(c["curve"].values())
    stats = [torch.load(f, weights_only=False)
             for f in (tmp_path / "cache" / "plan-stats").glob("[0-9a-f]*.pt")]
    assert len(stats) == 2
    assert len(list((tmp_path / "cache" / "plan-stats").glob("windows-*.pt"))) == 1
    fixed, held = sorted(stats, key=lambda r: r["settings"]["ridge"] == "held-out")
    moved = [j for j, c in ridges["full"].items() if c["ridge"] != 1e-3]
    assert moved  # a layer whose chosen ridge is not 1e-3 has a different map
    assert not torch.equal(held["maps"]["full"][int(moved[0])]["out_weight"],
                           fixed["maps"]["full"][int(moved[0])]["out_weight"])
    res = runner.invoke(app, [*base, "--ridge", "strong", "--out", str(tmp_path / "bad")])
    assert res.exit_code != 0 and "--ridge must be a number >= 0 or 'held-out'" in res.output
    assert not (tmp_path / "bad").exists()


def test_held_out_damage_maps_are_fitted_without_the_damage_windows(tiny_llama):
    """``hold``: the damage maps (and group maps) are the maps of the windows after the
    first ``hold``, while the written maps, and the ridges chosen by held-out error, still
    come from every window."""
    from harp_vllm.pruning.planner.statistics import fit_statistics

    model = load_model(tiny_llama)
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 300, (16, 32), generator=g)
    held = fit_statistics(model, windows, [None], 1e-3, progress=False, hold=4)
    rest = fit_statistics(model, windows[4:], [None], 1e-3, progress=False)
    whole = fit_statistics(model, windows, [None], 1e-3, progress=False)
    assert held.damage_maps is not None and held.damage_group_fits is not None
    for j, m in held.damage_maps["full"].items():
        torch.testing.assert_close(m.out_weight, rest.maps["full"][j].out_weight)
        torch.testing.assert_close(held.maps["full"][j].out_weight,
                                   whole.maps["full"][j].out_weight)
        assert not torch.allclose(m.out_weight, held.maps["full"][j].out_weight)
        torch.testing.assert_close(held.damage_group_fits[j].weight, rest.group_fits[j].weight)
    cv_held = fit_statistics(model, windows, [None], None, progress=False, hold=4)
    cv = fit_statistics(model, windows, [None], None, progress=False)
    assert cv_held.ridge_report() == cv.ridge_report()


def test_plan_measures_map_damage_held_out_when_asked(tiny_llama, tmp_path, monkeypatch):
    """--held-out-damage: the maps' damage (only) is measured with maps that never saw the
    damage windows, so a linear map's damage is not flattered by its fit; the statistics'
    written maps are the same; too few windows is refused."""
    from harp_vllm.pruning.planner.statistics import PlanStats

    monkeypatch.setenv("HARP_VLLM_CACHE", str(tmp_path / "cache"))
    base = [*_tiny_args(tiny_llama, tmp_path), "--kv-saving", "0.3"]
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "in")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*base, "--held-out-damage", "--out", str(tmp_path / "ho")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ho" / "plan.json").read_text())["settings"][
        "held_out_damage"] is True
    paths = list((tmp_path / "cache" / "plan-stats").glob("[0-9a-f]*.pt"))
    raws = [torch.load(f, weights_only=False) for f in paths]
    assert len(raws) == 2
    for path, raw in zip(paths, raws, strict=True):  # the damage maps survive the cache
        loaded = PlanStats.load(path, raw["settings"])
        assert loaded is not None
        assert ("damage_fits" in loaded.extra) == (raw["settings"].get("damage_maps")
                                                   == "held-out")
    held, plain = sorted(raws, key=lambda r: "damage_fits" in r["extra"], reverse=True)
    assert "damage_fits" in held["extra"] and "damage_fits" not in plain["extra"]
    for j, m in held["maps"]["full"].items():
        torch.testing.assert_close(m["out_weight"], plain["maps"]["full"][j]["out_weight"])
    lin = [(held["damage"][j]["linearfull"], plain["damage"][j]["linearfull"])
           for j in held["damage"]]
    assert sum(h for h, _ in lin) > sum(p for _, p in lin)  # out of sample costs more
    for j in held["damage"]:  # a removed sublayer has no map: the same damage
        assert held["damage"][j]["remove"] == pytest.approx(plain["damage"][j]["remove"])
    res = runner.invoke(app, [*base, "--held-out-damage", "--damage-windows", "16",
                              "--out", str(tmp_path / "bad")])
    assert res.exit_code != 0 and "must be fewer than --calib-samples (16)" in res.output
    assert not (tmp_path / "bad").exists()
