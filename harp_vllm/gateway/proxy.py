"""Forwarding one request to its backend (and maybe a shadow copy to another), and switching
to reloaded settings. Each request's bookkeeping is an :class:`~.exchange.Exchange`
(``exchange.py``), closed exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from .backend_state import Backends, BackendState
from .config import GatewayConfig
from .exchange import (
    Exchange,
    RelayResponse,
    UpstreamError,
    cancel_on_disconnect,
    upstream_failure,
)
from .openai_errors import (
    CLIENT_CLOSED,
    ClientGone,
    GatewayError,
    error_payload,
    loads_reply,
    sse_error,
)
from .prometheus_metrics import GatewayMetrics
from .relay import Recorder, SSERelay, read_capped
from .routing import Router

logger = logging.getLogger("harp_vllm.gateway")

# Settings a SIGHUP reload changes; the others need a restart.
RELOADABLE = ("backends", "aliases", "shadows", "api_keys", "allow_no_auth")


class Gateway:
    """Routes, forwards and mirrors requests; owns the backends and their health loop."""

    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics | None = None):
        self.cfg = config
        self.metrics = metrics or GatewayMetrics()
        self.backends = Backends(config, self.metrics)
        self.router = Router(self.backends, config.aliases, random.Random(config.seed))
        self.rng = self.router.rng
        self.started = int(time.time())
        self._shadow_tasks: set[asyncio.Task] = set()
        self._retiring: set[asyncio.Task] = set()

    async def start(self) -> None:
        await self.backends.start()

    async def stop(self) -> None:
        for t in (*self._shadow_tasks, *self._retiring):
            t.cancel()
        for t in (*self._shadow_tasks, *self._retiring):
            with contextlib.suppress(BaseException):
                await t
        await self.backends.stop()

    async def reload(self, new: GatewayConfig,
                     on_swap: Callable[[GatewayConfig], None] | None = None) -> list[str]:
        """Switch to ``new``'s backends, aliases, shadows and keys at once (``on_swap`` runs in
        the same step); return the names of other settings that differ (they need a
        restart and keep their running values). The new backends are probed before the
        switch; requests in flight finish on the old ones, whose connections close when the
        last is done (or after ``request_timeout``). Raises :class:`ValueError` (nothing
        changed) if the merged settings are inconsistent."""
        fixed = [k for k in GatewayConfig.model_fields
                 if k not in RELOADABLE and getattr(new, k) != getattr(self.cfg, k)]
        data = self.cfg.model_dump()
        data.update({k: v for k, v in new.model_dump().items() if k in RELOADABLE})
        try:
            merged = GatewayConfig.model_validate(data)
        except ValidationError as e:
            raise ValueError("; ".join(err["msg"] for err in e.errors())) from None
        backends = Backends(merged, self.metrics, known=set(self.backends.all))
        await backends.start()
        old = self.backends
        self.cfg, self.backends = merged, backends
        self.router = Router(backends, merged.aliases, self.rng)
        if on_swap is not None:
            on_swap(merged)
        await old.stop_probes()
        for name in set(old.all) - set(backends.all):
            with contextlib.suppress(KeyError):
                self.metrics.backend_up.remove(name)
        task = asyncio.create_task(self._retire(old))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return fixed

    async def _retire(self, old: Backends) -> None:
        """Close the replaced backends' connections once no request uses them."""
        try:
            async with asyncio.timeout(self.cfg.request_timeout + 5):
                while any(b.in_use for b in old.all.values()):
                    await asyncio.sleep(0.2)
        except TimeoutError:
            pass
        finally:
            await old.close_sessions()

    # -- forwarding --------------------------------------------------------------------------
    async def forward(self, request: Request, path: str, payload: dict, raw: bytes, t0: float,
                      deadline: float) -> Response:
        """Answer ``payload`` (``raw``: its bytes) from the routed backend."""
        requested = payload["model"]
        route = self.router.route(requested)
        b = route.backend
        stream = payload.get("stream") is True
        opts = payload.get("stream_options")
        wants_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        if route.model != requested or (stream and not wants_usage):
            body = dict(payload, model=route.model)
            if stream:
                body["stream_options"] = {**(opts or {}), "include_usage": True}
            raw = json.dumps(body, ensure_ascii=False).encode()
        self._maybe_shadow(b, path, payload, stream, requested)
        headers = {"X-Harp-Backend": b.name}
        exchange = Exchange(Recorder(self.metrics, b.name, requested, "primary", t0), b)
        ex: Exchange | None = exchange  # None once the stream's response owns it
        try:
            try:
                async with cancel_on_disconnect(request), asyncio.timeout_at(deadline):
                    await b.acquire(self.cfg.queue_timeout)
                    exchange.slot = True
                    exchange.resp = await b.client.post(f"{b.url}/v1/{path}", data=raw,
                                                        headers=b.headers)
                    if b.up is not True:  # it answered: up (a probe may not have run yet)
                        self.backends.mark(b, True)
                    relayed = stream and exchange.resp.status < 400
                    if not relayed:
                        content = await read_capped(exchange.resp, self.cfg.max_response_bytes)
            except ClientGone:
                exchange.close()
                return Response(status_code=CLIENT_CLOSED)
            except Exception as e:
                raise self._upstream_failure(exchange, e, headers) from None
            if not relayed:
                return self._plain_answer(exchange, content, headers)
            # The stream's response owns the exchange from here (it closes it when done).
            handed, ex = exchange, None
            relay = SSERelay(handed.rec, wants_usage, self.cfg.max_sse_event_bytes)
            return RelayResponse(self._relay(handed, relay, deadline), handed, deadline,
                                 media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
        finally:
            if ex is not None:
                ex.close((500, "internal"))

    def _plain_answer(self, ex: Exchange, content: bytes, headers: dict) -> Response:
        status, b = ex.response.status, ex.backend
        usage = None
        try:
            data = loads_reply(content)
            usage = data.get("usage") if isinstance(data, dict) else None
        except ValueError:
            if status < 400:
                ex.rec.fail(502, "broken")
                raise UpstreamError(502, f"backend '{b.name}' sent a response that is not JSON",
                                    "bad_gateway", headers=headers) from None
            # The backend's own text is not passed on (it may name hosts, paths or versions).
            logger.info("backend %s answered %d with a body that is not JSON: %r", b.name,
                        status, content[:200])
            content = json.dumps(error_payload(
                status, f"backend '{b.name}' answered {status} (its body was not JSON)",
                "upstream_error")).encode()
        ex.rec.finish(status, usage)
        return Response(content, status_code=status, media_type="application/json",
                        headers=headers)

    def _upstream_failure(self, ex: Exchange, e: Exception, headers: dict) -> GatewayError:
        return upstream_failure(ex, e, headers, self.cfg, self.backends)

    async def _relay(self, ex: Exchange, relay: SSERelay, deadline: float
                     ) -> AsyncIterator[bytes]:
        """The backend's SSE stream, event by event; a break ends it with an error event."""
        rec, b, content = ex.rec, ex.backend, ex.response.content
        try:
            while True:
                async with asyncio.timeout_at(deadline):
                    chunk = await content.readany()
                if not chunk:
                    break
                events = relay.feed(chunk)
                if relay.saw_done and relay.saw_error is None:
                    # Complete: record it now, before forwarding [DONE] lets the caller hang
                    # up (a disconnect then cancels this generator before the loop ends).
                    rec.finish(200)
                if events:
                    yield b"".join(events)
            rest = relay.flush()
            if rest:
                yield b"".join(rest)
            if relay.saw_error is not None:
                code = relay.saw_error.get("code")
                rec.fail(code if isinstance(code, int) and 400 <= code <= 599 else 500,
                         "upstream")
            elif not relay.saw_done:
                rec.fail(502, "broken")
                yield sse_error(502, f"backend '{b.name}' ended the stream early", "bad_gateway")
            else:
                rec.finish(200)
        except Exception as e:
            try:
                err = self._upstream_failure(ex, e, {})
            except Exception:
                logger.exception("unexpected error relaying a stream")
                rec.fail(500, "internal")
                err = GatewayError(500, "internal gateway error", "internal_error")
            yield sse_error(err.status, f"{err.message} (mid-stream)", err.code or "error")
        finally:
            ex.close()

    # -- shadow mirroring --------------------------------------------------------------------
    def _maybe_shadow(self, primary: BackendState, path: str, payload: dict, stream: bool,
                      requested: str) -> None:
        for sh in self.cfg.shadows:
            if sh.source != primary.name or self.rng.random() >= sh.fraction:
                continue
            target = self.backends.all[sh.target]
            if len(self._shadow_tasks) >= self.cfg.shadow_max_inflight or not (
                    sh.model or target.models):
                self.metrics.shadow_dropped.labels(target.name).inc()
                continue
            body = dict(payload, model=sh.model or target.models[0])
            if stream:
                body["stream_options"] = {**(payload.get("stream_options") or {}),
                                          "include_usage": True}
            task = asyncio.create_task(self._shadow(target, path, json.dumps(body).encode(),
                                                    stream, requested))
            self._shadow_tasks.add(task)
            task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, b: BackendState, path: str, raw: bytes, stream: bool,
                      requested: str) -> None:
        if not await b.try_acquire():
            self.metrics.shadow_dropped.labels(b.name).inc()
            return
        ex = Exchange(Recorder(self.metrics, b.name, requested, "shadow", time.perf_counter()),
                      b)
        ex.slot = True
        deadline = asyncio.get_running_loop().time() + self.cfg.request_timeout
        try:
            async with asyncio.timeout_at(deadline):
                ex.resp = await b.client.post(f"{b.url}/v1/{path}", data=raw, headers=b.headers)
                if ex.resp.status >= 400 or not stream:
                    content = await read_capped(ex.resp, self.cfg.max_response_bytes)
                    usage = None
                    with contextlib.suppress(ValueError, AttributeError):
                        usage = loads_reply(content).get("usage")  # type: ignore[attr-defined]
                    ex.rec.finish(ex.resp.status, usage)
                    return
                relay = SSERelay(ex.rec, False, self.cfg.max_sse_event_bytes)
                async for chunk in ex.resp.content.iter_any():
                    relay.feed(chunk)
                relay.flush()
            if relay.saw_done and relay.saw_error is None:
                ex.rec.finish(200)
            else:
                ex.rec.fail(502, "broken")
        except Exception as e:
            with contextlib.suppress(Exception):
                self._upstream_failure(ex, e, {})
        finally:
            ex.close((CLIENT_CLOSED, "cancelled"))
