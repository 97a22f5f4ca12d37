"""Shared fixtures: tiny random-weight models (fast), the real SmolLM2 (prepared once), and
the engine runs that several test files compare against (each started once per session)."""

from __future__ import annotations

import json
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


class KillsSharedServerLast:
    """Tests marked ``kills_shared_server`` run last (in their collected order): a test that
    kills a server of the shared pool (test_serve's ``vllm_pair``) would otherwise make the
    next test that needs it wait for a new engine start (a minute)."""

    @pytest.hookimpl(trylast=True)  # after pytest's own reordering
    def pytest_collection_modifyitems(self, items):
        last = [item for item in items if item.get_closest_marker("kills_shared_server")]
        if last:
            items[:] = [item for item in items if item not in last] + last


def pytest_configure(config):
    config.pluginmanager.register(KillsSharedServerLast(), "harp-kills-shared-server-last")


@pytest.fixture(scope="session", autouse=True)
def vllm_model_info_cache(request) -> Path | None:
    """Before the first engine of a session with vLLM tests: vLLM's model-info cache filled for
    every architecture the tests serve in one process (``tests/model_info_cache.py``), where
    each first start would inspect its class in a subprocess of its own (about 15 s each).
    Returns vLLM's cache root (None in a session without vLLM tests)."""
    import subprocess
    import sys

    if not any(item.get_closest_marker("vllm") for item in request.session.items):
        return None
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("model_info_cache.py"))],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip().splitlines()[-1])


def tiny_tokenizer(bos: bool = False):
    """A byte-level BPE tokenizer trained in well under a second on a small corpus; with
    ``bos`` it puts ``<bos>`` before every text, as Gemma's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<eos>", "<bos>"] if bos else ["<eos>"]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    if not bos:
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")


# Gemma's head size and attention scaling are set explicitly (its defaults are for 2B+ models).
TINY_EXTRA = {"gemma2": dict(head_dim=16, query_pre_attn_scalar=16),
              "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=16)}


@torch.no_grad()
def greedy_without_cache(model, ids: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """``ids`` [1, T] and ``max_tokens`` greedy tokens, every step a full forward without a KV
    cache (the reference that cached generation is compared to)."""
    seq = ids
    for _ in range(max_tokens):
        nxt = model(seq, use_cache=False).logits[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return seq


def make_tiny_model(family: str, out: Path, layers: int = 4, seed: int = 0) -> Path:
    """Save a tiny random-weight causal LM of ``family`` (a ``model_type`` of
    ``harp_vllm.families``; HF's ``AutoConfig`` knows its config class) with a tokenizer into
    ``out``."""
    import transformers

    from harp_vllm.families import model_types

    assert family in model_types(), f"{family!r} is not a family HARP supports"
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
                windows: torch.Tensor, alphas: dict[int, float] | None = None,
                kv_sharing: dict[int, int] | None = None) -> Path:
    """A ``--method linear`` checkpoint of ``src``: each group (layers, rank, input) fitted in
    turn on ``windows`` (so one checkpoint can mix ranks and inputs), plus HARP ``alphas`` and
    layers sharing an earlier layer's KV cache (``kv_sharing``, unfitted)."""
    from harp_vllm.pruning.jobs.checkpoint import save_pruned
    from harp_vllm.pruning.methods.linear import fit_linear
    from harp_vllm.spec import PruningSpec

    model = load_model(src)
    maps = {}
    for layers, rank, input_kind in groups:
        fit = fit_linear(model, windows, layers, rank=rank, input_kind=input_kind,
                         order="dense", batch=len(windows), progress=False)
        maps.update({k: v.spec() for k, v in fit.maps.items()})
    spec = PruningSpec(layers=dict(alphas or {}), maps=maps, kv_sharing=dict(kv_sharing or {}),
                       method="linear", source_model=str(src))
    return save_pruned(model, spec, src, out)


class RestartableServer(ServerProcess):
    """A test's server that a test may stop (or kill, as a crash) and start again in place."""

    def restart(self) -> RestartableServer:
        """Stop (if running) and start the same command again."""
        self.stop()
        self._spawn()
        return self


class HarpServer(RestartableServer):
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


# ---------------------------------------------------------------------------------------------
# Engine checkpoints and runs shared by test_vllm_plugin, test_parallel and test_vllm_defaults
# ---------------------------------------------------------------------------------------------
TINY_ALPHAS = {0: 0.7, 2: 0.0, 4: 0.4, 5: 1.0}  # any depth, incl. the first and last layer
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "1, 1, 2, 3, 5, 8, 13,",
    "Robert Boulter is an English film, television and theatre actor. He had a guest starring "
    "role on the television series The Bill in 2000. This was followed by a starring role in "
    "the play Herons written by Simon Stephens, which was performed in 2001 at the Royal Court "
    "Theatre. He had a guest role in the television series Judge John Deed in 2002. In 2004 "
    "Boulter landed a role as Craig in the episode Teddy's Story of the television series The "
    "Long Firm; he starred alongside actors Mark Strong and Derek Jacobi.",
]
# Token-id prompts for the tiny checkpoints (vocabulary 320): short, 100 tokens, repeats.
TINY_PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11, 12],
    list(range(20, 120)),
    [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4],
    list(range(300, 200, -3)),
    [40] * 30,
]
TINY_MAP_GROUPS = [([0], None, "raw"), ([2], 32, "normed"), ([4], 16, "raw"),
                   ([5], None, "normed")]


def own_model_type(family) -> str:
    """The ``model_type`` of ``family`` (a ``harp_vllm.families.Family``) whose HF causal LM
    is the family's own dense architecture (Mistral's record also accepts ``llama``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return next(mt for mt in family.model_types
                if MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(mt) == family.hf_architecture)


def make_tiny(family: str, out: Path, layers: int = 6, kv_heads: int = 2) -> Path:
    """A tiny random model of HF ``model_type`` ``family`` (``AutoConfig`` knows its config
    class) that vLLM's CPU attention accepts (head_dim 32; ``make_tiny_model``'s is 16), with
    4 query heads and ``kv_heads`` KV heads."""
    import transformers

    gemma = family.startswith("gemma")  # Gemma's attention scaling, set for the tiny size
    extra = {"query_pre_attn_scalar": 32} if gemma else {}
    tok = tiny_tokenizer()
    cfg = transformers.AutoConfig.for_model(
        family, vocab_size=len(tok), hidden_size=128, intermediate_size=256,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
        head_dim=32,
        max_position_embeddings=512, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        tie_word_embeddings=gemma,  # vLLM's Gemma2 always ties lm_head to the embeddings
        **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08 if gemma else 0.15)
            elif "bias" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def save(src: Path, out: Path, layers: dict[int, float],
         kv_sharing: dict[int, int] | None = None) -> Path:
    """A HARP checkpoint of ``src`` (``layers``: alphas), with layers sharing an earlier
    layer's KV cache (``kv_sharing``) if given."""
    from harp_vllm.pruning.jobs.checkpoint import save_pruned
    from harp_vllm.spec import PruningSpec

    spec = PruningSpec(layers=layers, kv_sharing=kv_sharing or {}, source_model=str(src))
    return save_pruned(load_model(src), spec, src, out)


def head_pruned(src: Path, out: Path, method: str, ratio: float, mlp_ratio: float,
                allocation: str, samples: int = 8, seq_len: int = 64) -> Path:
    """``src`` cut by AMP / FLAP / Wanda-sp on WikiText-2 validation text, saved to ``out``."""
    from harp_vllm import models
    from harp_vllm.evaluation import data
    from harp_vllm.pruning.calibration.windows import calibration_windows
    from harp_vllm.pruning.jobs.checkpoint import save_pruned
    from harp_vllm.pruning.methods.structured import prune_structured, shapes_of
    from harp_vllm.spec import PruningSpec

    model = load_model(src)
    text = data.load_text("wikitext2", "validation")[:200_000]
    windows = calibration_windows(models.load_tokenizer(src), text, samples, seq_len)
    res = prune_structured(model, windows, method, ratio, mlp_ratio, allocation,
                           progress=False)
    spec = PruningSpec(layers={}, method=method, source_model=str(src),
                       shapes=shapes_of(model.config, res))
    return save_pruned(model, spec, src, out)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The tiny Llama of ``make_tiny`` (4 query / 2 KV heads, head_dim 32, 6 layers) and what
    the engine tests cut from it, each saved once per session: ``dense``; ``harp``
    (``TINY_ALPHAS``); ``flap`` (FLAP, heads only) and ``flap_mlp`` (heads and MLP), both
    leaving layers of 1 and 2 KV heads; ``linear`` (maps of both ranks and inputs,
    ``TINY_MAP_GROUPS``; layer 0 raw: the first layer has no residual yet) beside HARP layers
    (alpha 0.5 and 0); ``gemma3_linear``, the same maps in a tiny Gemma 3 (post-norm: each
    map sits before the post-attention norm) beside a HARP layer (alpha 0.5) and a dense
    one (3)."""
    base = tmp_path_factory.mktemp("tiny-hd32")
    dense = make_tiny("llama", base / "dense")
    windows = torch.randint(0, 300, (8, 64), generator=torch.Generator().manual_seed(0))
    gemma = make_tiny("gemma3_text", base / "gemma3-dense")
    return {"dense": dense, "harp": save(dense, base / "harp", TINY_ALPHAS),
            "flap": head_pruned(dense, base / "flap", "flap", 0.25, 0.0, "global"),
            "flap_mlp": head_pruned(dense, base / "flap-mlp", "flap", 0.25, 0.25, "global"),
            "linear": save_linear(dense, base / "linear", TINY_MAP_GROUPS, windows,
                                  alphas={1: 0.5, 3: 0.0}),
            "gemma3_linear": save_linear(gemma, base / "gemma3-linear", TINY_MAP_GROUPS,
                                         windows, alphas={1: 0.5})}


class Engines:
    """Engine runs of ``probe.run_engine``, each distinct run started once per session and
    shared by every test (of any file) that asks for the same one."""

    def __init__(self, tmp_path_factory):
        self.tmp = tmp_path_factory
        self.cache: dict[tuple, tuple[dict, str]] = {}

    @staticmethod
    def key(model: Path, prompts: list, tp: int = 1, pp: int = 1, max_model_len: int = 512,
            in_process: bool | None = None) -> tuple:
        return (str(model), json.dumps(prompts), tp, pp, max_model_len, in_process)

    def __call__(self, model: Path, prompts: list, tp: int = 1, pp: int = 1,
                 max_model_len: int = 512, in_process: bool | None = None
                 ) -> tuple[dict, str]:
        """(result JSON, log) of ``model`` on ``prompts`` (32 greedy tokens each, prompt
        logprobs, per-rank information)."""
        from probe import run_engine

        key = self.key(model, prompts, tp, pp, max_model_len, in_process)
        if key not in self.cache:
            work = self.tmp.mktemp(f"{Path(model).name}-tp{tp}-pp{pp}")
            self.cache[key] = run_engine(model, work, prompts, tp=tp, pp=pp,
                                         max_model_len=max_model_len, in_process=in_process)
        return self.cache[key]

    def batch(self, models: list[Path], prompts: list, max_model_len: int = 512) -> None:
        """Run the single-rank, in-process engines of ``models`` not run yet one after the
        other in ONE probe process (one vLLM import for all); later calls get each one's own
        result (and the batch's log)."""
        from probe import run_engine

        todo = [m for m in models if self.key(m, prompts, max_model_len=max_model_len)
                not in self.cache]
        if not todo:
            return
        result, log = run_engine(todo, self.tmp.mktemp("batch-tp1-pp1"), prompts,
                                 max_model_len=max_model_len, in_process=True)
        runs = {r["model"]: r for r in result.get("runs", [])}
        for m in todo:  # a batch that died leaves its error (and log) to every model of it
            self.cache[self.key(m, prompts, max_model_len=max_model_len)] = (
                runs.get(str(m), {"ok": False, "error": result.get("error", "no result")}), log)


@pytest.fixture(scope="session")
def engines(tmp_path_factory) -> Engines:
    """``engines(model, prompts, tp=1, pp=1, max_model_len=512, in_process=None)``: the
    (result JSON, log) of ``probe.run_engine``, each distinct run started once per session."""
    return Engines(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_engines(engines, tiny_checkpoints) -> Engines:
    """``engines`` with the single-rank runs of every ``tiny_checkpoints`` model on
    ``TINY_PROMPTS`` done, all in one probe process."""
    engines.batch(list(tiny_checkpoints.values()), TINY_PROMPTS)
    return engines


@pytest.fixture(scope="session")
def smol_prompts(smollm2_dir) -> list[list[int]]:
    """``PROMPTS`` in SmolLM2's tokens."""
    from harp_vllm import models

    tok = models.load_tokenizer(smollm2_dir)
    return [tok(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="session")
def smol_harp8_prompts(smollm2_dir, smol_prompts) -> list[list[int]]:
    """``smol_prompts`` and, last, 1,500 tokens of WikiText-2 validation text (longer than
    test_vllm_defaults' per-step token budget, so chunked prefill splits it)."""
    from harp_vllm import models
    from harp_vllm.evaluation import data

    text = data.load_text("wikitext2", "validation")[:20_000]
    return [*smol_prompts, models.load_tokenizer(smollm2_dir)(text)["input_ids"][:1500]]


@pytest.fixture(scope="session")
def smol_harp8_run(engines, smollm2_harp8, smol_harp8_prompts) -> tuple[dict, str]:
    """SmolLM2 HARP P=8 on one rank, eager, in vLLM's default multi-process engine (plugin
    through its entry point), on ``smol_harp8_prompts``: the run test_vllm_plugin checks
    against the reference and test_parallel / test_vllm_defaults compare their engines with."""
    return engines(smollm2_harp8, smol_harp8_prompts, max_model_len=2048, in_process=False)
