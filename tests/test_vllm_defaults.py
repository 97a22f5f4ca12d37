"""The plugin on vLLM's defaults (issue 15, part 4): no ``--enforce-eager``.

Every other engine test runs eager. Here a pruned checkpoint runs in vLLM's default
multi-process engine with its default compilation on this CPU backend (torch.compile), prefix
caching and chunked prefill on, a per-step token budget (128) smaller than the longest prompt
(400 tokens) so that chunked prefill really splits it, and a second pass over the same prompts
that reads them from the prefix cache. It must give the eager single-rank engine's greedy
tokens and prompt logprobs (within 1e-4), and the same tokens again from the cache.

The checkpoint is conftest's tiny ``harp`` one (token-local layers of alpha 0.7, 0.4 and 1,
a removed attention, two dense layers), at a fraction of SmolLM2's compile time: a real model
adds nothing to what compilation is checked for here (SmolLM2 runs eager in test_vllm_plugin
and test_parallel). Not the tiny ``linear`` one: it has no attention layer left, and vLLM's
prefix caching needs at least one KV-cache group.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_PROMPTS
from probe import run_engine
from test_parallel import assert_same_as_single_rank

BUDGET = 128  # --max-num-batched-tokens
# conftest's tiny prompts and a long one (the prefix cache and chunked prefill need its length)
PROMPTS = [*TINY_PROMPTS, [(7 * i) % 290 + 5 for i in range(400)]]


@pytest.fixture(scope="module")
def tiny_defaults(tiny_checkpoints, engines, tmp_path_factory):
    """(prompts, the eager single-rank run, the run on vLLM's defaults) of the tiny ``harp``
    checkpoint."""
    model = tiny_checkpoints["harp"]
    work: Path = tmp_path_factory.mktemp("defaults-runs")
    default = run_engine(model, work / "default", PROMPTS, in_process=False, timeout=1500,
                         extra=("--vllm-defaults", "--max-num-batched-tokens", str(BUDGET),
                                "--second-pass"))
    return PROMPTS, engines(model, PROMPTS), default


@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_default_compilation_with_chunked_prefill_matches_eager(tiny_defaults):
    prompts, eager, default = tiny_defaults
    assert max(len(p) for p in prompts) > 2 * BUDGET  # the long prompt takes 3+ steps
    worst = assert_same_as_single_rank(default, eager, len(PROMPTS))
    assert [r["token_ids"] for r in default[0]["results"]] == [  # and every prompt's tokens
        r["token_ids"] for r in eager[0]["results"]]
    print(f"default compilation vs eager: max |d prompt logprob| = {worst:.2e}")
    settings = default[0]
    assert settings["enforce_eager"] is False and settings["compilation_mode"] != "NONE"
    assert settings["enable_prefix_caching"] and settings["enable_chunked_prefill"]
    assert settings["max_num_batched_tokens"] == BUDGET
    assert eager[0]["enforce_eager"] is True and eager[0]["compilation_mode"] == "NONE"


@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_prefix_cache_hits_give_the_same_tokens(tiny_defaults):
    prompts, _, (result, log) = tiny_defaults
    assert result["ok"], result.get("error", "") + log[-3000:]
    first, second = result["results"], result["second_pass"]
    assert [r["token_ids"] for r in second] == [r["token_ids"] for r in first]
    block = result["block_size"]
    # the long prompt's full blocks (all but the last token's block) come from the cache
    assert second[-1]["num_cached_tokens"] >= (len(prompts[-1]) - 1) // block * block - block
