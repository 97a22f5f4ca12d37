"""Adds ``harp-vllm loadtest`` (the A/B load test of ``harp_vllm.loadtest``)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from ..loadtest.command import loadtest

    app.command("loadtest")(loadtest)
