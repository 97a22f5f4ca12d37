"""Text of several domains for perplexity, each split into a development and a report part.

WikiText-2 alone is one domain (Wikipedia prose). The quality report scores perplexity on it
and on text of other kinds that is available offline; calibration and every choice of a
default may read a domain's **dev** part, never its **report** part (for WikiText: validation
is dev, test is report).

- ``wikitext``: WikiText-2 raw (validation = dev, test = report), rows joined as in
  :mod:`harp_vllm.evaluation.data`.
- ``python``: the Python standard library's own source files (``*.py`` directly under the
  running interpreter's stdlib folder and its packages, tests excluded). A file belongs to dev
  or report by a hash of its relative path (a quarter dev), so both parts are stable.
- ``boolq``: BoolQ's Wikipedia passages (SuperGLUE validation file), deduplicated; encyclopedic
  but other articles and style than WikiText. Split by a hash of the passage.
- ``gsm8k``: GSM8K's grade-school word problems with their worked solutions (test file);
  split by a hash of the question.

Items of a part are ordered by their hash (a deterministic shuffle) and joined with blank
lines; :func:`domain_text` stops adding items once ``max_chars`` characters are reached, so a
caller that needs a few windows does not tokenize the whole standard library.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserError
from ..paths import DATA_ENV, data_dir
from .data import load_text

DOMAINS = ("wikitext", "python", "boolq", "gsm8k")
PARTS = ("dev", "report")
DEV_SHARE = 4  # one item in DEV_SHARE goes to dev


def _hash(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


def _part_of(key: str) -> str:
    return "dev" if int(_hash(key)[:8], 16) % DEV_SHARE == 0 else "report"


def _data_file(rel: str) -> Path:
    path = data_dir() / rel
    if not path.is_file():
        raise UserError(f"data file not found: {path} (set {DATA_ENV} to the folder holding "
                        f"{rel.split('/')[0]}/)")
    return path


def _jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _python_items() -> Iterator[tuple[str, str]]:
    root = stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("test/", "idlelib/idle_test/", "lib2to3/tests/", "site-packages/")) \
                or "/tests/" in rel or "/test/" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield rel, text


def _boolq_items() -> Iterator[tuple[str, str]]:
    seen: set[str] = set()
    for row in _jsonl(_data_file("boolq_superglue/val.jsonl")):
        passage = str(row.get("passage", "")).strip()
        if passage and passage not in seen:
            seen.add(passage)
            yield passage, passage


def _gsm8k_items() -> Iterator[tuple[str, str]]:
    for row in _jsonl(_data_file("gsm8k/test.jsonl")):
        q, a = str(row.get("question", "")).strip(), str(row.get("answer", "")).strip()
        if q:
            yield q, f"Question: {q}\nAnswer: {a}"


def domain_text(domain: str, part: str, max_chars: int | None = None) -> str:
    """The text of ``domain``'s ``part`` (dev or report), at most about ``max_chars``."""
    if part not in PARTS:
        raise UserError(f"unknown part {part!r}; use one of {', '.join(PARTS)}")
    if domain == "wikitext":
        text = load_text("wikitext2", "validation" if part == "dev" else "test")
        return text if max_chars is None else text[:max_chars]
    sources = {"python": _python_items, "boolq": _boolq_items, "gsm8k": _gsm8k_items}
    if domain not in sources:
        raise UserError(f"unknown domain {domain!r}; available: {', '.join(DOMAINS)}")
    items = sorted((_hash(key), text) for key, text in sources[domain]()
                   if _part_of(key) == part)
    out: list[str] = []
    size = 0
    for _, text in items:
        out.append(text)
        size += len(text) + 2
        if max_chars is not None and size >= max_chars:
            break
    if not out:
        raise UserError(f"domain {domain!r} has no {part} text")
    return "\n\n".join(out)


def describe() -> dict[str, str]:
    """Where each domain's text comes from (recorded in reports)."""
    return {
        "wikitext": "WikiText-2 raw: validation = dev, test = report",
        "python": f"Python {sys.version.split()[0]} standard library *.py (tests excluded), "
                  f"{stdlib_dir()}; 1/{DEV_SHARE} of files (by path hash) dev",
        "boolq": f"BoolQ validation passages, deduplicated; 1/{DEV_SHARE} (by hash) dev",
        "gsm8k": f"GSM8K test problems with solutions; 1/{DEV_SHARE} (by hash) dev",
    }
