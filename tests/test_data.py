from pathlib import Path

import pytest

from harp_vllm.errors import UserError
from harp_vllm.evaluation import data


def test_wikitext_rows_match_hf_layout():
    raw = " \n = Title = \n \n Body text .\n"
    assert data.wikitext_rows(raw) == ["", " = Title = \n", "", " Body text .\n"]


def test_local_wikitext_test_split_has_hf_row_count():
    text = data.load_text("wikitext2", "test")
    assert text.count("\n\n") >= 4358 - 1  # 4358 HF rows joined with "\n\n"
    assert text.startswith("\n\n = Robert Boulter = \n")


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "data file not found"), (b"", "data file is empty"), (b"  \n\n", "data file is empty"),
     (b"abc\x00def", "not a text file"), (b"\xff\xfe\xfa bad", "not UTF-8 text")],
)
def test_read_text_file_errors(tmp_path: Path, content, message):
    p = tmp_path / "f.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(UserError, match=message):
        data.read_text_file(p)


def test_unknown_dataset_and_split():
    with pytest.raises(UserError, match="available: wikitext2"):
        data.load_text("ptb")
    with pytest.raises(UserError, match="not available locally"):
        data.load_text("wikitext2", "train")


def test_missing_data_dir_names_the_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("HARP_VLLM_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match="HARP_VLLM_DATA_DIR"):
        data.load_text("wikitext2", "test")
