"""The downstream tasks ``harp-vllm eval tasks`` knows, their local files and what to report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...errors import UserError
from ...paths import DATA_ENV, data_dir

GENERATION = "generation"
DISCRIMINATIVE = "discriminative"


class TaskDataError(UserError):
    """A task's local data is missing or malformed, or a task name is unknown."""


@dataclass(frozen=True)
class TaskInfo:
    name: str                   # the name users type (= lm-eval's own task name)
    kind: str                   # GENERATION or DISCRIMINATIVE (the grouping of issue 10)
    files: tuple[str, ...]      # under data_dir(); the first one is read
    split: str                  # the split lm-eval's own task scores (test or validation)
    n_items: int                # items in the local file
    # metrics shown in tables, "metric,filter" as lm-eval names them; the first is the headline
    report: tuple[str, ...] = field(default=("acc,none",))

    @property
    def local_task(self) -> str:
        """Name of the task YAML (in lm_eval_tasks/) that reads the local file."""
        return f"{self.name}_local"


TASKS: dict[str, TaskInfo] = {t.name: t for t in [
    TaskInfo("lambada_openai", GENERATION, ("lambada_openai/lambada_test.jsonl",), "test", 5153,
             ("acc,none", "perplexity,none")),
    TaskInfo("gsm8k", GENERATION, ("gsm8k/test.jsonl",), "test", 1319,
             ("exact_match,flexible-extract", "exact_match,strict-match")),
    TaskInfo("triviaqa", GENERATION, ("triviaqa_mosaicml_sm_sub/triviaqa_sm_sub.jsonl",),
             "validation", 3000, ("exact_match,remove_whitespace",)),
    TaskInfo("arc_easy", DISCRIMINATIVE, ("ai2_arc/ARC-Easy-Test.jsonl",), "test", 2376,
             ("acc,none", "acc_norm,none")),
    TaskInfo("arc_challenge", DISCRIMINATIVE, ("ai2_arc/ARC-Challenge-Test.jsonl",), "test",
             1172, ("acc_norm,none", "acc,none")),
    TaskInfo("winogrande", DISCRIMINATIVE, ("winogrande_1.1/dev.jsonl",), "validation", 1267),
    TaskInfo("openbookqa", DISCRIMINATIVE, ("openbookqa/test.jsonl",), "test", 500,
             ("acc_norm,none", "acc,none")),
    TaskInfo("boolq", DISCRIMINATIVE, ("boolq_superglue/val.jsonl",), "validation", 3270),
]}

TASK_YAML_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"


def task_files(name: str, must_exist: bool = False) -> list[Path]:
    """Absolute paths of ``name``'s local files; with ``must_exist`` a clear error if absent."""
    info = get_task(name)
    root = data_dir()
    paths = [root / f for f in info.files]
    if must_exist:
        missing = [p for p in paths if not p.is_file()]
        if missing:
            have = available_local_tasks()
            raise TaskDataError(
                f"task {name!r}: local data file(s) missing: {', '.join(map(str, missing))} "
                f"(data dir {root}; set ${DATA_ENV} to point elsewhere, or use --data hub). "
                f"Tasks whose local data is present: {', '.join(have) if have else 'none'}. "
                f"All tasks: {', '.join(TASKS)}.")
    return paths


def available_local_tasks() -> list[str]:
    root = data_dir()
    return [n for n, t in TASKS.items() if all((root / f).is_file() for f in t.files)]


def get_task(name: str) -> TaskInfo:
    try:
        return TASKS[name]
    except KeyError:
        raise TaskDataError(f"unknown task {name!r}; available: {', '.join(TASKS)} "
                            f"(or 'all', 'generation', 'discriminative')") from None


def parse_task_list(spec: str) -> list[str]:
    """``"arc_easy,gsm8k"``, ``"all"``, ``"generation"`` or ``"discriminative"`` -> names."""
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part == "all":
            names = list(TASKS)
        elif part in (GENERATION, DISCRIMINATIVE):
            names = [n for n, t in TASKS.items() if t.kind == part]
        else:
            names = [get_task(part).name]
        out += [n for n in names if n not in out]
    if not out:
        raise TaskDataError(f"no task given; available: {', '.join(TASKS)}")
    return out
