"""What every ``harp-vllm`` command prints on stderr: its one error exit (see
``harp_vllm.errors``) and the note for a JSON file it wrote."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import USAGE_EXIT, UserError

console = Console(stderr=True)
T = TypeVar("T")


def fail(message: str, code: int = USAGE_EXIT) -> NoReturn:
    """Print one clear error line and exit with ``code`` (2: usage error, 1: runtime failure)."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def run_guarded(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run ``fn``, turning a ``UserError`` into a one-line error and its exit status."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        fail(str(e), e.exit_code)


def write_json(path: Path | None, payload: dict) -> None:
    """Write ``payload`` as indented JSON to ``path`` (nothing when None) and say so."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    console.print(f"wrote {path}")
