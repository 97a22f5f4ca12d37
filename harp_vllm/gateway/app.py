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
  HTTP, malformed, non-UTF-8 or non-strict JSON or a value over a limit, 401 missing/wrong API
  key, 404 unknown model or route (no redirects: ``/v1/models/`` is a 404), 408 headers or
  body too slow, 413 body over the size or JSON-value limit, 415 a body that is not
  ``application/json`` (so a web page cannot post a form or text cross-origin), 422 wrong
  field types or missing fields, 431 headers over their limits, 502 backend broke the
  response (or sent one over the size caps, or JSON too deeply nested), 503 backend
  unreachable or busy (``Retry-After``), or too many connections, 504 backend timed out or
  the request passed ``request_timeout``. A backend's own JSON error is passed through (a
  non-JSON one is replaced: its text is logged, never shown); messages name a backend, never
  its address. A stream that breaks after it started ends with an ``error`` event. Any other
  failure is a 500 of the same shape; the connection stays usable and every gauge is restored.
* ``request_timeout`` covers writing the answer too: a caller that stops reading is cut when
  it passes (a stream 1 s after it, see :class:`~.exchange.RelayResponse`), which cancels the
  backend's request and restores the gauges.
* SIGHUP reloads the configuration (file, flags and ``$HARP_GATEWAY_API_KEYS``): keys,
  backends, aliases and shadows switch in one step; a new configuration that does not
  validate is refused and logged, the running one stays. Other settings need a restart.
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
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import UserError, describe
from .config import GatewayConfig
from .exchange import WRITE_GRACE_S, RelayResponse, UpstreamError
from .openai_errors import CLIENT_CLOSED, ClientGone, GatewayError, error_payload
from .prometheus_metrics import GatewayMetrics
from .proxy import Gateway
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


def check_content_type(request: Request) -> None:
    """415 unless the body is declared ``application/json`` (parameters such as
    ``charset`` allowed): a browser sends a cross-origin ``text/plain`` or form POST without
    asking, but never ``application/json``."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise GatewayError(415, "The request body must be JSON sent with 'Content-Type: "
                                f"application/json' (got {media[:60] or 'none'!r})",
                           "unsupported_media_type", headers=CLOSE)


class Auth:
    """Bearer-key check: the scheme in any case, any whitespace before the key, the key
    compared in constant time against every configured key."""

    def __init__(self, keys: list[str]):
        self.set_keys(keys)

    def set_keys(self, keys: list[str]) -> None:
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


def guarded(m: GatewayMetrics, route: Callable[[Request], Awaitable[Response]],
            timeout: float) -> Callable[[Request], Awaitable[Response]]:
    """Every exception from ``route`` becomes an OpenAI-style answer (never a dropped
    connection); refusals before routing are counted in ``rejected``. A plain answer is
    written to the socket's buffer at once: if it still waits there ``timeout`` s (plus
    the write grace) after the request began, the caller stopped reading and its connection
    is cut (a stream keeps its own deadline)."""

    async def endpoint(request: Request) -> Response:
        deadline = asyncio.get_running_loop().time() + timeout + WRITE_GRACE_S
        response = await answer(request)
        if not isinstance(response, RelayResponse):
            cut_at = request.scope.get("harp.cut_at")
            if cut_at is not None:
                cut_at(deadline)
        return response

    async def answer(request: Request) -> Response:
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


def create_app(config: GatewayConfig, metrics: GatewayMetrics | None = None,
               reload: Callable[[], GatewayConfig] | None = None) -> Starlette:
    """The gateway's Starlette app (long: its small route handlers are closures over the
    gateway, auth and metrics, defined here in one place). ``reload`` builds the
    configuration again on SIGHUP."""
    gw = Gateway(config, metrics)
    m = gw.metrics
    auth = Auth(config.api_keys)
    limits = RequestLimits(config.max_tokens_limit, config.max_n, config.max_best_of,
                           config.max_json_depth, config.max_json_items)

    async def handle(request: Request, path: str) -> Response:
        t0 = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + config.request_timeout
        auth.check(request)
        check_content_type(request)
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

    async def reload_config() -> None:
        if reload is None:
            logger.warning("SIGHUP: no configuration source to reload from")
            return
        try:
            new = await asyncio.to_thread(reload)
            fixed = await gw.reload(new, lambda cfg: auth.set_keys(cfg.api_keys))
        except (UserError, ValueError) as e:
            logger.error("SIGHUP: the new configuration is refused, the running one stays: %s",
                         e)
            return
        except Exception as e:
            logger.error("SIGHUP: reloading failed, the running configuration stays: %s",
                         describe(e))
            return
        cfg = gw.cfg
        logger.warning("SIGHUP: configuration reloaded: %d backend(s), %d alias(es), "
                       "%d shadow(s), %d API key(s)%s", len(cfg.backends), len(cfg.aliases),
                       len(cfg.shadows), len(cfg.api_keys),
                       f"; changed settings that need a restart (kept): {', '.join(fixed)}"
                       if fixed else "")

    reloading = asyncio.Lock()

    async def on_sighup() -> None:
        async with reloading:  # one reload at a time, in the order the signals came
            await reload_config()

    def g(route: Callable[[Request], Awaitable[Response]]
          ) -> Callable[[Request], Awaitable[Response]]:
        return guarded(m, route, config.request_timeout)

    routes = [Route("/v1/completions", g(completions), methods=["POST"]),
              Route("/v1/chat/completions", g(chat_completions), methods=["POST"]),
              Route("/v1/models", g(list_models), methods=["GET"]),
              Route("/health", g(health), methods=["GET"]),
              Route("/live", g(live), methods=["GET"]),
              Route("/metrics", g(metrics_route), methods=["GET"])]

    async def http_error(request: Request, e: HTTPException) -> Response:
        msg = "Not found" if e.status_code == 404 else str(e.detail)
        if e.status_code == 405:
            msg = f"Method {request.method} is not allowed on {request.url.path}"
        return JSONResponse(error_payload(e.status_code, msg), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    async def server_error(request: Request, e: Exception) -> Response:
        logger.error("unexpected error outside a route on %s %s: %s", request.method,
                     request.url.path, describe(e))
        return JSONResponse(error_payload(500, "internal gateway error", "internal_error"),
                            status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await gw.start()
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()

        def sighup() -> None:
            task = loop.create_task(on_sighup())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        hup = False
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, sighup)
            hup = True
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            for t in tasks:
                t.cancel()
            await gw.stop()

    handlers: dict[Any, Any] = {HTTPException: http_error, Exception: server_error}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.router.redirect_slashes = False  # a redirect's Location would come from Host
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
