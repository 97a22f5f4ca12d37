"""One model's long-context quality, through vLLM with the plugin (one engine per model).

For a model (dense or any checkpoint the plugin serves) this measures, with one in-process
``vllm.LLM`` (fp32, eager, prefix caching on):

- **perplexity per domain** (:mod:`.domains`, report parts only): ``short_windows`` windows of
  ``short_len`` tokens from the start of each domain's report text (for WikiText-2 test this is
  the same protocol as ``harp-vllm eval ppl --max-windows 8``), scored from vLLM's prompt
  log-probabilities;
- **perplexity by position** on ``long_windows`` windows of ``long_len`` tokens (the model's
  context less one) from the long-text domains, taken after the short windows: mean NLL of the
  tokens at positions [0, 256), [256, 1k), [1k, 4k), [4k, end), which shows whether distant
  context still helps;
- **LAMBADA** (OpenAI test file, all 5,153 items unless limited) and **ARC-Easy** through
  lm-eval's own vLLM model class and task definitions (``lambada_openai_local``,
  ``arc_easy_local``), per-item results kept for paired standard errors;
- **passkey retrieval** (:mod:`.tasks.passkey`) at the given lengths.

Per-window NLLs and per-item scores are stored so the report can give paired standard errors
of each ratio or difference to dense. Run as ``python -m harp_vllm.evaluation.quality MODEL
OPTIONS.json OUT.json`` (a fresh process per model: the engine's processes end with it);
:mod:`.quality_report` drives it for several models and writes the report.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

SCHEMA = "harp-vllm/quality-model/1"
BUCKETS = (0, 256, 1024, 4096)  # start of each position bucket; the last runs to the end


@dataclass
class QualityOptions:
    """What to measure; the defaults are the report's standard settings."""

    domains: tuple[str, ...] = ("wikitext", "python", "boolq", "gsm8k")
    short_windows: int = 8
    short_len: int = 2048
    long_domains: tuple[str, ...] = ("wikitext", "python")
    long_windows: int = 2
    long_len: int = 8191
    lambada_limit: int | None = None      # None: the whole test set (5,153)
    arc_limit: int | None = 1000
    passkey_lengths: tuple[int, ...] = (1024, 2048, 4096, 7168)
    passkey_trials: int = 50
    kv_cache_gb: float = 4.0
    seed: int = 0
    tasks: tuple[str, ...] = field(default=("lambada_openai", "arc_easy"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QualityOptions:
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    def max_model_len(self) -> int:
        from .tasks.passkey import ANSWER_TOKENS

        need = [self.short_len + 1, 4096]
        if self.long_windows:
            need.append(self.long_len + 1)
        if self.passkey_trials and self.passkey_lengths:
            need.append(max(self.passkey_lengths) + ANSWER_TOKENS + 1)
        return max(need)


def check_options(opts: QualityOptions) -> None:
    """Refuse settings that cannot run, before any engine starts."""
    from .domains import DOMAINS
    from .tasks.registry import TASKS

    for d in (*opts.domains, *opts.long_domains):
        if d not in DOMAINS:
            raise UserError(f"unknown domain {d!r}; available: {', '.join(DOMAINS)}")
    for t in opts.tasks:
        if t not in TASKS:
            raise UserError(f"unknown task {t!r}; available: {', '.join(TASKS)}")
    if opts.short_windows < 1 or opts.short_len < 16:
        raise UserError("need at least one short window of at least 16 tokens")
    if opts.long_windows and opts.long_len <= BUCKETS[1]:
        raise UserError(f"long windows must be longer than {BUCKETS[1]} tokens "
                        f"(got {opts.long_len})")
    if opts.passkey_trials < 0:
        raise UserError("--passkey-trials must not be negative")


# --- scoring through the engine ------------------------------------------------------------

def prompt_nlls(llm: Any, windows: list[list[int]], progress: bool = True) -> list[list[float]]:
    """Next-token NLL of every position after the first, per window, from prompt logprobs."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=progress)
    result = []
    for w, o in zip(windows, outs, strict=True):
        lps = o.prompt_logprobs
        if lps is None or len(lps) != len(w):
            raise RuntimeError("vLLM returned no prompt logprobs for a window")
        result.append([-float(lps[i][tok].logprob) for i, tok in enumerate(w) if i > 0])
    return result


def cut_windows(ids: list[int], length: int, count: int, skip: int = 0) -> list[list[int]]:
    """``count`` non-overlapping windows of ``length`` tokens after the first ``skip`` tokens."""
    ids = ids[skip:]
    if len(ids) // length < count:
        raise UserError(f"text has {len(ids)} tokens after {skip}: fewer than {count} windows "
                        f"of {length}")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def token_windows(tokenizer: Any, text: str, length: int, count: int, skip: int = 0
                  ) -> list[list[int]]:
    """:func:`cut_windows` of ``text`` tokenized (no special tokens)."""
    return cut_windows(tokenizer(text, add_special_tokens=False)["input_ids"], length, count,
                       skip)


def bucket_nll(nll: list[float], buckets: tuple[int, ...] = BUCKETS) -> list[dict[str, Any]]:
    """Summed NLL and token count per position bucket (position = index of the predicted
    token, 1..len)."""
    out = []
    edges = [*(b for b in buckets if b <= len(nll)), len(nll) + 1]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        vals = [v for pos, v in enumerate(nll, start=1) if lo <= pos < hi]
        out.append({"start": lo, "end": hi, "nll_sum": sum(vals), "tokens": len(vals)})
    return out


def _chars_for(tokens: int) -> int:
    return tokens * 6 + 20_000  # generous: under 6 characters per token for every domain


def perplexity_columns(llm: Any, tokenizer: Any, opts: QualityOptions, log: Any
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-domain short-window perplexity and per-bucket long-window NLL."""
    from .domains import domain_text

    short: dict[str, Any] = {}
    long: dict[str, Any] = {}
    for d in dict.fromkeys((*opts.domains, *opts.long_domains)):
        n_short = opts.short_windows * opts.short_len
        n_long = opts.long_windows * opts.long_len if d in opts.long_domains else 0
        text = domain_text(d, "report", max_chars=None if d == "wikitext"
                           else _chars_for(n_short + n_long))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # once for both cuts
        if d in opts.domains:
            t0 = time.perf_counter()
            wins = cut_windows(ids, opts.short_len, opts.short_windows)
            nll = prompt_nlls(llm, wins)
            means = [sum(x) / len(x) for x in nll]
            mean = sum(map(sum, nll)) / sum(map(len, nll))
            short[d] = {"windows": len(wins), "seq_len": opts.short_len,
                        "perplexity": math.exp(mean), "mean_nll": mean,
                        "window_mean_nll": means, "seconds": time.perf_counter() - t0}
            log(f"  {d}: perplexity {math.exp(mean):.3f} ({len(wins)} x {opts.short_len})")
        if n_long:
            t0 = time.perf_counter()
            wins = cut_windows(ids, opts.long_len, opts.long_windows, skip=n_short)
            nll = prompt_nlls(llm, wins)
            long[d] = {"windows": len(wins), "seq_len": opts.long_len,
                       "buckets": [bucket_nll(x) for x in nll],
                       "seconds": time.perf_counter() - t0}
            log(f"  {d}: {len(wins)} long windows of {opts.long_len}")
    return short, long


def task_columns(lm: Any, opts: QualityOptions, log: Any) -> dict[str, Any]:
    """LAMBADA / ARC-Easy through lm-eval on the same engine; per-item scores kept."""
    import logging

    import lm_eval

    from .tasks.registry import TASKS
    from .tasks.runner import _task_manager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    tm = _task_manager("local")
    out: dict[str, Any] = {}
    limits = {"lambada_openai": opts.lambada_limit, "arc_easy": opts.arc_limit}
    for name in opts.tasks:
        t0 = time.perf_counter()
        lm_task = TASKS[name].local_task
        limit = limits.get(name)
        res = lm_eval.simple_evaluate(model=lm, tasks=[lm_task], limit=limit, task_manager=tm,
                                      bootstrap_iters=0, log_samples=True,
                                      fewshot_random_seed=1234)
        if res is None:
            raise UserError("lm-eval returned no results")
        samples = sorted(res["samples"][lm_task], key=lambda s: s["doc_id"])
        items: dict[str, list[float]] = {}
        for metric in ("acc", "acc_norm", "perplexity"):
            if samples and metric in samples[0]:
                items[metric] = [_item_value(s[metric]) for s in samples]
        r = res["results"][lm_task]
        out[name] = {"n": len(samples), "limit": limit,
                     "metrics": {k.split(",")[0]: float(v) for k, v in r.items()
                                 if "," in k and "_stderr" not in k
                                 and isinstance(v, int | float)},
                     "items": items, "seconds": time.perf_counter() - t0}
        log(f"  {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in out[name]["metrics"].items())
            + f" (n = {len(samples)})")
    return out


def _item_value(v: Any) -> float:
    # lm-eval keeps perplexity items as (loglikelihood, ...) pairs; accuracies as numbers
    if isinstance(v, list | tuple):
        return float(v[0])
    return float(v)


def passkey_column(llm: Any, tokenizer: Any, opts: QualityOptions) -> dict[str, Any]:
    from .tasks.passkey import accuracy_by_length, passkey_on

    t0 = time.perf_counter()
    lengths = list(opts.passkey_lengths)
    # cued: each trial asked again with the answer's opening given (one prefix-cache hit):
    # retrieval apart from the answer's format (dense SmolLM2 at 2k opens its answer with " "
    # over " the" / " a" by 0.02-0.26 in probability)
    rows = passkey_on(llm, tokenizer, lengths, opts.passkey_trials, opts.seed, cued=True)
    return {"lengths": accuracy_by_length(rows, lengths, items=True), "rows": rows,
            "seconds": time.perf_counter() - t0}


def evaluate_model(model: str, opts: QualityOptions, log: Any = print) -> dict[str, Any]:
    """Every column for one model, with one engine (call from a fresh process)."""
    from .. import models
    from .tasks import backends

    check_options(opts)
    t0 = time.time()
    path = models.resolve(model)
    tokenizer = models.load_tokenizer(path)
    lm = backends.make_vllm_lm(str(path), max_model_len=opts.max_model_len(), seed=opts.seed,
                               max_gen_toks=16, kv_cache_gb=opts.kv_cache_gb,
                               extra={"enable_prefix_caching": True})
    llm = lm.model
    started = time.time() - t0
    log(f"{model}: engine ready in {started:.0f} s")
    short, long = perplexity_columns(llm, tokenizer, opts, log)
    tasks = task_columns(lm, opts, log)
    passkey = passkey_column(llm, tokenizer, opts) if opts.passkey_trials else {}
    if passkey:
        log("  passkey: " + ", ".join(f"{k} {v['accuracy']:.2f}"
                                      for k, v in passkey["lengths"].items()))
    kv_tokens = None
    with contextlib.suppress(AttributeError, TypeError):  # what the engine allocated
        kv_tokens = int(llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
                        * llm.llm_engine.vllm_config.cache_config.block_size)
    return {"schema": SCHEMA, "model": model, "path": str(path), "options": opts.to_dict(),
            "vllm_kv_cache_tokens": kv_tokens, "env": {
                k: os.environ.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND",
                                               "VLLM_CPU_KVCACHE_SPACE",
                                               "VLLM_ENABLE_V1_MULTIPROCESSING")},
            "perplexity": short, "positions": long, "tasks": tasks, "passkey": passkey,
            "seconds": time.time() - t0, "seconds_engine_start": started}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m harp_vllm.evaluation.quality MODEL OPTIONS.json OUT.json",
              file=sys.stderr)
        return 2
    model, opts_file, out_file = argv
    opts = QualityOptions.from_dict(json.loads(Path(opts_file).read_text()))
    try:
        payload = evaluate_model(model, opts, log=lambda m: print(m, file=sys.stderr,
                                                                  flush=True))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = Path(out_file)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload) + "\n")
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
