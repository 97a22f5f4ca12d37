"""The whole A/B load test, in the order it runs: check both endpoints (``endpoints``), build
the prompts, then every planned step (``scenarios.plan``: the sweep, then the capacity
scenario) as one run on the dense and one on the pruned endpoint (A B A B ... per point,
repeated; ``vllm_bench.run_once``), stopping cleanly on Ctrl-C or when an endpoint fails every
request of a run.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

from harp_vllm.errors import UserError
from harp_vllm.models import load_tokenizer

from .endpoints import Endpoint, EndpointError, check_endpoint, check_prompt_tokens
from .prompts import PromptFactory, load_corpus_text
from .scenarios import Config, plan
from .vllm_bench import run_once


class _CtrlC:
    """Ctrl-C that a run cannot swallow. ``asyncio.run`` turns SIGINT into a cancellation of
    its main task, and a cancellation can be lost (Python 3.11's ``wait_for`` when the
    benchmark ends at that moment; the sampler's ``stop`` suppressing it); so the handler
    raises KeyboardInterrupt itself and sets a flag that is checked after every run."""

    def __init__(self) -> None:
        self.seen = False
        self._old: Any = None

    def _handler(self, signum, frame) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)

    def uninstall(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None

    def check(self) -> None:
        if self.seen:
            raise KeyboardInterrupt


def run_loadtest(cfg: Config, out_dir: Path, progress: bool = True,
                 on_update=None) -> dict:
    """Run the whole A/B test; always returns the results (status says how it ended).

    ``on_update(results)`` is called after every run (the CLI writes the partial report).
    Long because it is the whole A/B sequence (checks, sweeps, capacity waves) in the order
    it runs, each step a call.
    """
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "status": "running", "message": None, "config": cfg.as_dict(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "endpoints": {}, "notes": [],
        "runs": [],
    }
    bar = None
    log = (out_dir / "bench.log").open("a", encoding="utf-8")
    ctrl_c = _CtrlC()
    try:
        ctrl_c.install()
        dense = Endpoint("dense", cfg.dense_url, cfg.model_dense, cfg.metrics_url_dense)
        pruned = Endpoint("pruned", cfg.pruned_url, cfg.model_pruned, cfg.metrics_url_pruned)
        for ep in (dense, pruned):
            check_endpoint(ep, cfg.request_timeout)
            results["endpoints"][ep.label] = ep.describe()
        tok_name = cfg.tokenizer or dense.root or dense.served_model
        if tok_name is None:
            raise UserError("no tokenizer: the dense endpoint names no model; pass --tokenizer")
        results["tokenizer"] = tok_name
        tok = load_tokenizer(tok_name, hint="; pass --tokenizer with the served model's directory")
        factory = PromptFactory(tok, load_corpus_text(cfg.data, cfg.data_split, cfg.data_file),
                                seed=cfg.seed)
        probe = factory.make(64)
        for ep in (dense, pruned):
            check_prompt_tokens(ep, probe.text, probe.tokens, cfg.request_timeout)
        lens = [m for m in (dense.max_model_len, pruned.max_model_len) if m]
        steps, notes = plan(cfg, min(lens) if lens else None)
        results["notes"] += notes
        if not steps:
            raise UserError("nothing to run: " + "; ".join(notes))
        bar = tqdm(total=2 * len(steps), disable=not progress, unit="run", dynamic_ncols=True)
        for st in steps:
            prompts = [factory.make(st.prompt_len) for _ in range(st.n_requests)]
            for ep in (dense, pruned):
                bar.set_description(f"{st.scenario} {st.prompt_len} tok x{st.concurrency} "
                                    f"{ep.label} r{st.repeat + 1}")
                run = run_once(ep, prompts, st.concurrency, cfg, log)
                run.update(scenario=st.scenario, repeat=st.repeat, prompt_len=st.prompt_len,
                           n_requests=st.n_requests)
                results["runs"].append(run)
                bar.update(1)
                if on_update:
                    on_update(results)
                ctrl_c.check()
                if run["stats"]["ok"] == 0:
                    first = next((r["error"] for r in run["requests"] if r["error"]), "")
                    raise EndpointError(
                        f"{ep.label} endpoint {ep.url} failed all {st.n_requests} requests "
                        f"({st.prompt_len} tokens, concurrency {st.concurrency}): "
                        f"{first.splitlines()[-1] if first else 'no error text'}")
        results["status"] = "complete"
    except KeyboardInterrupt:
        # the interrupted run's client tasks are torn down unfinished; asyncio would print
        # each one's traceback ("Task exception was never retrieved") when collected
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        results["status"] = "interrupted"
        results["message"] = "interrupted (Ctrl-C): the report has the runs measured so far"
    except UserError as e:
        results["status"] = "failed"
        results["message"] = str(e)
    finally:
        ctrl_c.uninstall()
        if bar is not None:
            bar.close()
        log.close()
        results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return results
