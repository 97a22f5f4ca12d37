"""``harp-vllm serve`` and ``harp-vllm gateway`` (registered on the main Typer app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from .output import fail


def register(app: typer.Typer) -> None:
    """Add the serving commands to ``app``."""

    @app.command("serve", context_settings={"allow_extra_args": True,
                                            "ignore_unknown_options": True})
    def serve_cmd(ctx: typer.Context) -> None:
        """Serve MODEL with vLLM's OpenAI-compatible server, the HARP plugin and HARP metrics.

        Usage: harp-vllm serve MODEL [any vllm serve flag ...]. MODEL is a known name
        (smollm2-135m), an HF directory (dense or HARP-pruned), a .gguf file or a hub id.
        Every other flag goes to vLLM unchanged; `python -m harp_vllm.serving.serve --help`
        lists them.
        """
        from ..serving.serve import exec_server

        if not ctx.args:
            fail("no model given: harp-vllm serve MODEL [vllm serve flags]")
        try:
            exec_server(ctx.args)
        except UserError as e:
            fail(str(e), e.exit_code)

    @app.command("gateway")
    def gateway_cmd(
        config: Annotated[Path | None, typer.Option(help="config file (JSON, TOML or YAML)")
                          ] = None,
        backend: Annotated[list[str] | None, typer.Option(
            help="NAME=URL of an OpenAI-compatible server (repeatable)")] = None,
        alias: Annotated[list[str] | None, typer.Option(
            help="A/B split: NAME=BACKEND:WEIGHT,BACKEND:WEIGHT (repeatable)")] = None,
        shadow: Annotated[list[str] | None, typer.Option(
            help="mirror: SOURCE=TARGET:FRACTION (repeatable)")] = None,
        api_key: Annotated[list[str] | None, typer.Option(
            help="accepted Bearer key (repeatable; also $HARP_GATEWAY_API_KEYS)")] = None,
        host: Annotated[str, typer.Option(help="listen address")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="listen port")] = 8080,
        max_body_bytes: Annotated[int | None, typer.Option(help="request body limit")] = None,
        connect_timeout: Annotated[float | None, typer.Option(help="backend connect timeout, s")
                                   ] = None,
        read_timeout: Annotated[float | None, typer.Option(
            help="longest wait for the next byte from a backend, s")] = None,
        request_timeout: Annotated[float | None, typer.Option(
            help="whole request, first byte in to last byte taken by the caller, s")] = None,
        max_header_bytes: Annotated[int | None, typer.Option(
            help="request line + headers, bytes (431 over it)")] = None,
        max_header_count: Annotated[int | None, typer.Option(
            help="request header lines (431 over it)")] = None,
        max_json_items: Annotated[int | None, typer.Option(
            help="JSON items (, [ { outside strings) in a request body (413 over it)")] = None,
        max_client_connections: Annotated[int | None, typer.Option(
            help="open client connections")] = None,
        max_connections_per_client: Annotated[int | None, typer.Option(
            help="open connections from one client address")] = None,
        shutdown_timeout: Annotated[float | None, typer.Option(
            help="SIGTERM: time requests in flight get to finish, s")] = None,
        allow_no_auth: Annotated[bool | None, typer.Option(
            "--allow-no-auth", help="start without any API key (anyone can use the gateway)")
                                 ] = None,
        seed: Annotated[int | None, typer.Option(help="seed for the A/B and shadow draws")
                        ] = None,
        log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    ) -> None:
        """OpenAI-compatible A/B gateway in front of several vLLM servers.

        Needs an API key (--api-key, api_keys in --config, or $HARP_GATEWAY_API_KEYS) unless
        --allow-no-auth. SIGHUP reloads keys and backends; SIGTERM drains.
        """
        from ..gateway import build_config, serve

        def load():
            return build_config(
                config, backend, alias, shadow, api_key, max_body_bytes=max_body_bytes,
                connect_timeout=connect_timeout, read_timeout=read_timeout,
                request_timeout=request_timeout, max_header_bytes=max_header_bytes,
                max_header_count=max_header_count, max_json_items=max_json_items,
                max_client_connections=max_client_connections,
                max_connections_per_client=max_connections_per_client,
                shutdown_timeout=shutdown_timeout, allow_no_auth=allow_no_auth, seed=seed)

        try:
            cfg = load()
        except UserError as e:
            fail(str(e), e.exit_code)
        serve(cfg, host=host, port=port, log_level=log_level, reload=load)
