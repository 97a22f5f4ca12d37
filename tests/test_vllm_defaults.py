"""The plugin on vLLM's defaults (issue 15, part 4): no ``--enforce-eager``.

Every other engine test runs eager. Here the real SmolLM2 HARP P=8 runs in vLLM's default
multi-process engine with its default compilation on this CPU backend (torch.compile), prefix
caching and chunked prefill on, a per-step token budget (512) smaller than the longest prompt
(about 1,500 tokens) so that chunked prefill really splits it, and a second pass over the same
prompts that reads them from the prefix cache. It must give the eager single-rank engine's
greedy tokens and prompt logprobs (within 1e-4), and the same tokens again from the cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from probe import run_engine
from test_parallel import assert_same_as_single_rank

BUDGET = 512  # --max-num-batched-tokens


# The prompts whose logprobs are compared: PROMPTS[:4] and the long one (the last of
# ``smol_harp8_prompts``); both engines run all of them (the same batches).
PICK = [0, 1, 2, 3, -1]


def pick(run: tuple[dict, str]) -> tuple[dict, str]:
    result, log = run
    return ({**result, "results": [result["results"][i] for i in PICK]} if result["ok"]
            else result), log


@pytest.fixture(scope="module")
def smol_defaults(smollm2_harp8, smol_harp8_prompts, smol_harp8_run, tmp_path_factory):
    """(prompts, the eager run, the run on vLLM's defaults), both on ``smol_harp8_prompts``:
    the eager one is conftest's ``smol_harp8_run`` (shared with test_vllm_plugin and
    test_parallel)."""
    work: Path = tmp_path_factory.mktemp("defaults-runs")
    default = run_engine(smollm2_harp8, work / "default", smol_harp8_prompts,
                         max_model_len=2048, in_process=False, timeout=1500,
                         extra=("--vllm-defaults", "--max-num-batched-tokens", str(BUDGET),
                                "--second-pass"))
    return smol_harp8_prompts, smol_harp8_run, default


@pytest.mark.vllm
@pytest.mark.real_model
@pytest.mark.timeout(1800)
def test_default_compilation_with_chunked_prefill_matches_eager(smol_defaults):
    prompts, eager, default = smol_defaults
    assert max(len(p) for p in prompts) > 2 * BUDGET  # the long prompt takes 3+ steps
    worst = assert_same_as_single_rank(pick(default), pick(eager), len(PICK))
    assert [r["token_ids"] for r in default[0]["results"]] == [  # and every prompt's tokens
        r["token_ids"] for r in eager[0]["results"]]
    print(f"default compilation vs eager: max |d prompt logprob| = {worst:.2e}")
    settings = default[0]
    assert settings["enforce_eager"] is False and settings["compilation_mode"] != "NONE"
    assert settings["enable_prefix_caching"] and settings["enable_chunked_prefill"]
    assert settings["max_num_batched_tokens"] == BUDGET
    assert eager[0]["enforce_eager"] is True and eager[0]["compilation_mode"] == "NONE"


@pytest.mark.vllm
@pytest.mark.real_model
@pytest.mark.timeout(1800)
def test_prefix_cache_hits_give_the_same_tokens(smol_defaults):
    prompts, _, (result, log) = smol_defaults
    assert result["ok"], result.get("error", "") + log[-3000:]
    first, second = result["results"], result["second_pass"]
    assert [r["token_ids"] for r in second] == [r["token_ids"] for r in first]
    block = result["block_size"]
    # the long prompt's full blocks (all but the last token's block) come from the cache
    assert second[-1]["num_cached_tokens"] >= (len(prompts[-1]) - 1) // block * block - block
