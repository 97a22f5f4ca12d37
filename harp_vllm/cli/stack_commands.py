"""``harp-vllm stack up|down|status|config``: the compose stack as local processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from .output import fail

FileOpt = Annotated[Path | None, typer.Option(
    "--file", "-f", help="compose file (default: deploy/docker-compose.yml)")]



def _print_status(status: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="harp-vllm stack")
    for col in ("service", "state", "pid", "url", "log / note"):
        table.add_column(col)
    for name, st in status.items():
        table.add_row(name, st["state"], str(st["pid"] or ""), st.get("url") or "",
                      st.get("note") or st.get("log") or "")
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add the ``stack`` command group to ``app`` (long: it declares the four commands and
    their options, each a few lines)."""
    stack_app = typer.Typer(
        help="Run deploy/docker-compose.yml without Docker: the same services, ports and "
             "environment as local processes, with a local Prometheus. State and logs: "
             "$HARP_STACK_DIR (default ~/.cache/harp-vllm/stack).",
        no_args_is_help=True)
    app.add_typer(stack_app, name="stack")

    @stack_app.command("up")
    def up_cmd(
        services: Annotated[list[str] | None, typer.Argument(
            help="services to start (with what they depend on) (default: all)")] = None,
        file: FileOpt = None,
        profile: Annotated[list[str] | None, typer.Option(
            help="also start the services of this compose profile (repeatable)")] = None,
        timeout: Annotated[float, typer.Option(help="seconds to wait for every service to be "
                                                    "healthy")] = 900.0,
    ) -> None:
        """Start the stack in dependency order and wait until every service is healthy."""
        from ..ops.stack import Stack
        from ..ops.translate import build_plan

        try:
            plan = build_plan(file, profiles=profile, only=services or None)
            for name, why in plan.skipped.items():
                typer.echo(f"skipping {name}: {why}")
            status = Stack(plan, echo=typer.echo).up(timeout=timeout)
        except UserError as e:
            fail(str(e), e.exit_code)
        _print_status(status)

    @stack_app.command("down")
    def down_cmd(
        file: FileOpt = None,
        timeout: Annotated[float, typer.Option(help="seconds before SIGKILL")] = 30.0,
    ) -> None:
        """Stop every process the stack started (with their children)."""
        from ..ops.stack import Stack
        from ..ops.translate import build_plan

        try:
            stack = Stack(build_plan(file), echo=typer.echo)
        except UserError as e:
            fail(str(e), e.exit_code)
        stopped = stack.down(timeout=timeout)
        typer.echo("stack is down" + ("" if stopped else " (nothing was running)"))

    @stack_app.command("status")
    def status_cmd(
        file: FileOpt = None,
        as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    ) -> None:
        """Each service's process, health and URL; exit 1 when one is dead or unhealthy."""
        from ..ops.stack import Stack
        from ..ops.translate import build_plan

        try:
            status = Stack(build_plan(file)).status()
        except UserError as e:
            fail(str(e), e.exit_code)
        if as_json:
            typer.echo(json.dumps(status, indent=2))
        elif not status:
            typer.echo("no stack is running")
        else:
            _print_status(status)
        if any(s["state"] in ("dead", "unhealthy", "exited") for s in status.values()):
            raise typer.Exit(1)

    @stack_app.command("config")
    def config_cmd(
        file: FileOpt = None,
        profile: Annotated[list[str] | None, typer.Option(help="include this profile")] = None,
    ) -> None:
        """Print the translated plan (commands, environment, ports) as JSON; start nothing."""
        from ..ops.translate import build_plan, plan_summary

        try:
            plan = build_plan(file, profiles=profile)
        except UserError as e:
            fail(str(e), e.exit_code)
        typer.echo(json.dumps({"compose_file": plan.compose_file, "stack_dir": plan.stack_dir,
                               "skipped": plan.skipped, "services": plan_summary(plan)},
                              indent=2))
