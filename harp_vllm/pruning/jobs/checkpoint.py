"""Write pruned checkpoints: HF layout, HARP architecture name, atomic and never half-written."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ...errors import UserError
from ...families import harp_architecture
from ...spec import CONFIG_KEY, PruningSpec
from ..reference import apply_pruning

# Files copied from the source model directory when present (tokenizer, chat template, ...).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt",
              "added_tokens.json", "generation_config.json")


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse an existing output unless ``force`` (checked before any expensive work)."""
    if out.exists() and not force:
        raise UserError(f"output directory already exists: {out} (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path exists and is not a directory: {out}")


def save_pruned(model, spec: PruningSpec, source_dir: Path, out: Path, force: bool = False,
                extra_files: dict[str, str] | None = None) -> Path:
    """Prune ``model`` in place by ``spec`` and write it to ``out`` atomically.

    Safetensors without the removed q/k (and v/o where alpha = 0) weights; config.json with
    the HARP architecture and the pruning section; tokenizer files and generation config
    copied from ``source_dir``; ``extra_files`` (name -> text, e.g. ``plan.json``) beside
    them. Written to a temporary sibling and renamed into place.
    """
    out = Path(out)
    check_output_dir(out, force)
    source_arch = (model.config.architectures or [None])[0]
    spec.source_architecture = spec.source_architecture or source_arch
    arch = harp_architecture(model.config)
    apply_pruning(model, spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in SIDE_FILES:
            if (Path(source_dir) / name).is_file():
                shutil.copy2(Path(source_dir) / name, tmp / name)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["architectures"] = [arch]
        cfg[CONFIG_KEY] = spec.to_dict()
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            backup = out.with_name(f".{out.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            out.rename(backup)
            tmp.rename(out)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
