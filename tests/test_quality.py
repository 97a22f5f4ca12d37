"""``harp-vllm eval quality``: domains, paired statistics, the report, and one run through vLLM."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from harp_vllm.errors import UserError
from harp_vllm.evaluation.domains import domain_text
from harp_vllm.evaluation.quality import QualityOptions, bucket_nll, check_options
from harp_vllm.evaluation.quality_report import markdown, plot, summarize


@pytest.mark.parametrize("domain", ["python", "boolq", "gsm8k"])
def test_domain_parts_are_disjoint_and_stable(domain):
    dev = domain_text(domain, "dev", max_chars=200_000)
    report = domain_text(domain, "report", max_chars=200_000)
    dev_items, report_items = set(dev.split("\n\n")), set(report.split("\n\n"))
    # item texts may share paragraphs (code blocks), but whole parts must not overlap much
    big = {x for x in dev_items if len(x) > 200}
    assert big and not big & {x for x in report_items if len(x) > 200}
    assert domain_text(domain, "report", max_chars=200_000) == report
    assert len(report) >= 200_000


def test_wikitext_parts_are_validation_and_test():
    from harp_vllm.evaluation.data import load_text

    assert domain_text("wikitext", "dev") == load_text("wikitext2", "validation")
    assert domain_text("wikitext", "report") == load_text("wikitext2", "test")
    with pytest.raises(UserError, match="unknown domain"):
        domain_text("lambada", "report")
    with pytest.raises(UserError, match="unknown part"):
        domain_text("python", "test")


def test_bucket_nll_partitions_positions():
    nll = [float(i) for i in range(1, 5000)]   # position p has NLL p
    buckets = bucket_nll(nll)
    assert [(b["start"], b["end"]) for b in buckets] == [(0, 256), (256, 1024), (1024, 4096),
                                                         (4096, 5000)]
    assert sum(b["tokens"] for b in buckets) == len(nll)
    assert buckets[0]["nll_sum"] == sum(range(1, 256))
    assert buckets[3]["nll_sum"] == sum(range(4096, 5000))
    short = bucket_nll([1.0] * 300)
    assert [(b["start"], b["end"], b["tokens"]) for b in short] == [(0, 256, 255),
                                                                     (256, 301, 45)]


def test_options_are_checked_before_any_engine():
    with pytest.raises(UserError, match="unknown domain"):
        check_options(QualityOptions(domains=("wikitext", "c4")))
    with pytest.raises(UserError, match="unknown task"):
        check_options(QualityOptions(tasks=("mmlu",)))
    with pytest.raises(UserError, match="longer than 256"):
        check_options(QualityOptions(long_len=200))
    opts = QualityOptions()
    assert QualityOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts
    assert opts.max_model_len() == 8192


def _payload(label: str, shift: float, acc: list[float], keys: list[float],
             cued: list[float] | None = None) -> dict:
    cued = keys if cued is None else cued
    windows = [2.0, 2.5, 3.0, 2.2]
    return {
        "label": label, "model": label, "path": f"/m/{label}", "seconds": 1.0,
        "vllm_kv_cache_tokens": 1000, "options": QualityOptions().to_dict(),
        "perplexity": {"wikitext": {"perplexity": math.exp(sum(windows) / 4 + shift),
                                    "window_mean_nll": [w + shift for w in windows]}},
        "positions": {"wikitext": {"buckets": [
            [{"start": 0, "end": 256, "nll_sum": 255 * (3 + shift), "tokens": 255},
             {"start": 256, "end": 300, "nll_sum": 44 * (2 + 2 * shift), "tokens": 44}],
            [{"start": 0, "end": 256, "nll_sum": 255 * 3.2, "tokens": 255},
             {"start": 256, "end": 300, "nll_sum": 44 * (2.1 + 2 * shift), "tokens": 44}]]}},
        "tasks": {"lambada_openai": {"n": 4, "metrics": {"acc": sum(acc) / 4,
                                                         "perplexity": 10.0},
                                     "items": {"acc": acc, "perplexity": [-1.0, -2.0, -1.5,
                                                                          -1.0 - shift]}}},
        "passkey": {"lengths": {"1024": {"trials": 4, "accuracy": sum(keys) / 4,
                                         "items": keys, "cued_accuracy": sum(cued) / 4,
                                         "cued_items": cued}}},
    }


def test_summary_gives_paired_ratios_and_differences(tmp_path):
    ref = _payload("dense", 0.0, [1, 1, 0, 0], [1, 1, 1, 0])
    pruned = _payload("plan", 0.1, [1, 0, 0, 0], [1, 1, 0, 0], cued=[1, 1, 1, 1])
    s = summarize([ref, pruned])
    assert s["reference"] == "dense"
    dense_row, row = s["models"]
    assert dense_row["perplexity"]["wikitext"]["ratio"] == 1.0
    ppl = row["perplexity"]["wikitext"]
    assert ppl["ratio"] == pytest.approx(math.exp(0.1))
    assert ppl["se"] == pytest.approx(0.0, abs=1e-12)  # every window shifted alike
    first, second = row["positions"]["wikitext"]
    assert first["se"] is not None and first["ratio"] == pytest.approx(math.exp(0.05))
    assert second["ratio"] == pytest.approx(math.exp(0.2))
    acc = row["tasks"]["lambada_openai"]["acc"]
    assert acc["diff"] == pytest.approx(-0.25)
    assert acc["se"] == pytest.approx(0.25)  # paired diffs 0, -1, 0, 0: sd 0.5 / sqrt(4)
    assert row["tasks"]["lambada_openai"]["perplexity"]["ratio"] == pytest.approx(
        math.exp(0.1 / 4))
    assert row["passkey"]["1024"]["diff"] == pytest.approx(-0.25)
    # the cued answer is its own column: the plan finds every key once the answer is opened
    assert row["passkey"]["1024"]["cued"]["value"] == 1.0
    assert row["passkey"]["1024"]["cued"]["diff"] == pytest.approx(0.25)
    md = markdown(s)
    assert "| dense |" in md and "| plan |" in md and "1.105x" in md and "-25.0" in md
    assert "passkey 1024 cued" in md.splitlines()[0]
    assert md.splitlines()[3].endswith("| 50 (-25 ± 25) | 100 (+25 ± 25) |")
    plot(s, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 10_000
    short = _payload("short", 0.0, [1, 0], [1, 1, 1, 0])
    with pytest.raises(UserError, match="different items"):
        summarize([ref, short])


def test_a_result_written_before_a_crash_is_kept_and_none_is_an_error(tmp_path, monkeypatch):
    """The measuring child writes its result whole (temp file, then rename): an abort after
    that (vLLM's teardown has exited -6 here) keeps the result, logged; an abort before it is
    an error naming the exit. The abort is faked: a real one cannot be provoked on demand."""
    from pathlib import Path

    import harp_vllm.evaluation.quality_report as qr

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    payload = {"schema": qr.MODEL_SCHEMA, "model": str(model), "x": 1}
    writes = [True]

    def child(cmd: list[str]) -> subprocess.CompletedProcess:
        if writes[0]:
            Path(cmd[-1]).write_text(json.dumps(payload))
        return subprocess.CompletedProcess(cmd, -6)

    monkeypatch.setattr(qr.subprocess, "run", child)
    logs: list[str] = []
    got = qr.measure(str(model), "m", QualityOptions(), tmp_path / "runs", False, logs.append)
    assert got["x"] == 1 and not got["cached"]
    assert any("exited -6 after writing its result" in m for m in logs)
    writes[0] = False
    with pytest.raises(UserError, match=r"measuring m .* failed \(exit -6\)"):
        qr.measure(str(model), "m", QualityOptions(), tmp_path / "runs", False, logs.append)


def test_cli_refuses_bad_settings(tmp_path):
    for args, msg in [(["--preset", "huge"], "unknown --preset"),
                      (["--lambada-limit", "-1"], "must not be negative"),
                      (["--passkey-lengths", "1k"], "--lengths")]:
        proc = subprocess.run([sys.executable, "-m", "harp_vllm.cli", "eval", "quality",
                               "smollm2-135m", "--out", str(tmp_path / "q"), *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and msg in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "q").exists()


@pytest.mark.vllm
@pytest.mark.real_model
@pytest.mark.timeout(900)
def test_quality_report_through_vllm(smollm2_dir, tmp_path):
    """One engine: dense SmolLM2 measured once, reported twice (the second label reuses the
    cached run, so its ratios are exactly 1); vLLM's prompt-logprob perplexity equals the HF
    model's on the same windows; the passkey answers hold the key."""
    out = tmp_path / "q"
    proc = subprocess.run(
        [sys.executable, "-m", "harp_vllm.cli", "eval", "quality", str(smollm2_dir),
         str(smollm2_dir), "--label", "dense", "--label", "again", "--out", str(out),
         "--preset", "quick", "--lambada-limit", "20", "--arc-limit", "10",
         "--passkey-trials", "4", "--passkey-lengths", "256,512", "--short-windows", "2",
         "--short-len", "512", "--long-windows", "1", "--long-len", "1100",
         "--kv-cache-gb", "1"],
        capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "again: cached" in proc.stderr
    s = json.loads((out / "quality.json").read_text())
    dense, again = s["models"]
    assert set(dense["perplexity"]) == {"wikitext", "python", "boolq", "gsm8k"}
    for col in again["perplexity"].values():
        assert col["ratio"] == 1.0
    assert again["tasks"]["lambada_openai"]["acc"]["diff"] == 0.0
    assert dense["tasks"]["lambada_openai"]["n"] == 20
    assert dense["tasks"]["arc_easy"]["n"] == 10
    assert [b["end"] for b in dense["positions"]["python"]] == [256, 1024, 1100]
    assert (out / "quality.png").stat().st_size > 10_000
    assert "| dense |" in (out / "quality.md").read_text()

    run = json.loads(next((out / "runs").glob("*.json")).read_text())
    rows = run["passkey"]["rows"]
    assert len(rows) == 8
    found = [r["answer"].strip()[:5] == r["key"] for r in rows if r["length"] == 256]
    assert sum(found) >= 3, rows  # measured: the dense model finds every 256-token key
    cued = [r["cued_correct"] for r in rows if r["length"] == 256]
    assert sum(cued) >= 3, rows  # and every one with the answer cued
    assert "passkey 256 cued" in (out / "quality.md").read_text()

    # the same windows through the HF model: the served path's perplexity is the model's
    import torch

    from harp_vllm import models
    from harp_vllm.evaluation.perplexity import perplexity
    from harp_vllm.evaluation.quality import token_windows
    from harp_vllm.pruning.reference import load_model

    tok = models.load_tokenizer(smollm2_dir)
    wins = token_windows(tok, domain_text("wikitext", "report"), 512, 2)
    hf_ppl, _ = perplexity(load_model(smollm2_dir), torch.tensor(wins), progress=False)
    assert dense["perplexity"]["wikitext"]["value"] == pytest.approx(hf_ppl, rel=1e-3)
