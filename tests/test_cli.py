"""CLI behaviour: bad input ends with one clear line and a non-zero exit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harp_vllm.cli import app

runner = CliRunner()


def run_cli(*args: str):
    return runner.invoke(app, list(args))


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "data file not found"), (b"", "data file is empty"),
     (b"\x89PNG\r\n\x1a\n\x00\x00", "not a text file")],
)
def test_eval_ppl_bad_data_file(tiny_llama, tmp_path, content, message):
    f = tmp_path / "input.txt"
    if content is not None:
        f.write_bytes(content)
    res = run_cli("eval", "ppl", "--model", str(tiny_llama), "--data-file", str(f))
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], res.output


def test_eval_ppl_model_dir_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    res = run_cli("eval", "ppl", "--model", str(tmp_path / "m"), "--seq-len", "64")
    assert res.exit_code == 2
    assert "model directory has no config.json" in res.output
    assert len([line for line in res.output.splitlines() if line.strip()]) == 1


def test_eval_ppl_writes_json(tiny_llama, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 50)
    out = tmp_path / "r.json"
    res = run_cli("eval", "ppl", "--model", str(tiny_llama), "--data-file", str(f),
                  "--seq-len", "64", "--out", str(out))
    assert res.exit_code == 0, res.output
    payload = json.loads(out.read_text())
    assert payload["seq_len"] == 64 and payload["windows"] >= 1 and payload["perplexity"] > 1


def test_console_script_reports_error_in_one_line(tmp_path):
    """The installed console script, in a real process: one line on stderr, exit 2."""
    exe = Path(sys.executable).parent / "harp-vllm"
    proc = subprocess.run([str(exe), "eval", "ppl", "--model", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "no config.json" in proc.stderr
