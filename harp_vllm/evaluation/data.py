"""Evaluation and calibration text: local WikiText-2 files, the Hugging Face hub, or a user file.

Every source yields the rows of a split; rows are joined with ``"\\n\\n"`` (the standard
perplexity protocol used by GPTQ/SparseGPT/Wanda/FLAP and HARP's harness).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..paths import DATA_ENV, data_dir

# Local file of each WikiText-2 raw split (the training split is not available locally).
WIKITEXT2_FILES = {"test": "wiki.test.raw", "validation": "wiki.valid.raw"}
DATASETS = ("wikitext2", "hub:wikitext2")


def wikitext_rows(raw: str) -> list[str]:
    """Split a raw WikiText file into the rows of the HF ``wikitext-2-raw-v1`` dataset.

    HF keeps each line with its newline and turns blank lines (a lone space) into "".
    """
    return [line if line.strip() else "" for line in raw.splitlines(keepends=True)]


def read_text_file(path: str | Path) -> str:
    """Read a user text file, with one clear error for missing, empty or non-text files."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"data file not found: {p}")
    if p.is_dir():
        raise UserError(f"data file is a directory, not a text file: {p}")
    raw = p.read_bytes()
    if not raw.strip():
        raise UserError(f"data file is empty: {p}")
    if b"\x00" in raw:
        raise UserError(f"data file is not a text file (it contains NUL bytes): {p}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data file is not UTF-8 text ({e.reason} at byte {e.start}): {p}") from e


def load_text(dataset: str = "wikitext2", split: str = "test") -> str:
    """The text of a dataset split, rows joined with ``"\\n\\n"``.

    ``wikitext2`` reads the local raw files under the data directory; ``hub:wikitext2`` loads
    ``wikitext/wikitext-2-raw-v1`` with ``datasets`` (needs the hub; has a train split too).
    """
    if dataset == "wikitext2":
        if split not in WIKITEXT2_FILES:
            raise UserError(
                f"split {split!r} of wikitext2 is not available locally "
                f"(have: {', '.join(WIKITEXT2_FILES)}); use --data hub:wikitext2 for the hub"
            )
        path = data_dir() / "wikitext-2-raw" / WIKITEXT2_FILES[split]
        if not path.is_file():
            raise UserError(
                f"WikiText-2 file not found: {path} (set {DATA_ENV} to the folder holding "
                "wikitext-2-raw/, or use --data hub:wikitext2)"
            )
        return "\n\n".join(wikitext_rows(path.read_text(encoding="utf-8")))
    if dataset == "hub:wikitext2":
        try:
            import datasets
        except ImportError as e:
            raise UserError("--data hub:wikitext2 needs the 'datasets' package (pip install "
                            "'harp-vllm[hub]')") from e
        try:
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        except Exception as e:  # network, missing split, ...
            raise UserError(f"could not load wikitext-2-raw-v1 [{split}] from the hub: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
        return "\n\n".join(ds["text"])
    raise UserError(f"unknown dataset {dataset!r}; available: {', '.join(DATASETS)}")
