"""`harp-vllm eval tasks`: task configs, local loaders, errors, and one end-to-end vLLM run."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import lm_eval  # a test dependency (pyproject's "test" extra): missing means failing
import pytest
from typer.testing import CliRunner

from harp_vllm.evaluation.tasks import registry
from harp_vllm.evaluation.tasks.registry import DISCRIMINATIVE, GENERATION, TASKS, TaskDataError
from harp_vllm.evaluation.tasks.runner import SCHEMA
from harp_vllm.paths import data_dir

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
BUILTIN_YAML = {
    "lambada_openai": "lambada/lambada_openai.yaml",
    "gsm8k": "gsm8k/gsm8k.yaml",
    "triviaqa": "triviaqa/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "winogrande": "winogrande/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "boolq": "super_glue/boolq/default.yaml",
}
# Everything that decides what the model sees and how it is scored.
SCORING_FIELDS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice",
                  "target_delimiter", "fewshot_delimiter", "metric_list", "generation_kwargs",
                  "filter_list", "num_fewshot", "repeats")



def test_every_task_has_local_data():
    """The README's set-up provides every task's data (the data directory): missing data fails
    here, and in every test that reads it, rather than skipping them."""
    have = registry.available_local_tasks()
    assert set(have) >= set(TASKS), f"task data missing under {data_dir()}: " \
        f"{sorted(set(TASKS) - set(have))}"


def _same(a, b) -> bool:
    if callable(a) and callable(b):  # lm-eval's own preprocess functions, loaded twice
        return (a.__name__ == b.__name__ and a.__code__.co_code == b.__code__.co_code)
    return a == b


def test_registry_groups_and_yaml_files():
    assert [n for n, t in TASKS.items() if t.kind == GENERATION] == [
        "lambada_openai", "gsm8k", "triviaqa"]
    assert {n for n, t in TASKS.items() if t.kind == DISCRIMINATIVE} == {
        "arc_easy", "arc_challenge", "winogrande", "openbookqa", "boolq"}
    for info in TASKS.values():
        assert (registry.TASK_YAML_DIR / f"{info.local_task}.yaml").is_file()
    assert registry.parse_task_list("generation,boolq") == [
        "lambada_openai", "gsm8k", "triviaqa", "boolq"]
    with pytest.raises(TaskDataError, match="available: lambada_openai, gsm8k"):
        registry.parse_task_list("hellaswag")


@pytest.mark.parametrize("name", list(TASKS))
def test_local_task_uses_lm_evals_prompt_and_metrics(name):
    from lm_eval.tasks._yaml_loader import load_yaml

    ours = load_yaml(registry.TASK_YAML_DIR / f"{TASKS[name].local_task}.yaml")
    theirs = load_yaml(LM_EVAL_TASKS / BUILTIN_YAML[name])
    for key in SCORING_FIELDS:
        assert _same(ours.get(key), theirs.get(key)), f"{name}: {key} differs from lm-eval's"
    # and the split we fill is the one lm-eval's task scores
    scored = theirs.get("test_split") and "test" or "validation"
    assert TASKS[name].split == scored
    assert (ours.get(f"{scored}_split") == theirs.get(f"{scored}_split"))


def test_local_files_load_in_the_hub_schema():
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(registry.TASK_YAML_DIR), include_defaults=False)
    loaded = tm.load([t.local_task for t in TASKS.values()])["tasks"]
    seen = {}
    for name, info in TASKS.items():
        task = loaded[info.local_task]
        docs = list(task.eval_docs)
        assert len(docs) == info.n_items, name
        seen[name] = (task, docs)
    task, docs = seen["arc_easy"]
    assert task.doc_to_text(docs[0]).startswith("Question: Which statement best explains why "
                                                "photosynthesis")
    assert task.doc_to_target(docs[0]) == 0 and len(task.doc_to_choice(docs[0])) == 4
    task, docs = seen["openbookqa"]
    assert task.doc_to_target(docs[0]) == 1  # "8-343", answer B
    task, docs = seen["boolq"]
    assert sum(d["label"] for d in docs) == 2033  # SOURCE.md: 2033 true / 1237 false
    task, docs = seen["winogrande"]
    # partial scoring: doc_to_text is the gold option's index, 639 of the answers are "2"
    assert sum(task.doc_to_text(d) for d in docs) == 639
    task, docs = seen["triviaqa"]
    assert task.doc_to_text(docs[0]) == ("Question: Brunswick, Lancastrian and Pearl Pickler "
                                         "are types of which vegetable??\nAnswer:")
    assert "Onion" in task.doc_to_target(docs[0])
    task, docs = seen["lambada_openai"]
    assert task.doc_to_target(docs[0]) == " signs"


def _cli(*args, env=None):
    from harp_vllm.cli import app

    return CliRunner().invoke(app, ["eval", "tasks", *args], env=env)


def test_unknown_task_lists_the_available_ones():
    res = _cli("--model", "smollm2-135m", "--tasks", "arc_easy,hellaswag")
    assert res.exit_code == 2
    out = res.output
    assert "unknown task 'hellaswag'" in out
    for name in TASKS:
        assert name in out


def test_missing_data_lists_what_is_there(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    res = _cli("--model", "smollm2-135m", "--tasks", "gsm8k,boolq",
               env={"HARP_VLLM_DATA_DIR": str(tmp_path)})
    assert res.exit_code == 2
    out = " ".join(res.output.split())
    assert "task 'boolq': local data file(s) missing" in out
    assert "boolq_superglue/val.jsonl" in out
    assert "Tasks whose local data is present: gsm8k." in out
    assert "HARP_VLLM_DATA_DIR" in out


def test_bad_limit_and_backend_options():
    res = _cli("--model", "m", "--tasks", "gsm8k", "--limit", "gsm8k=x")
    assert res.exit_code == 2 and "not N or TASK=N" in res.output
    res = _cli("--model", "m", "--tasks", "gsm8k", "--backend", "openai")
    assert res.exit_code == 2 and "needs --base-url" in res.output


def check_payload(payload: dict) -> list[str]:
    """Problems with a result payload's structure or ranges (empty list: fine)."""
    problems = []
    if payload.get("schema") != SCHEMA:
        problems.append(f"schema is {payload.get('schema')!r}, not {SCHEMA!r}")
    tasks = payload.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        return [*problems, "no tasks"]
    for name, t in tasks.items():
        if name not in TASKS:
            problems.append(f"unknown task {name!r}")
            continue
        if t.get("kind") != TASKS[name].kind:
            problems.append(f"{name}: kind {t.get('kind')!r}")
        if not isinstance(t.get("n"), int) or t["n"] <= 0:
            problems.append(f"{name}: n {t.get('n')!r}")
        if not t.get("report"):
            problems.append(f"{name}: no headline metric")
        for key, m in t.get("metrics", {}).items():
            v, se = m.get("value"), m.get("stderr")
            lo, hi = (1.0, math.inf) if key.startswith("perplexity") else (0.0, 1.0)
            if not isinstance(v, float) or not lo <= v <= hi:
                problems.append(f"{name}: {key} = {v!r} outside [{lo}, {hi}]")
            if se is not None and not (isinstance(se, float) and se >= 0):
                problems.append(f"{name}: {key} stderr = {se!r}")
    return problems


def test_in_process_engine_env_binds_every_core_unless_set(monkeypatch):
    """The engine runs in this process; vLLM's "auto" binding would keep one of this
    machine's two cores for an API server the in-process engine does not have; an explicit
    setting is left as it is."""
    import os

    from harp_vllm.evaluation.tasks.backends import engine_env

    keys = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
            "VLLM_ENABLE_V1_MULTIPROCESSING")
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    engine_env(1.5)
    cores = sorted(os.sched_getaffinity(0))
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "1.5"
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # the engine in this process
    assert [int(c) for c in os.environ["VLLM_CPU_OMP_THREADS_BIND"].split(",")] == cores
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    engine_env(1.5)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "4"


def test_report_table_and_payload_check():
    from harp_vllm.evaluation.tasks.report import markdown_table

    payload = {"schema": SCHEMA, "model": "m", "tasks": {
        "gsm8k": {"kind": GENERATION, "n": 10, "num_fewshot": 5, "report": ["x"], "metrics": {
            "exact_match,strict-match": {"value": 0.1, "stderr": 0.1},
            "exact_match,flexible-extract": {"value": 0.2, "stderr": 0.13}}},
        "boolq": {"kind": DISCRIMINATIVE, "n": 10, "num_fewshot": 0, "report": ["acc,none"],
                  "metrics": {"acc,none": {"value": 0.6, "stderr": 0.16}}}}}
    assert check_payload(payload) == []
    table = markdown_table([payload, {**payload, "label": "other"}])
    assert "| generation | GSM8K | exact_match / flexible-extract | 10 | 5 | 20.0 ± 13.0 |" \
        in table
    assert table.index("GSM8K") < table.index("BoolQ")
    assert table.splitlines()[0].endswith("| m | other |")
    payload["tasks"]["boolq"]["metrics"]["acc,none"]["value"] = 1.5
    assert any("outside" in p for p in check_payload(payload))


# --- end to end: lm-eval's vLLM backend in-process, our plugin, a HARP-pruned SmolLM2 -------

@pytest.fixture(scope="module")
def pruned_smollm2(smollm2_harp8) -> Path:
    """The session's HARP P=8 SmolLM2 (tests/conftest.py)."""
    return smollm2_harp8


@pytest.mark.real_model
@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_eval_tasks_end_to_end_on_pruned_checkpoint(pruned_smollm2, tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "harp_vllm.cli", "eval", "tasks", "--model", str(pruned_smollm2),
         "--tasks", "arc_easy,triviaqa", "--limit", "32", "--limit", "triviaqa=8",
         "--max-model-len", "1024", "--out", str(out), "--samples-out", str(tmp_path / "s")],
        env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"eval tasks end to end: {time.time() - t0:.0f} s")
    payload = json.loads(out.read_text())
    assert check_payload(payload) == []
    assert payload["backend"] == "vllm" and payload["model_path"] == str(pruned_smollm2)
    arc, tqa = payload["tasks"]["arc_easy"], payload["tasks"]["triviaqa"]
    assert (arc["n"], arc["n_total"], arc["num_fewshot"]) == (32, 2376, 0)
    assert (tqa["n"], tqa["kind"]) == (8, GENERATION)
    acc = arc["metrics"]["acc,none"]
    assert 0.0 <= acc["value"] <= 1.0 and 0.0 < acc["stderr"] < 0.2
    # a pruned 135M model is still far above chance (25%) on ARC-Easy's first 32 items? Not
    # guaranteed; what must hold is that the scores are real per-item results:
    samples = [json.loads(line) for line in (tmp_path / "s" / "arc_easy.jsonl").open()]
    assert len(samples) == 32 and {s["acc"] for s in samples} <= {0.0, 1.0}
    assert sum(s["acc"] for s in samples) / 32 == pytest.approx(acc["value"])
    gens = [json.loads(line) for line in (tmp_path / "s" / "triviaqa.jsonl").open()]
    assert len(gens) == 8 and all(isinstance(g["filtered_resps"][0], str) for g in gens)
    assert "| discriminative | ARC-Easy | acc | 32 | 0 |" in proc.stdout


@pytest.mark.real_model
@pytest.mark.vllm
@pytest.mark.timeout(600)
def test_sigterm_stops_the_in_process_engine_too(smollm2_dir, tmp_path):
    """SIGTERM to `eval tasks` must not leave vLLM's EngineCore/Worker processes behind
    (the multi-process engine a user may choose with VLLM_ENABLE_V1_MULTIPROCESSING=1; by
    default the engine runs in the command's own process)."""
    import signal

    import psutil

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "harp_vllm.cli", "eval", "tasks", "--model", str(smollm2_dir),
         "--tasks", "arc_easy", "--limit", "400", "--max-model-len", "1024"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    engine: list = []
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.time() + 300
        while time.time() < deadline and not engine:
            time.sleep(2)
            engine = [c for c in parent.children(recursive=True)
                      if "VLLM" in " ".join(c.cmdline() or [c.name()])]
        assert engine, "the engine processes never started"
        time.sleep(5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        gone, alive = psutil.wait_procs(engine, timeout=60)
        assert alive == [], [p.pid for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in engine:  # never leave them behind, also when the test fails
            with contextlib.suppress(psutil.Error):
                p.kill()


def test_kv_cache_dtype_reaches_the_engine_and_is_checked(tmp_path, monkeypatch):
    """--kv-cache-dtype: fp8 goes to vllm.LLM's kwargs (through lm-eval's VLLM), auto adds
    nothing; a bad value and the openai backend (the server's setting) fail clearly."""
    from harp_vllm.evaluation.tasks import backends, runner

    res = _cli("--model", "m", "--tasks", "gsm8k", "--kv-cache-dtype", "fp4")
    assert res.exit_code == 2 and "unknown --kv-cache-dtype 'fp4'" in res.output
    res = _cli("--model", "m", "--tasks", "gsm8k", "--base-url", "http://127.0.0.1:1/v1",
               "--kv-cache-dtype", "fp8")
    assert res.exit_code == 2 and "the KV-cache dtype is the server's" in res.output

    seen: list[dict] = []

    class FakeVLLM:  # stands in for lm_eval.models.vllm_causallms.VLLM: no engine starts
        def __init__(self, **kwargs):
            seen.append(kwargs)
            raise runner.UserError("fake engine")

    monkeypatch.setattr(backends, "import_lm_eval_vllm", lambda: type("M", (), {"VLLM": FakeVLLM}))
    monkeypatch.setattr(runner, "_task_manager", lambda data: None)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    for kv in ("fp8", "auto"):
        res = _cli("--model", str(tmp_path / "model"), "--tasks", "gsm8k",
                   "--kv-cache-dtype", kv, env={"HARP_VLLM_DATA_DIR": str(tmp_path)})
        assert res.exit_code == 2 and "fake engine" in res.output, res.output
    assert seen[0]["kv_cache_dtype"] == "fp8" and seen[0]["pretrained"] == str(tmp_path / "model")
    assert "kv_cache_dtype" not in seen[1]  # auto: vLLM's own default
