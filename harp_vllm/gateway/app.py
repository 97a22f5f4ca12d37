"""The gateway's HTTP routes: one OpenAI-compatible endpoint in front of several vLLM servers.

Routes: ``GET /v1/models`` (union of the backends' models plus the aliases),
``POST /v1/completions`` and ``POST /v1/chat/completions`` (routed by ``model``; an alias is
split across backends by weight and its ``model`` rewritten to the chosen backend's),
``GET /health`` (per-backend status from the background probes; 503 when no backend is up),
``GET /live`` (always open: ``{"status": "ok"}`` or 503 ``{"status": "down"}``),
``GET /metrics``. With ``protect_metrics`` the API key is needed for ``/metrics`` and
``/health`` (which then also shows redacted URLs and the last errors).

Behaviour worth knowing:

* Streams (SSE) are relayed event by event as they arrive, never buffered. The gateway asks the
  backend for ``stream_options.include_usage`` so it learns the prompt length; the usage-only
  final chunk is passed on only if the caller asked for it too.
* The caller's response carries ``X-Harp-Backend: <backend name>``.
* Errors are OpenAI-style JSON ``{"error": {"message", "type", "param", "code"}}``: 400 malformed
  or non-strict JSON or a value over a limit, 401 missing/wrong API key, 404 unknown model or
  route, 408 body too slow, 413 body over the limit, 422 wrong field types or missing fields,
  502 backend broke the response (or sent one over the size caps), 503 backend unreachable or
  busy (``Retry-After``), 504 backend timed out or the request passed ``request_timeout``.
  A backend's own error status and body are passed through. A stream that breaks after it
  started ends with an ``error`` event. Any other failure is a 500 of the same shape; the
  connection stays usable and every gauge is restored.
* A client that disconnects cancels the upstream request (the backend sees the connection close
  and aborts the generation).
* Shadow mirroring runs as a detached task: the caller never waits for it; its response is
  measured (``role="shadow"``) and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .config import GatewayConfig
from .errors import CLIENT_CLOSED, ClientGone, GatewayError, describe, error_payload
from .metrics import GatewayMetrics
from .proxy import Gateway, UpstreamError
from .schemas import RequestLimits, parse_request

logger = logging.getLogger("harp_vllm.gateway")

CLOSE = {"Connection": "close"}


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body: 413 past ``limit`` bytes, 408 if it takes over ``timeout`` s."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise GatewayError(400, "invalid Content-Length header", "invalid_request",
                               headers=CLOSE)
        if int(declared) > limit:
            raise GatewayError(413, f"request body is {declared} bytes; the limit is {limit}",
                               "request_too_large", headers=CLOSE)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise GatewayError(413, f"request body is over the limit of {limit} bytes",
                                       "request_too_large", headers=CLOSE)
                chunks.append(chunk)
    except TimeoutError:
        raise GatewayError(408, f"the request body did not arrive within {timeout} s",
                           "request_timeout", headers=CLOSE) from None
    return b"".join(chunks)


class Auth:
    """Bearer-key check: the scheme in any case, any whitespace before the key, the key
    compared in constant time against every configured key."""

    def __init__(self, keys: list[str]):
        self.keys = [k.encode() for k in keys]

    def check(self, request: Request) -> None:
        if not self.keys:
            return
        header = request.headers.get("authorization", "")
        if not header.strip():
            raise GatewayError(401, "Missing API key: send 'Authorization: Bearer <key>'",
                               "missing_api_key", headers={"WWW-Authenticate": "Bearer"})
        parts = header.split(None, 1)
        token = parts[1].strip().encode(errors="replace") if len(parts) == 2 else b""
        ok = False
        for k in self.keys:
            ok |= hmac.compare_digest(token, k)
        if not ok or parts[0].lower() != "bearer":
            raise GatewayError(401, "Incorrect API key provided", "invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})


def guarded(m: GatewayMetrics, route: Callable[[Request], Awaitable[Response]]
            ) -> Callable[[Request], Awaitable[Response]]:
    """Every exception from ``route`` becomes an OpenAI-style answer (never a dropped
    connection); refusals before routing are counted in ``rejected``."""

    async def endpoint(request: Request) -> Response:
        try:
            return await route(request)
        except UpstreamError as e:
            return e.response()
        except GatewayError as e:
            m.rejected.labels(str(e.status), e.code or "invalid").inc()
            return e.response()
        except (ClientDisconnect, ClientGone):
            m.rejected.labels(str(CLIENT_CLOSED), "client_disconnect").inc()
            return Response(status_code=CLIENT_CLOSED)
        except Exception as e:
            logger.exception("unexpected gateway error on %s %s", request.method,
                             request.url.path)
            return JSONResponse(error_payload(500, f"internal gateway error: {describe(e)}",
                                              "internal_error"), status_code=500)

    return endpoint


def create_app(config: GatewayConfig, metrics: GatewayMetrics | None = None) -> Starlette:
    """The gateway's Starlette app (long: its small route handlers are closures over the
    gateway, auth and metrics, defined here in one place)."""
    gw = Gateway(config, metrics)
    m = gw.metrics
    auth = Auth(config.api_keys)
    limits = RequestLimits(config.max_tokens_limit, config.max_n, config.max_best_of,
                           config.max_json_depth)

    async def handle(request: Request, path: str) -> Response:
        t0 = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + config.request_timeout
        auth.check(request)
        raw = await read_body(request, config.max_body_bytes, config.body_timeout)
        payload = parse_request(raw, path, limits)
        return await gw.forward(request, path, payload, raw, t0, deadline)

    async def completions(request: Request) -> Response:
        return await handle(request, "completions")

    async def chat_completions(request: Request) -> Response:
        return await handle(request, "chat/completions")

    async def list_models(request: Request) -> Response:
        auth.check(request)
        return JSONResponse(models_listing(gw))

    async def health(request: Request) -> Response:
        if config.protect_metrics:
            auth.check(request)
        status, body = gw.backends.health(detailed=config.protect_metrics)
        return JSONResponse(body, status_code=status)

    async def live(request: Request) -> Response:
        up = gw.backends.any_up()
        return JSONResponse({"status": "ok" if up else "down"}, status_code=200 if up else 503)

    async def metrics_route(request: Request) -> Response:
        if config.protect_metrics:
            auth.check(request)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    routes = [Route("/v1/completions", guarded(m, completions), methods=["POST"]),
              Route("/v1/chat/completions", guarded(m, chat_completions), methods=["POST"]),
              Route("/v1/models", guarded(m, list_models), methods=["GET"]),
              Route("/health", guarded(m, health), methods=["GET"]),
              Route("/live", guarded(m, live), methods=["GET"]),
              Route("/metrics", guarded(m, metrics_route), methods=["GET"])]

    async def http_error(request: Request, e: HTTPException) -> Response:
        msg = "Not found" if e.status_code == 404 else str(e.detail)
        if e.status_code == 405:
            msg = f"Method {request.method} is not allowed on {request.url.path}"
        return JSONResponse(error_payload(e.status_code, msg), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    handlers: dict[Any, Any] = {HTTPException: http_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.gateway = gw
    return app


def models_listing(gw: Gateway) -> dict:
    """``/v1/models``: the models of the backends that are up, then the aliases."""
    data, seen = [], set()
    for b in gw.backends.all.values():
        if not b.up:
            continue
        for name in b.models:
            if name in seen:
                continue
            seen.add(name)
            data.append(dict(b.cards.get(name) or {"id": name, "object": "model",
                                                    "created": gw.started, "owned_by": b.name}))
    for a in gw.router.aliases.values():
        if a.name not in seen:
            data.append({"id": a.name, "object": "model", "created": gw.started,
                         "owned_by": "harp-gateway",
                         "harp_alias": [{"backend": t.backend, "weight": t.weight}
                                        for t in a.targets]})
    return {"object": "list", "data": data}
