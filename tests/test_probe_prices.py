"""The recall probe in the per-layer prices (``--probe-prices``, issue 24): measured lazily
for the solver's layouts, the result is the layout an eager pricing of every candidate gives;
the prices are cached; the option's misuse is refused."""

from __future__ import annotations

import json

import pytest
import torch
from test_plan import _calib
from typer.testing import CliRunner

from harp_vllm.cli import app
from harp_vllm.pruning.jobs.plan_options import PlanOptions
from harp_vllm.pruning.jobs.plan_session import open_session
from harp_vllm.pruning.planner.choices import KEEP
from harp_vllm.pruning.planner.probe_prices import price_lazily, priced
from harp_vllm.pruning.planner.scoring import layout_kl_parts
from harp_vllm.pruning.planner.solve import Budget, served_block, solve_served

runner = CliRunner()


def _args(tiny_llama, tmp_path) -> list[str]:
    return ["plan", str(tiny_llama), "--calib-file", str(_calib(tmp_path)), "--calib-samples",
            "8", "--calib-seq-len", "32", "--positions", "16", "--eval-windows", "0",
            "--top-k", "2", "--candidates", "linear,remove,window", "--windows", "64,128",
            "--context", "512", "--long-positions", "64", "--kv-saving", "0.3",
            "--recall-probe", "4.0", "--probe-prices"]


def test_lazy_probe_prices_give_the_eager_optimum(tiny_llama, tmp_path, monkeypatch):
    """Priced lazily (the solver's best layout's unpriced choices measured, until none is
    left), the solver's layout costs what the optimum costs with every candidate's probe
    damage measured up front; fewer candidates are measured; each price is the candidate's
    probe KL alone in its layer."""
    monkeypatch.setenv("HARP_VLLM_CACHE", str(tmp_path / "cache"))
    opts = PlanOptions(  # _args' settings
        model=str(tiny_llama), out=tmp_path / "x", kv_saving=0.3,
        calib_file=_calib(tmp_path), calib_samples=8, calib_seq_len=32,
        positions=16, eval_windows=0, candidates="linear,remove,window",
        windows="64,128", context=512, long_positions=64, recall_probe=100.0,
        probe_prices=True, use_cache=False)
    s = open_session(opts, progress=False)
    probe = s.probe
    budget = Budget(0.3, None, s.context, served_block(s.cfg, s.choices))

    def best(prices):
        return solve_served(s.cfg, prices, s.choices, budget, 1)[0][0]

    store: dict = {}
    lazy_prices, record = price_lazily(s.model, s.stats, probe, 4.0, store, best,
                                       progress=False)
    assert record.converged and record.rounds >= 1
    eager = {j: {c.name: layout_kl_parts(s.model, {j: c}, s.stats, probe)["probe"]
                 for c in s.choices if c != KEEP} for j in range(s.cfg.num_hidden_layers)}
    for j, by in store.items():
        for name, kl in by.items():
            assert kl == pytest.approx(eager[j][name], rel=1e-5, abs=1e-9)
    full = priced(s.stats.damage, eager, 100.0)
    lazy_best, eager_best = best(lazy_prices), best(full)

    def cost(layout):
        return sum(full[j][c.name] for j, c in layout.items())

    assert cost(lazy_best) == pytest.approx(cost(eager_best), rel=1e-6, abs=1e-9)
    assert sum(len(v) for v in store.values()) < sum(len(v) for v in eager.values())


def test_plan_with_probe_prices_records_and_caches_them(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("HARP_VLLM_CACHE", str(tmp_path / "cache"))
    args = _args(tiny_llama, tmp_path)
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "p1")])
    assert res.exit_code == 0, res.output
    plan = json.loads((tmp_path / "p1" / "plan.json").read_text())
    pricing = plan["probe_prices"]
    assert pricing["converged"] and pricing["measured_now"] > 0
    assert pricing["weight"] == 4.0 and len(pricing["probe_kl"]) == pricing["measured_now"]
    assert plan["settings"]["recall_probe"]["in_prices"] is True
    # the second plan reads every price it needs from the cache
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "p2")])
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "p2" / "plan.json").read_text())
    assert again["probe_prices"]["measured_now"] == 0
    assert again["probe_prices"]["from_cache"] == pricing["measured_now"]
    assert again["layout"] == plan["layout"]


@pytest.mark.parametrize(("drop", "add", "message"), [
    ("--recall-probe", (), "give --recall-probe WEIGHT too"),
    ("--kv-saving", ("--layout", "1:win64"), "not to a given --layout"),
])
def test_probe_prices_misuse_is_refused(tiny_llama, tmp_path, drop, add, message):
    args = _args(tiny_llama, tmp_path)
    i = args.index(drop)
    args = [*args[:i], *args[i + 2:], *add, "--out", str(tmp_path / "x")]
    res = runner.invoke(app, args)
    assert res.exit_code != 0 and message in res.output
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------- retrieval floor


def test_retrieval_mass_is_the_far_attention_of_each_kv_group(tiny_llama):
    """At the probe's positions, each KV group's mass is its query heads' attention (as HF's
    eager attention returns it) on keys more than ``beyond`` back, the first 4 left out."""
    from transformers import AutoModelForCausalLM

    from harp_vllm.pruning.calibration.damage import record_dense
    from harp_vllm.pruning.planner.retrieval import group_retrieval
    from harp_vllm.pruning.reference import load_model

    model = load_model(tiny_llama)
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 96), generator=g)
    picks = torch.tensor([[80, 90, 95], [70, 85, 94]])
    layers = list(range(cfg.num_hidden_layers))
    rec = record_dense(model, ids, layers, batch=1, picks=picks)
    masses = group_retrieval(model, rec, beyond=(20, 40))
    eager = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        att = eager(input_ids=ids, output_attentions=True).attentions  # [2, H, T, T] each
    n_kv, rep = cfg.num_key_value_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    t = torch.arange(ids.shape[1])
    for b, mass in masses.items():
        for j in layers:
            want = torch.zeros(n_kv, dtype=torch.float64)
            for r in range(2):
                for p in picks[r].tolist():
                    far = (t < p - b) & (t >= 4)
                    heads = att[j][r, :, p][:, far].sum(-1)  # [H]
                    want += heads.view(n_kv, rep).sum(1).double()
            assert torch.allclose(mass[j], want / picks.numel(), atol=1e-5)
    assert (masses[20] >= masses[40]).all() and masses[40].min() >= 0
    assert masses[40].max() > 0
    nothing = group_retrieval(model, rec, beyond=(96,))[96]  # nothing that far back
    assert nothing.abs().max() == 0


def test_kept_mass_by_choice_and_the_solver_keeps_the_floor(tiny_llama, tmp_path, monkeypatch):
    from harp_vllm.errors import UserError
    from harp_vllm.pruning.planner.choices import Choice
    from harp_vllm.pruning.planner.retrieval import (
        group_retrieval,
        kept_mass,
        layout_mass,
        retrieval_floor,
    )

    monkeypatch.setenv("HARP_VLLM_CACHE", str(tmp_path / "cache"))
    opts = PlanOptions(
        model=str(tiny_llama), out=tmp_path / "x", kv_saving=0.3,
        calib_file=_calib(tmp_path), calib_samples=8, calib_seq_len=32,
        positions=16, eval_windows=0, candidates="droplin,linear,remove,window,group-window",
        windows="64,128", context=512, long_positions=64, recall_probe=1.0, use_cache=False)
    s = open_session(opts, progress=False)
    mass = group_retrieval(s.model, s.probe, (64, 128))
    j = 1
    base, far = mass[64][j], mass[128][j]  # the counted mass, and beyond the wider window
    total = float(base.sum())
    assert kept_mass(KEEP, j, mass, s.stats) == pytest.approx(total)
    for name in ("linear", "remove"):
        c = next(c for c in s.choices if c.kind == name)
        assert kept_mass(c, j, mass, s.stats) == 0
    assert kept_mass(Choice("window", window=64), j, mass, s.stats) == pytest.approx(0)
    # a wider window keeps what lies within it; a kept group keeps all of its own
    assert kept_mass(Choice("window", window=128), j, mass, s.stats) == pytest.approx(
        total - float(far.sum()))
    assert kept_mass(Choice("window", window=128, full_groups=(1,)), j, mass, s.stats
                     ) == pytest.approx(float(base[1] + base[0] - far[0]))
    gone = s.stats.group_fits[j].gone[1]
    assert kept_mass(Choice("droplin", groups=1), j, mass, s.stats) == pytest.approx(
        total - float(base[gone].sum()))
    # counted beyond the largest window (the default), a window keeps none, a kept group its own
    wide = {128: mass[128]}
    for w in (64, 128):
        assert kept_mass(Choice("window", window=w), j, wide, s.stats) == 0
    assert kept_mass(Choice("window", window=64, full_groups=(0,)), j, wide, s.stats
                     ) == pytest.approx(float(far[0]))
    budget = Budget(0.3, None, s.context, served_block(s.cfg, s.choices))
    free = solve_served(s.cfg, s.stats.damage, s.choices, budget, 1)[0][0]
    floored = []
    for fraction in (0.3, 0.6):
        floor = retrieval_floor(mass, s.choices, s.stats, fraction)
        layout = solve_served(s.cfg, s.stats.damage, s.choices, budget, 1, floor=floor)[0][0]
        assert layout_mass(layout, mass, s.stats) >= fraction - 1e-9
        floored.append(layout)
    # the floor is what keeps the mass: unconstrained, the solver keeps less (0.50 here)
    assert layout_mass(free, mass, s.stats) < 0.6 and floored[1] != free
    with pytest.raises(UserError, match="keeps 0.9 of the retrieval mass"):  # out of reach
        solve_served(s.cfg, s.stats.damage, s.choices, budget, 1,
                     floor=retrieval_floor(mass, s.choices, s.stats, 0.9))


def test_plan_with_retrieval_floors_takes_the_best_measured(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("HARP_VLLM_CACHE", str(tmp_path / "cache"))
    args = [a for a in _args(tiny_llama, tmp_path) if a != "--probe-prices"]
    out = tmp_path / "plan"
    res = runner.invoke(app, [*args, "--retrieval-floor", "0,0.5", "--out", str(out)])
    assert res.exit_code == 0, res.output
    plan = json.loads((out / "plan.json").read_text())
    floors = plan["retrieval_floor"]
    assert set(floors["plans"]) == {"0.0", "0.5"} and floors["beyond"] == [128]
    for f, p in floors["plans"].items():
        assert p["kept"] >= float(f) - 1e-4
    best = min(floors["plans"].values(), key=lambda p: p["measured_kl"])
    assert plan["layout"] == best["layout"] and plan["measured_kl"] == best["measured_kl"]
    assert floors["chosen"] in (0.0, 0.5) and {t["floor"] for t in plan["tried"]} == {0.0, 0.5}
    assert plan["settings"]["recall_probe"]["retrieval_floors"] == [0.0, 0.5]
    # with the probe in the prices too; a floor no layout keeps is reported, not fatal
    res = runner.invoke(app, [*args, "--probe-prices", "--retrieval-floor", "0.3,0.95",
                              "--recall-depths", "0.2,0.6,0.85", "--retrieval-beyond", "64",
                              "--out", str(tmp_path / "both")])
    assert res.exit_code == 0, res.output
    both = json.loads((tmp_path / "both" / "plan.json").read_text())
    assert both["retrieval_floor"]["plans"]["0.95"] is None
    assert both["retrieval_floor"]["chosen"] == 0.3 and both["probe_prices"]["converged"]
    assert both["retrieval_floor"]["plans"]["0.3"]["kept"] >= 0.3 - 1e-4
    assert both["settings"]["recall_probe"]["depths"] == [0.2, 0.6, 0.85]
    assert both["retrieval_floor"]["beyond"] == [64, 128]
    for bad in ("0.5,1.2", "x"):
        res = runner.invoke(app, [*args, "--recall-depths", bad, "--out", str(tmp_path / "x")])
        assert res.exit_code != 0 and "--recall-depths" in res.output
    res = runner.invoke(app, [*args, "--retrieval-floor", "0.95", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "any of the retrieval floors 0.95" in res.output
    for bad, message in (("1.5", "each in [0, 1)"), ("a,b", "comma list of fractions")):
        res = runner.invoke(app, [*args, "--retrieval-floor", bad, "--out", str(tmp_path / "x")])
        assert res.exit_code != 0 and message in res.output
    i = args.index("--recall-probe")
    res = runner.invoke(app, [*args[:i], *args[i + 2:], "--retrieval-floor", "0.5",
                              "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "--retrieval-floor measures the retrieval mass" in res.output
    assert not (tmp_path / "x").exists()


def test_retrieval_mass_refuses_attention_with_query_key_norms(tmp_path):
    from conftest import make_tiny_model

    from harp_vllm.errors import UserError
    from harp_vllm.pruning.planner.retrieval import group_retrieval
    from harp_vllm.pruning.reference import load_model

    model = load_model(make_tiny_model("gemma3_text", tmp_path / "gemma", layers=2))
    with pytest.raises(UserError, match="without query/key norms.*'gemma3_text' has them"):
        group_retrieval(model, None, 16)
