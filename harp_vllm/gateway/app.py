"""The gateway: one OpenAI-compatible endpoint in front of several vLLM servers.

Routes: ``GET /v1/models`` (union of the backends' models plus the aliases),
``POST /v1/completions`` and ``POST /v1/chat/completions`` (routed by ``model``; an alias is
split across backends by weight and its ``model`` rewritten to the chosen backend's),
``GET /health`` (per-backend status; 503 when no backend is up), ``GET /metrics``.

Behaviour worth knowing:

* Streams (SSE) are relayed event by event as they arrive, never buffered. The gateway asks the
  backend for ``stream_options.include_usage`` so it learns the prompt length; the usage-only
  final chunk is passed on only if the caller asked for it too.
* The caller's response carries ``X-Harp-Backend: <backend name>``.
* Errors are OpenAI-style JSON ``{"error": {"message", "type", "param", "code"}}``: 400 malformed
  JSON, 401 missing/wrong API key (when keys are configured), 404 unknown model or route,
  413 body over the limit, 422 wrong field types or missing fields, 502 backend broke the
  response, 503 backend unreachable, 504 backend timed out. A backend's own error status and
  body are passed through. A stream that breaks after it started ends with an ``error`` event.
* A client that disconnects cancels the upstream request (the backend sees the connection close
  and aborts the generation).
* An alias splits by weight among its backends that are not known to be down; a backend is
  marked down when a request or probe cannot reach it and up again by the next successful
  probe (every ``discovery_interval`` s, and on ``/health`` and ``/v1/models``).
* Shadow mirroring runs as a detached task: the caller never waits for it; its response is
  measured (``role="shadow"``) and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..serving_metrics import UNKNOWN_BUCKET, context_bucket
from .config import Backend, GatewayConfig
from .metrics import GatewayMetrics

logger = logging.getLogger("harp_vllm.gateway")

CLIENT_CLOSED = 499  # nginx's "client closed request"; only ever a metric label


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               404: "invalid_request_error", 405: "invalid_request_error",
               413: "invalid_request_error", 422: "invalid_request_error",
               500: "api_error", 502: "api_error", 503: "api_error", 504: "api_error"}


def error_payload(status: int, message: str, code: str | None = None,
                  param: str | None = None, type_: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_ or ERROR_TYPES.get(status, "api_error"),
                      "param": param, "code": code}}


class GatewayError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_payload(self.status, self.message, self.code, self.param),
                            status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The caller disconnected while we waited on the backend."""


# ---------------------------------------------------------------------------------------------
# Request bodies (validated, then forwarded as received: unknown fields pass through)
# ---------------------------------------------------------------------------------------------
NonNegInt = Annotated[int, Field(strict=True, ge=0)]
Number = Annotated[float, Field(strict=True)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool | None = None
    continuous_usage_stats: StrictBool | None = None


class _CommonBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: StrictStr = Field(min_length=1)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: NonNegInt | None = None
    n: Annotated[int, Field(strict=True, ge=1)] | None = None
    temperature: Annotated[float, Field(strict=True, ge=0)] | None = None
    top_p: Annotated[float, Field(strict=True, ge=0, le=1)] | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    user: StrictStr | None = None


class CompletionBody(_CommonBody):
    prompt: (Annotated[str, Field(strict=True)]
             | Annotated[list[StrictStr], Field(min_length=1)]
             | Annotated[list[StrictInt], Field(min_length=1)]
             | Annotated[list[Annotated[list[StrictInt], Field(min_length=1)]],
                         Field(min_length=1)])


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: StrictStr = Field(min_length=1)
    content: StrictStr | list[dict[str, Any]] | None = None


class ChatBody(_CommonBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: NonNegInt | None = None


ENDPOINTS = {"completions": CompletionBody, "chat/completions": ChatBody}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _is_union_tag(part: object) -> bool:
    """Whether a pydantic error-location part names a union branch, not a field."""
    return isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or "-" in part)


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """A one-line, OpenAI-style message and the offending parameter of a pydantic error."""
    errs = e.errors()
    # A union (prompt) reports one error per alternative: show the first, count the rest.
    first = errs[0]
    loc = [str(p) for p in first["loc"] if not _is_union_tag(p)]
    param = ".".join(loc) or None
    msg = first["msg"]
    if first["type"] == "missing":
        text = f"'{param}' is a required property"
    else:
        got = first.get("input")
        shown = json.dumps(got)[:80] if isinstance(got, str | int | float | bool | None) else (
            type(got).__name__)
        text = f"Invalid value for '{param}': {msg} (got {shown})"
    if len({tuple(x['loc'][:1]) for x in errs}) > 1:
        text += f" (and {len(errs) - 1} more problem(s))"
    return text, param


# ---------------------------------------------------------------------------------------------
# Backends and routing
# ---------------------------------------------------------------------------------------------
@dataclass
class BackendState:
    cfg: Backend
    models: list[str] = field(default_factory=list)
    cards: dict[str, dict] = field(default_factory=dict)
    up: bool | None = None
    last_error: str | None = None
    checked_at: float | None = None

    def __post_init__(self) -> None:
        if self.cfg.models:
            self.models = list(self.cfg.models)

    @property
    def name(self) -> str:
        return self.cfg.name

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.cfg.api_key:
            h["Authorization"] = f"Bearer {self.cfg.api_key}"
        return h


@dataclass
class Route:
    backend: BackendState
    model: str  # the model name sent upstream


def has_text(choices: list) -> bool:
    """Whether a streamed chunk's choices carry generated output."""
    for c in choices:
        if not isinstance(c, dict):
            continue
        if c.get("text"):
            return True
        delta = c.get("delta") or {}
        if isinstance(delta, dict) and (delta.get("content") or delta.get("reasoning_content")
                                        or delta.get("reasoning") or delta.get("tool_calls")):
            return True
    return False


class Recorder:
    """Times one upstream request and writes its metrics exactly once."""

    def __init__(self, metrics: GatewayMetrics, backend: str, model: str, role: str,
                 t0: float):
        self.m, self.backend, self.model, self.role, self.t0 = metrics, backend, model, role, t0
        self.first: float | None = None
        self.last: float | None = None
        self.gaps: list[float] = []
        self.usage: dict | None = None
        self.done = False
        self.m.inflight.labels(backend, role).inc()

    def token(self, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if self.first is None:
            self.first = now
        elif self.last is not None:
            self.gaps.append(now - self.last)
        self.last = now

    def _close(self, status: int, bucket: str) -> None:
        self.done = True
        self.m.inflight.labels(self.backend, self.role).dec()
        self.m.requests.labels(self.backend, self.model, self.role, bucket, str(status)).inc()

    def finish(self, status: int, usage: dict | None = None) -> None:
        if self.done:
            return
        usage = usage if isinstance(usage, dict) else self.usage
        prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        output = usage.get("completion_tokens") if isinstance(usage, dict) else None
        bucket = context_bucket(prompt if isinstance(prompt, int) else None)
        self._close(status, bucket)
        if status >= 400:
            self.m.errors.labels(self.backend, self.role, str(status), "upstream").inc()
            return
        e2e = time.perf_counter() - self.t0
        labels = (self.backend, self.role, bucket)
        self.m.e2e.labels(*labels).observe(e2e)
        if isinstance(prompt, int):
            self.m.prompt_tokens.labels(*labels).inc(prompt)
        if isinstance(output, int):
            self.m.output_tokens.labels(*labels).inc(output)
            if e2e > 0:
                self.m.tps.labels(*labels).observe(output / e2e)
        if self.first is not None:
            self.m.ttft.labels(*labels).observe(self.first - self.t0)
        for g in self.gaps:
            self.m.itl.labels(*labels).observe(g)

    def fail(self, status: int, kind: str) -> None:
        if self.done:
            return
        self._close(status, UNKNOWN_BUCKET)
        self.m.errors.labels(self.backend, self.role, str(status), kind).inc()


class SSERelay:
    """Splits a backend's SSE byte stream into events, watching timing and usage on the way."""

    def __init__(self, rec: Recorder, forward_usage_chunk: bool):
        self.rec = rec
        self.forward_usage_chunk = forward_usage_chunk
        self.buf = b""
        self.saw_done = False
        self.saw_error: dict | None = None

    def feed(self, chunk: bytes) -> list[bytes]:
        self.buf += chunk
        out = []
        while True:
            cut = [(i, n) for i, n in ((self.buf.find(b"\n\n"), 2),
                                       (self.buf.find(b"\r\n\r\n"), 4)) if i >= 0]
            if not cut:
                return out
            i, n = min(cut)
            event, self.buf = self.buf[:i], self.buf[i + n:]
            ev = self._event(event)
            if ev is not None:
                out.append(ev + b"\n\n")

    def flush(self) -> list[bytes]:
        rest, self.buf = self.buf, b""
        ev = self._event(rest) if rest.strip() else None
        return [ev + b"\n\n"] if ev is not None else []

    def _event(self, event: bytes) -> bytes | None:
        data = b"\n".join(line[5:].lstrip() for line in event.splitlines()
                          if line.startswith(b"data:"))
        if not data:
            return event
        if data.strip() == b"[DONE]":
            self.saw_done = True
            return event
        try:
            obj = json.loads(data)
        except ValueError:
            return event
        if not isinstance(obj, dict):
            return event
        if "error" in obj:
            self.saw_error = obj["error"] if isinstance(obj["error"], dict) else {}
            return event
        choices = obj.get("choices") or []
        if isinstance(obj.get("usage"), dict):
            self.rec.usage = obj["usage"]
        if has_text(choices):
            self.rec.token()
        if not choices and obj.get("usage") and not self.forward_usage_chunk:
            return None
        return event


def sse_error(status: int, message: str, code: str) -> bytes:
    return b"data: " + json.dumps(error_payload(status, message, code)).encode() + b"\n\n"


class RelayResponse(StreamingResponse):
    """A StreamingResponse that always closes the upstream stream, even if never iterated.

    Closing the upstream connection is what makes the backend (vLLM) abort the generation
    when the caller goes away; it runs shielded from the cancellation that a client
    disconnect delivers.
    """

    def __init__(self, content, upstream: httpx.Response, rec: Recorder, **kw):
        super().__init__(content, **kw)
        self.upstream, self.rec = upstream, rec

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()
                await self.upstream.aclose()
                if not self.rec.done:
                    self.rec.fail(CLIENT_CLOSED, "client_disconnect")


class Gateway:
    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics | None = None):
        self.cfg = config
        self.metrics = metrics or GatewayMetrics()
        self.backends = {b.name: BackendState(b) for b in config.backends}
        for name in self.backends:
            self.metrics.init_backend(name)
        self.aliases = {a.name: a for a in config.aliases}
        self.rng = random.Random(config.seed)
        self.client: httpx.AsyncClient | None = None
        self.started = int(time.time())
        self._shadow_tasks: set[asyncio.Task] = set()
        self._bg: asyncio.Task | None = None
        self._last_refresh = 0.0
        self._refresh_lock = asyncio.Lock()
        for name in self.backends:
            self.metrics.backend_up.labels(name).set(0)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        c = self.cfg
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=c.connect_timeout, read=c.read_timeout,
                                  write=c.write_timeout, pool=c.connect_timeout),
            limits=httpx.Limits(max_connections=c.max_connections,
                                max_keepalive_connections=min(64, c.max_connections)),
            trust_env=False)
        await self.refresh_models(force=True)
        self._bg = asyncio.create_task(self._discovery_loop())

    async def stop(self) -> None:
        tasks = [t for t in (self._bg, *self._shadow_tasks) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        if self.client is not None:
            await self.client.aclose()

    async def _discovery_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.discovery_interval)
            with contextlib.suppress(Exception):
                await self.refresh_models(force=True)

    # -- discovery and health ----------------------------------------------------------------
    def _mark(self, b: BackendState, up: bool, error: str | None = None) -> None:
        b.up, b.last_error, b.checked_at = up, error, time.time()
        self.metrics.backend_up.labels(b.name).set(1 if up else 0)

    async def _probe_models(self, b: BackendState) -> None:
        try:
            r = await self.client.get(f"{b.cfg.url}/v1/models", headers=b.headers(),
                                      timeout=self.cfg.health_timeout)
            r.raise_for_status()
            data = r.json().get("data") or []
            cards = {d["id"]: d for d in data if isinstance(d, dict) and "id" in d}
            if b.cfg.models is None:
                b.models = list(cards)
            b.cards = cards
            self._mark(b, True)
        except Exception as e:
            self._mark(b, False, describe(e))

    async def refresh_models(self, force: bool = False) -> None:
        """Re-read every backend's /v1/models (at most once a second unless forced)."""
        async with self._refresh_lock:
            if not force and time.monotonic() - self._last_refresh < 1.0:
                return
            await asyncio.gather(*(self._probe_models(b) for b in self.backends.values()))
            self._last_refresh = time.monotonic()

    async def health(self) -> tuple[int, dict]:
        async def probe(b: BackendState) -> None:
            try:
                r = await self.client.get(f"{b.cfg.url}/health", headers=b.headers(),
                                          timeout=self.cfg.health_timeout)
                if r.status_code == 200:
                    self._mark(b, True)
                else:
                    self._mark(b, False, f"/health answered {r.status_code}")
            except Exception as e:
                self._mark(b, False, describe(e))

        await asyncio.gather(*(probe(b) for b in self.backends.values()))
        states = {b.name: {"url": b.cfg.url, "up": bool(b.up), "models": b.models,
                           "error": b.last_error} for b in self.backends.values()}
        n_up = sum(1 for s in states.values() if s["up"])
        status = "ok" if n_up == len(states) else ("degraded" if n_up else "down")
        return (200 if n_up else 503), {"status": status, "backends": states}

    def models_listing(self) -> dict:
        data, seen = [], set()
        for b in self.backends.values():
            if not b.up:
                continue
            for m in b.models:
                if m in seen:
                    continue
                seen.add(m)
                card = dict(b.cards.get(m) or {"id": m, "object": "model", "created": self.started,
                                               "owned_by": b.name})
                data.append(card)
        for a in self.aliases.values():
            if a.name not in seen:
                data.append({"id": a.name, "object": "model", "created": self.started,
                             "owned_by": "harp-gateway",
                             "harp_alias": [{"backend": t.backend, "weight": t.weight}
                                            for t in a.targets]})
        return {"object": "list", "data": data}

    # -- routing -----------------------------------------------------------------------------
    def _upstream_model(self, b: BackendState, wanted: str | None) -> str:
        if wanted:
            return wanted
        if b.models:
            return b.models[0]
        raise GatewayError(503, f"backend '{b.name}' is unavailable (its model is not known yet: "
                                f"{b.last_error or 'not reachable'})", "backend_unavailable")

    def _candidates(self, model: str) -> list[tuple[float, BackendState, str | None]]:
        alias = self.aliases.get(model)
        if alias is not None:
            return [(t.weight, self.backends[t.backend], t.model) for t in alias.targets]
        return [(1.0, b, model) for b in self.backends.values() if model in b.models]

    async def route(self, model: str) -> Route:
        cands = self._candidates(model)
        if not cands:
            await self.refresh_models()
            cands = self._candidates(model)
        if not cands:
            raise GatewayError(404, f"The model '{model}' does not exist", "model_not_found",
                               "model")
        if len(cands) > 1:
            # Replicas of one model, or the arms of an alias: skip those known to be down (the
            # discovery loop, /health and /v1/models notice when they are back); if all are
            # down, try anyway and report the failure.
            live = [c for c in cands if c[1].up is not False]
            cands = live or cands
        weights = [c[0] for c in cands]
        _, backend, wanted = self.rng.choices(cands, weights=weights, k=1)[0]
        return Route(backend, self._upstream_model(backend, wanted))

    # -- forwarding --------------------------------------------------------------------------
    async def forward(self, request: Request, path: str, payload: dict, t0: float
                      ) -> Response:
        requested = payload["model"]
        route = await self.route(requested)
        body = dict(payload, model=route.model)
        stream = bool(payload.get("stream"))
        opts = payload.get("stream_options") or {}
        wants_usage = bool(opts.get("include_usage"))
        if stream:
            body["stream_options"] = {**opts, "include_usage": True}
        self._maybe_shadow(route.backend, path, body, stream, requested)

        b = route.backend
        rec = Recorder(self.metrics, b.name, requested, "primary", t0)
        headers = {"X-Harp-Backend": b.name}
        req = self.client.build_request("POST", f"{b.cfg.url}/v1/{path}", json=body,
                                        headers=b.headers())
        try:
            resp = await until_disconnect(request, self.client.send(req, stream=True))
        except ClientGone:
            rec.fail(CLIENT_CLOSED, "client_disconnect")
            return Response(status_code=CLIENT_CLOSED)
        except httpx.HTTPError as e:
            raise self._upstream_failure(b, rec, e, headers) from None
        self._mark(b, True)

        if resp.status_code >= 400 or not stream:
            try:
                content = await until_disconnect(request, resp.aread())
            except ClientGone:
                rec.fail(CLIENT_CLOSED, "client_disconnect")
                return Response(status_code=CLIENT_CLOSED)
            except httpx.HTTPError as e:
                raise self._upstream_failure(b, rec, e, headers, broken=True) from None
            finally:
                await resp.aclose()
            usage = None
            try:
                data = json.loads(content)
                usage = data.get("usage") if isinstance(data, dict) else None
            except ValueError:
                if resp.status_code < 400:
                    rec.fail(502, "broken")
                    raise GatewayError(502, f"backend '{b.name}' sent a response that is not "
                                            "JSON", "bad_gateway", headers=headers) from None
                content = json.dumps(error_payload(
                    resp.status_code, f"backend '{b.name}' answered {resp.status_code}: "
                    f"{content[:200].decode(errors='replace')}", "upstream_error")).encode()
            rec.finish(resp.status_code, usage)
            return Response(content, status_code=resp.status_code,
                            media_type="application/json", headers=headers)

        relay = SSERelay(rec, forward_usage_chunk=wants_usage)
        return RelayResponse(self._relay(resp, relay, b), upstream=resp, rec=rec,
                             media_type="text/event-stream",
                             headers={**headers, "Cache-Control": "no-cache",
                                      "X-Accel-Buffering": "no"})

    async def _relay(self, resp: httpx.Response, relay: SSERelay, b: BackendState
                     ) -> AsyncIterator[bytes]:
        rec = relay.rec
        try:
            async for chunk in resp.aiter_raw():
                events = relay.feed(chunk)
                if relay.saw_done and relay.saw_error is None:
                    # Complete: record it now, before forwarding [DONE] lets the caller hang
                    # up (a disconnect then cancels this generator before the loop ends).
                    rec.finish(200)
                for ev in events:
                    yield ev
            for ev in relay.flush():
                yield ev
            if relay.saw_error is not None:
                status = relay.saw_error.get("code")
                rec.fail(status if isinstance(status, int) and status >= 400 else 500,
                         "upstream")
            elif not relay.saw_done:
                rec.fail(502, "broken")
                yield sse_error(502, f"backend '{b.name}' ended the stream early",
                                "bad_gateway")
            else:
                rec.finish(200)
        except httpx.TimeoutException as e:
            rec.fail(504, "timeout")
            yield sse_error(504, f"backend '{b.name}' timed out mid-stream: {describe(e)}",
                            "backend_timeout")
        except httpx.HTTPError as e:
            self._mark(b, False, describe(e))
            rec.fail(502, "broken")
            yield sse_error(502, f"backend '{b.name}' failed mid-stream: {describe(e)}",
                            "bad_gateway")
        finally:
            if not rec.done:  # closed early: the caller went away
                rec.fail(CLIENT_CLOSED, "client_disconnect")
            with anyio.CancelScope(shield=True):
                await resp.aclose()

    def _upstream_failure(self, b: BackendState, rec: Recorder, e: Exception,
                          headers: dict, broken: bool = False) -> GatewayError:
        if isinstance(e, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
            self._mark(b, False, describe(e))
            rec.fail(503, "connect")
            return GatewayError(503, f"backend '{b.name}' is unavailable: {describe(e)}",
                                "backend_unavailable", headers=headers)
        if isinstance(e, httpx.TimeoutException):
            rec.fail(504, "timeout")
            return GatewayError(504, f"backend '{b.name}' timed out: {describe(e)}",
                                "backend_timeout", headers=headers)
        self._mark(b, False, describe(e))
        rec.fail(502, "broken")
        what = "broke off its response" if broken else "failed"
        return GatewayError(502, f"backend '{b.name}' {what}: {describe(e)}", "bad_gateway",
                            headers=headers)

    # -- shadow mirroring --------------------------------------------------------------------
    def _maybe_shadow(self, primary: BackendState, path: str, body: dict, stream: bool,
                      requested: str) -> None:
        for sh in self.cfg.shadows:
            if sh.source != primary.name or self.rng.random() >= sh.fraction:
                continue
            target = self.backends[sh.target]
            if len(self._shadow_tasks) >= self.cfg.shadow_max_inflight or not (
                    sh.model or target.models):
                self.metrics.shadow_dropped.labels(target.name).inc()
                continue
            copy = dict(body, model=sh.model or target.models[0])
            task = asyncio.create_task(self._shadow(target, path, copy, stream, requested))
            self._shadow_tasks.add(task)
            task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, b: BackendState, path: str, body: dict, stream: bool,
                      requested: str) -> None:
        rec = Recorder(self.metrics, b.name, requested, "shadow", time.perf_counter())
        try:
            async with self.client.stream("POST", f"{b.cfg.url}/v1/{path}", json=body,
                                          headers=b.headers()) as resp:
                if resp.status_code >= 400 or not stream:
                    content = await resp.aread()
                    usage = None
                    with contextlib.suppress(ValueError, AttributeError):
                        usage = json.loads(content).get("usage")
                    rec.finish(resp.status_code, usage)
                    return
                relay = SSERelay(rec, forward_usage_chunk=False)
                async for chunk in resp.aiter_raw():
                    relay.feed(chunk)
                relay.flush()
                if relay.saw_done and relay.saw_error is None:
                    rec.finish(200)
                else:
                    rec.fail(502, "broken")
        except httpx.TimeoutException:
            rec.fail(504, "timeout")
        except (httpx.ConnectError, httpx.PoolTimeout):
            rec.fail(503, "connect")
        except httpx.HTTPError:
            rec.fail(502, "broken")
        finally:
            if not rec.done:  # cancelled at shutdown
                rec.fail(CLIENT_CLOSED, "cancelled")


def describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


async def until_disconnect(request: Request, aw: Awaitable):
    """Await ``aw`` unless the client disconnects first (then cancel it, raise ClientGone)."""
    work = asyncio.ensure_future(aw)

    async def watch() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        watcher.cancel()
        raise
    if work in done:
        watcher.cancel()
        with contextlib.suppress(BaseException):
            await watcher
        return work.result()
    work.cancel()
    with contextlib.suppress(BaseException):
        await work
    raise ClientGone


# ---------------------------------------------------------------------------------------------
# The FastAPI app
# ---------------------------------------------------------------------------------------------
async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise GatewayError(400, "invalid Content-Length header", "invalid_request") from None
        if n > limit:
            raise GatewayError(413, f"request body is {n} bytes; the limit is {limit}",
                               "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise GatewayError(413, f"request body is over the limit of {limit} bytes",
                               "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def check_auth(request: Request, keys: list[str]) -> None:
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise GatewayError(401, "Missing API key: send 'Authorization: Bearer <key>'",
                           "missing_api_key", headers={"WWW-Authenticate": "Bearer"})
    token = token.strip()
    ok = scheme.lower() == "bearer" and any(
        hmac.compare_digest(token.encode(), k.encode()) for k in keys)
    if not ok:
        raise GatewayError(401, "Incorrect API key provided", "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})


def create_app(config: GatewayConfig, metrics: GatewayMetrics | None = None) -> FastAPI:
    gw = Gateway(config, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(title="harp-vllm gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.gateway = gw
    m = gw.metrics

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, e: GatewayError):
        if e.status < 500:
            m.rejected.labels(str(e.status), e.code or "invalid").inc()
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = "Not found" if e.status_code == 404 else str(e.detail)
        if e.status_code == 405:
            msg = f"Method {request.method} is not allowed on {request.url.path}"
        return JSONResponse(error_payload(e.status_code, msg), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(error_payload(422, str(e)), status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        logger.exception("unexpected gateway error")
        return JSONResponse(error_payload(500, f"internal gateway error: {describe(e)}",
                                          "internal_error"), status_code=500)

    @app.get("/health")
    async def health():
        status, body = await gw.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics_route():
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_auth(request, config.api_keys)
        await gw.refresh_models(force=True)
        return JSONResponse(gw.models_listing())

    async def handle(request: Request, path: str) -> Response:
        t0 = time.perf_counter()
        check_auth(request, config.api_keys)
        raw = await read_body(request, config.max_body_bytes)
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise GatewayError(400, f"We could not parse the JSON body of your request: {e}",
                               "invalid_json") from None
        if not isinstance(payload, dict):
            raise GatewayError(400, "The request body must be a JSON object",
                               "invalid_json")
        try:
            ENDPOINTS[path].model_validate(payload)
        except ValidationError as e:
            message, param = validation_message(e)
            code = ("missing_required_parameter" if "is a required property" in message
                    else "invalid_type")
            raise GatewayError(422, message, code, param) from None
        return await gw.forward(request, path, payload, t0)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "chat/completions")

    return app


def serve(config: GatewayConfig, host: str = "127.0.0.1", port: int = 8080,
          log_level: str = "info") -> None:
    """Run the gateway with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(config), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)
