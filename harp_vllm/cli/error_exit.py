"""The one error exit of every ``harp-vllm`` command (see ``harp_vllm.errors``)."""

from __future__ import annotations

from collections.abc import Callable
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
