"""The recall probe in the per-layer prices (``--probe-prices``, issue 24): measured lazily
for the solver's layouts, the result is the layout an eager pricing of every candidate gives;
the prices are cached; the option's misuse is refused."""

from __future__ import annotations

import json

import pytest
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
