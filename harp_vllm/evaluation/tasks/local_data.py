"""Loaders for the local task files, in the schema of the hub datasets lm-eval's tasks expect.

Each function is an lm-eval ``custom_dataset`` (named in a task YAML by ``!function``): it reads
one local file under :func:`harp_vllm.paths.data_dir` and returns a ``datasets.DatasetDict``
whose split name and fields are those of the hub dataset lm-eval's own task reads, so the
task's prompt template, choices, target and metric apply unchanged. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .registry import TASKS, TaskDataError, task_files


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}:{n}: not valid JSON ({e.msg})") from e
    return rows


def _rows(task: str) -> list[dict[str, Any]]:
    """The rows of ``task``'s (single) local file; a clear error if it is missing."""
    (path,) = task_files(task, must_exist=True)
    return _read_jsonl(path)


def _dataset(task: str, docs: list[dict[str, Any]]):
    import datasets

    return datasets.DatasetDict({TASKS[task].split: datasets.Dataset.from_list(docs)})


def _field(row: dict, key: str, task: str, n: int):
    try:
        return row[key]
    except KeyError:
        raise TaskDataError(f"{task}: record {n} has no field {key!r} "
                            f"(fields: {', '.join(sorted(row))})") from None


def _ai2_mc(task: str, row: dict, n: int) -> dict[str, Any]:
    """AI2 jsonl ``{"id", "question": {"stem", "choices": [{"text","label"}]}, "answerKey"}``."""
    q = _field(row, "question", task, n)
    choices = q["choices"]
    return {
        "id": row.get("id", str(n)),
        "stem": q["stem"],
        "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
        "answerKey": _field(row, "answerKey", task, n),
    }


def _arc(task: str):
    docs = []
    for n, row in enumerate(_rows(task)):
        d = _ai2_mc(task, row, n)
        # allenai/ai2_arc: {"id", "question": str, "choices": {"text", "label"}, "answerKey"}
        docs.append({"id": d["id"], "question": d["stem"], "choices": d["choices"],
                     "answerKey": d["answerKey"]})
    return _dataset(task, docs)


def arc_easy(**_: Any):
    return _arc("arc_easy")


def arc_challenge(**_: Any):
    return _arc("arc_challenge")


def openbookqa(**_: Any):
    docs = []
    for n, row in enumerate(_rows("openbookqa")):
        d = _ai2_mc("openbookqa", row, n)
        # allenai/openbookqa "main": {"id", "question_stem", "choices": {...}, "answerKey"}
        docs.append({"id": d["id"], "question_stem": d["stem"], "choices": d["choices"],
                     "answerKey": d["answerKey"]})
    return _dataset("openbookqa", docs)


def lambada_openai(**_: Any):
    return _dataset("lambada_openai",
                    [{"text": _field(r, "text", "lambada_openai", n)}
                     for n, r in enumerate(_rows("lambada_openai"))])


def winogrande(**_: Any):
    docs = []
    for n, r in enumerate(_rows("winogrande")):
        answer = str(_field(r, "answer", "winogrande", n))
        if answer not in ("1", "2"):
            raise TaskDataError(f"winogrande: record {n} has answer {answer!r}, not '1' or '2'")
        docs.append({"sentence": r["sentence"], "option1": r["option1"],
                     "option2": r["option2"], "answer": answer})
    return _dataset("winogrande", docs)


def boolq(**_: Any):
    docs = []
    for n, r in enumerate(_rows("boolq")):
        label = str(_field(r, "label", "boolq", n)).lower()
        if label not in ("true", "false"):
            raise TaskDataError(f"boolq: record {n} has label {label!r}, not true/false")
        # aps/super_glue boolq: label 1 = True ("yes"), 0 = False ("no")
        docs.append({"question": r["question"], "passage": r["passage"],
                     "idx": r.get("idx", n), "label": int(label == "true")})
    return _dataset("boolq", docs)


def gsm8k(**_: Any):
    return _dataset("gsm8k", [{"question": _field(r, "question", "gsm8k", n),
                               "answer": _field(r, "answer", "gsm8k", n)}
                              for n, r in enumerate(_rows("gsm8k"))])


_TQA_PREFIX, _TQA_SUFFIX = "Question: ", "\nAnswer:"


def triviaqa(**_: Any):
    docs = []
    for n, r in enumerate(_rows("triviaqa")):
        ctx = _field(r, "context", "triviaqa", n)
        if not (ctx.startswith(_TQA_PREFIX) and ctx.endswith(_TQA_SUFFIX)):
            raise TaskDataError(f"triviaqa: record {n} context is not "
                                f"'Question: ...\\nAnswer:': {ctx[:60]!r}")
        question = ctx[len(_TQA_PREFIX):-len(_TQA_SUFFIX)].strip()
        aliases = list(r.get("aliases") or [])
        value = r.get("answer", aliases[0] if aliases else "")
        if value and value not in aliases:
            aliases.append(value)
        # mandarjoshi/trivia_qa rc.nocontext: {"question", "answer": {"aliases", "value", ...}}
        docs.append({"question": question, "answer": {"aliases": aliases, "value": value}})
    return _dataset("triviaqa", docs)
