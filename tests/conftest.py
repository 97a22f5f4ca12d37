"""Shared fixtures: tiny random-weight models (fast) and the real SmolLM2 (prepared once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harp_vllm.process import ServerProcess
from harp_vllm.pruning.reference import load_model

CORPUS = (
    "The quick brown fox jumps over the lazy dog. " * 3
    + "Robert Boulter is an English film, television and theatre actor. "
    "He had a guest starring role on the television series The Bill in 2000. "
    "In 1997 he appeared in a production of Cressida at the Almeida Theatre. "
    "Valkyria Chronicles III is a tactical role playing video game developed by Sega. "
) * 4


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Every test that needs a prepared real model (``smollm2_dir`` or ``gemma3_dir``, directly
    or through another fixture) is ``real_model``, so ``-m "not real_model"`` never prepares
    one."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & {"smollm2_dir", "gemma3_dir"} and \
                item.get_closest_marker("real_model") is None:
            item.add_marker(pytest.mark.real_model)


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in well under a second on a small corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


# Gemma's head size and attention scaling are set explicitly (its defaults are for 2B+ models).
TINY_EXTRA = {"gemma2": dict(head_dim=16, query_pre_attn_scalar=16)}


def make_tiny_model(family: str, out: Path, layers: int = 4, seed: int = 0) -> Path:
    """Save a tiny random-weight causal LM of ``family`` (a ``model_type`` of
    ``harp_vllm.families``; HF's ``AutoConfig`` knows its config class) with a tokenizer into
    ``out``."""
    import transformers

    from harp_vllm.families import MODEL_TYPES

    assert family in MODEL_TYPES, f"{family!r} is not a family HARP supports"
    tok = tiny_tokenizer()
    cfg = transformers.AutoConfig.for_model(
        family, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id, tie_word_embeddings=False,
        **TINY_EXTRA.get(family, {}))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # larger than the init default so layers matter in the outputs
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            elif "bias" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, prepared once (a no-op when the cache has it)."""
    from harp_vllm import models

    return models.prepare("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """The real Gemma 3 270M (base), prepared once (a no-op when the cache has it)."""
    from harp_vllm import models

    return models.prepare("gemma3-270m", progress=False)


# SmolLM2 HARP P=8: the top 8 of 30 layers with fixed alphas, two of them alpha = 0 (removed
# sublayers). One checkpoint per session, shared by every engine and server test.
SMOL_ALPHAS = {29: 0.8, 28: 0.3, 27: 0.2, 26: 0.1, 25: 0.0, 24: 0.1, 23: 0.0, 22: 0.2}
_SHARED: dict[str, Path] = {}


def smollm2_harp8_checkpoint(smollm2_dir: Path, root: Path) -> Path:
    """The session's SmolLM2 HARP P=8 checkpoint: saved under ``root`` by the first caller,
    the same directory for every later one (also for helpers that are not fixtures)."""
    if "harp8" not in _SHARED:
        from harp_vllm.pruning.jobs.checkpoint import save_pruned
        from harp_vllm.spec import PruningSpec

        spec = PruningSpec(layers=dict(SMOL_ALPHAS), source_model="smollm2-135m")
        _SHARED["harp8"] = save_pruned(load_model(smollm2_dir), spec, smollm2_dir,
                                       root / "smollm2-harp8")
    return _SHARED["harp8"]


@pytest.fixture(scope="session")
def smollm2_harp8(smollm2_dir, tmp_path_factory) -> Path:
    """SmolLM2 HARP P=8 (``SMOL_ALPHAS``), saved once per session."""
    return smollm2_harp8_checkpoint(smollm2_dir, tmp_path_factory.mktemp("shared"))


def save_linear(src: Path, out: Path, groups: list[tuple[list[int], int | None, str]],
                windows: torch.Tensor, alphas: dict[int, float] | None = None) -> Path:
    """A ``--method linear`` checkpoint of ``src``: each group (layers, rank, input) fitted in
    turn on ``windows`` (so one checkpoint can mix ranks and inputs), plus HARP ``alphas``."""
    from harp_vllm.pruning.jobs.checkpoint import save_pruned
    from harp_vllm.pruning.methods.linear import fit_linear
    from harp_vllm.spec import PruningSpec

    model = load_model(src)
    maps = {}
    for layers, rank, input_kind in groups:
        fit = fit_linear(model, windows, layers, rank=rank, input_kind=input_kind,
                         order="dense", batch=len(windows), progress=False)
        maps.update({k: v.spec() for k, v in fit.maps.items()})
    spec = PruningSpec(layers=dict(alphas or {}), maps=maps, method="linear",
                       source_model=str(src))
    return save_pruned(model, spec, src, out)


class HarpServer(ServerProcess):
    """A ``harp-vllm serve`` server (``harp_vllm.serving.serve``) started in the background on
    ``host:port``; ``env`` is added to this process's environment and ``drop_env`` taken out
    of it; ``via_cli``: through the ``harp-vllm serve`` command itself (Typer, then exec)."""

    def __init__(self, args: list[str], port: int, host: str = "127.0.0.1",
                 env: dict[str, str] | None = None, log_path: Path | None = None,
                 via_cli: bool = False, drop_env: tuple[str, ...] = ()):
        import os
        import sys

        from harp_vllm.serving.serve import build_command, serving_env

        self.port, self.host = port, host
        args = [*args, "--host", host, "--port", str(port)]
        cmd = ([sys.executable, "-m", "harp_vllm.cli", "serve", *args] if via_cli
               else build_command(args))
        full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in drop_env}
        super().__init__(cmd, f"http://{host}:{port}", serving_env(full_env), log_path)
