"""One request to one backend: an :class:`Exchange` owns the request's recorder (in-flight
gauge), its backend connection slot and the upstream response, and ``close()`` releases all
three exactly once: in the gateway's ``forward`` for a plain answer or a failure, in the
streamed response's (:class:`RelayResponse`) ``finally`` once a stream was handed over. And
what the caller sees when talking to the backend fails (:func:`upstream_failure`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp
import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse

from ..errors import describe
from .backend_state import BackendBusy, Backends, BackendState
from .config import GatewayConfig
from .openai_errors import CLIENT_CLOSED, ClientGone, GatewayError
from .relay import Recorder, TooLarge

logger = logging.getLogger("harp_vllm.gateway")

# How long past its deadline a response may still be writing before the connection is cut.
WRITE_GRACE_S = 1.0


class UpstreamError(GatewayError):
    """A failure after routing (the request is counted under ``errors``, not ``rejected``)."""


class Exchange:
    """One request to one backend: recorder, connection slot and response, closed once."""

    def __init__(self, rec: Recorder, backend: BackendState):
        self.rec, self.backend = rec, backend
        self.slot = False
        self.resp: aiohttp.ClientResponse | None = None

    def close(self, unfinished: tuple[int, str] = (CLIENT_CLOSED, "client_disconnect")) -> None:
        """Release everything; a request not yet recorded is recorded as ``unfinished``."""
        if self.resp is not None:
            # A complete answer frees the connection for reuse; anything else closes it, which
            # is what makes the backend (vLLM) abort the generation.
            if self.rec.done and self.resp.content.at_eof():
                self.resp.release()
            else:
                self.resp.close()
            self.resp = None
        if self.slot:
            self.slot = False
            self.backend.release()
        if not self.rec.done:
            self.rec.fail(*unfinished)

    @property
    def response(self) -> aiohttp.ClientResponse:
        """The backend's response (only after the request was sent)."""
        assert self.resp is not None
        return self.resp


@contextlib.asynccontextmanager
async def cancel_on_disconnect(request: Request):
    """Run the block unless the caller disconnects first (then :class:`ClientGone`).

    One watcher task reads the ASGI channel (the body was read already, so the next message
    is the disconnect) and cancels this task when the caller goes away.
    """
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()
    if gone and task.cancelling():  # cancelled after the block's last await
        task.uncancel()
        raise ClientGone


class RelayResponse(StreamingResponse):
    """A streamed answer that always closes its exchange, even if never iterated, and ends by
    ``deadline``: a stream still being written ``WRITE_GRACE_S`` after it (the caller stopped
    reading, so the writes wait on a full socket) is cut: the caller's connection is aborted,
    the backend's request closed (so the backend stops generating) and the request counted as
    a 504 ``deadline`` failure. The grace lets the error event that ends a stream stopped at
    the deadline by a slow backend reach a caller that does read."""

    def __init__(self, content: AsyncIterator[bytes], ex: Exchange, deadline: float, **kw):
        super().__init__(content, **kw)
        self.ex, self.deadline = ex, deadline

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with asyncio.timeout_at(self.deadline + WRITE_GRACE_S):
                await super().__call__(scope, receive, send)
        except TimeoutError:
            self.ex.rec.fail(504, "deadline")
            cut = scope.get("harp.cut")
            if cut is not None:
                cut()
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()
                self.ex.close()


def upstream_failure(ex: Exchange, e: Exception, headers: dict, cfg: GatewayConfig,
                     backends: Backends) -> GatewayError:
    """The caller's error for an exception while talking to the backend (recorded on ``ex``;
    a failed connection marks the backend down in ``backends``); an unexpected exception is
    raised again."""
    b, rec = ex.backend, ex.rec
    if isinstance(e, GatewayError):
        return e
    if isinstance(e, BackendBusy):
        rec.fail(503, "busy")
        return UpstreamError(503, f"backend '{b.name}' is busy: all its "
                                  f"{cfg.max_connections} connections stayed in use for "
                                  f"{cfg.queue_timeout} s", "backend_busy",
                             headers={**headers, "Retry-After": "1"})
    # Callers see the backend's name and the kind of failure, never its address or the
    # library's message (that goes to the log and the protected /health).
    if isinstance(e, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        backends.mark(b, False, describe(e))
        rec.fail(503, "connect")
        return UpstreamError(503, f"backend '{b.name}' is unavailable (connection failed)",
                             "backend_unavailable", headers={**headers, "Retry-After": "5"})
    if isinstance(e, aiohttp.ServerTimeoutError):
        rec.fail(504, "timeout")
        return UpstreamError(504, f"backend '{b.name}' timed out (no data for "
                                  f"{cfg.read_timeout} s)", "backend_timeout",
                             headers=headers)
    if isinstance(e, TimeoutError):
        rec.fail(504, "deadline")
        return UpstreamError(504, f"the request took longer than the gateway's "
                                  f"{cfg.request_timeout} s limit", "request_timeout",
                             headers=headers)
    if isinstance(e, TooLarge):
        rec.fail(502, "too_large")
        return UpstreamError(502, f"backend '{b.name}' sent {e}", "response_too_large",
                             headers=headers)
    if isinstance(e, aiohttp.ClientError | ValueError | RecursionError):
        logger.info("backend %s broke off its response: %s", b.name, describe(e))
        rec.fail(502, "broken")
        return UpstreamError(502, f"backend '{b.name}' broke off its response "
                                  f"({type(e).__name__})", "bad_gateway", headers=headers)
    raise e
