"""Running the gateway under uvicorn, guarded against slow, oversized and surplus connections.

uvicorn's httptools protocol has a keep-alive timeout but no limit on how long a client may
take to send its request headers, none on their size or number (llhttp and httptools keep
every header line; httptools even grows one header value by concatenation, so a 16 MiB value
costs quadratic copying), no cap on open connections and no way for the app to cut a client
that stopped reading. :func:`guarded_protocol` adds all of these to that protocol:

* connections: over ``max_client_connections`` open connections, or over
  ``max_connections_per_client`` from one client address, a new one is answered 503 and
  closed;
* headers: the request line and headers must end within ``max_header_bytes`` and hold at
  most ``max_header_count`` lines, else 431 before anything more is read (the bytes are
  counted as they arrive, ahead of the parser, so nothing over the limit is ever buffered;
  the connection then stops reading and is closed 0.5 s after the answer); they must be
  complete ``header_timeout`` s after the connection opened (or its next request began),
  else 408;
* a malformed request gets the OpenAI error shape (uvicorn's is a text/plain 400);
* ``scope["harp.cut"]`` aborts the connection (the app uses it for a stream whose client
  stopped reading past the request deadline) and ``scope["harp.cut_at"](when)`` does it at
  loop time ``when`` if the response's bytes are still waiting in the write buffer then.

The limits are enforced here rather than by switching to uvicorn's h11 parser (which bounds
an incomplete event at 16 KiB but not the header count) because httptools costs a fraction of
h11's CPU per request and the gateway's overhead budget is a fraction of a millisecond. The
body's own timeout and size are enforced by the app.

:func:`serve` runs it: SIGTERM drains (the listener closes, requests in flight get
``shutdown_timeout`` s), SIGHUP reloads keys and backends (see :mod:`.app`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable

from .config import GatewayConfig
from .openai_errors import error_payload
from .prometheus_metrics import GatewayMetrics

logger = logging.getLogger("harp_vllm.gateway")

# A refused connection stops being read at once and is closed this long after its answer
# (closing at once would reset it before the client read the answer).
LINGER_S = 0.5


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps(error_payload(status, message, code)).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n"
            + ("retry-after: 1\r\n" if status == 503 else "") + "\r\n").encode() + body


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that is being refused."""


def guarded_protocol(config: GatewayConfig, metrics: GatewayMetrics) -> type | None:
    """uvicorn's httptools protocol with the guards above (None when httptools is not
    installed; uvicorn then runs unguarded, with a warning). Long: the protocol subclass is
    defined inside, to close over ``config`` and ``metrics``."""
    try:
        import httptools
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        logger.warning("httptools is not installed: no header limits, header timeout or "
                       "connection caps")
        return None
    too_many = _raw_response(503, "Service Unavailable", "too many open connections",
                             "too_many_connections")
    too_many_here = _raw_response(503, "Service Unavailable", "too many open connections "
                                  "from your address", "too_many_client_connections")
    too_slow = _raw_response(408, "Request Timeout", "request headers not received within "
                             f"{config.header_timeout} s", "request_timeout")
    too_big = _raw_response(431, "Request Header Fields Too Large", "the request line and "
                            f"headers are over {config.max_header_bytes} bytes",
                            "request_headers_too_large")
    too_long = _raw_response(431, "Request Header Fields Too Large", "the request has more "
                             f"than {config.max_header_count} header lines",
                             "request_headers_too_large")
    malformed = _raw_response(400, "Bad Request", "Invalid HTTP request received",
                              "invalid_http_request")
    per_client: Counter[str] = Counter()

    class GuardedProtocol(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None
        _cut_timer: asyncio.TimerHandle | None = None
        _refused = False     # never registered with uvicorn (over a connection cap)
        _closing = False     # answered with an error; whatever else arrives is ignored
        _pending: bytes | None = None
        _peer: str | None = None
        _in_head = True      # between a request's start and the end of its headers
        _head_bytes = 0
        _head_lines = 0

        # -- connections ---------------------------------------------------------------------
        def connection_made(self, transport) -> None:
            peer = transport.get_extra_info("peername")
            host = peer[0] if isinstance(peer, tuple) and peer else None
            refusal = None
            if len(self.connections) >= config.max_client_connections:
                refusal = too_many, "too_many_connections"
            elif host is not None and per_client[host] >= config.max_connections_per_client:
                refusal = too_many_here, "too_many_client_connections"
            if refusal is not None:
                self._refused, self.transport = True, transport
                metrics.rejected.labels("503", refusal[1]).inc()
                transport.write(refusal[0])
                transport.close()
                return
            if host is not None:
                self._peer = host
                per_client[host] += 1
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._cut_timer is not None:
                self._cut_timer.cancel()
            if self._peer is not None:
                per_client[self._peer] -= 1
                if per_client[self._peer] <= 0:
                    del per_client[self._peer]
                self._peer = None
            if not self._refused:
                super().connection_lost(exc)

        # -- reading: header block size and count ----------------------------------------------
        def data_received(self, data: bytes) -> None:
            if self._refused or self._closing:
                return
            if self._in_head:
                room = config.max_header_bytes - self._head_bytes
                if len(data) > room:
                    # Parse only up to the limit: the headers end within it, or 431.
                    if room > 0:
                        self._head_bytes += room
                        self._feed(data[:room])
                    if self._closing:
                        return
                    if self._in_head:
                        self._refuse(too_big, 431, "header_bytes")
                        return
                    self.data_received(data[room:])
                    return
                self._head_bytes += len(data)
            self._feed(data)

        def _feed(self, data: bytes) -> None:
            """uvicorn's ``data_received`` with OpenAI-shaped refusals (websocket upgrades
            are off: ``ws="none"``)."""
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self._unsupported_upgrade_warning()
            except httptools.HttpParserError:
                if self._pending is not None:
                    self._refuse(self._pending, 431, "header_count")
                else:
                    self._refuse(malformed, 400, "malformed_http")

        def send_400_response(self, msg: str) -> None:  # uvicorn's text/plain 400
            self._refuse(malformed, 400, "malformed_http")

        def _refuse(self, response: bytes, status: int, reason: str) -> None:
            if self._closing:
                return
            self._closing = True
            self._disarm()
            metrics.rejected.labels(str(status), reason).inc()
            t = self.transport
            t.write(response)
            t.pause_reading()
            if t.can_write_eof():
                t.write_eof()
            self.loop.call_later(LINGER_S, t.abort)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_lines = True, 0
            self.scope["harp.cut"] = self._cut  # type: ignore[typeddict-unknown-key]
            self.scope["harp.cut_at"] = self._cut_at  # type: ignore[typeddict-unknown-key]
            self._arm()

        def on_header(self, name: bytes, value: bytes) -> None:
            self._head_lines += 1
            if self._head_lines > config.max_header_count:
                self._pending = too_long
                raise _Refused
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            self._in_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head, self._head_bytes = True, 0

        # -- header timeout --------------------------------------------------------------------
        def _arm(self) -> None:
            self._disarm()
            self._timer = self.loop.call_later(config.header_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _too_slow(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                metrics.rejected.labels("408", "header_timeout").inc()
                self.transport.write(too_slow)
                self.transport.close()

        # -- cutting a client that stopped reading -----------------------------------------------
        def _cut(self) -> None:
            if self.cycle is not None:  # what connection_lost will say, said now for the app
                self.cycle.disconnected = True
            self.transport.abort()

        def _cut_at(self, when: float) -> None:
            cycle = self.cycle
            if self._cut_timer is not None:
                self._cut_timer.cancel()

            def check() -> None:
                self._cut_timer = None
                if self.cycle is cycle and self.transport.get_write_buffer_size() > 0:
                    metrics.rejected.labels("504", "client_not_reading").inc()
                    self.transport.abort()

            self._cut_timer = self.loop.call_at(when, check)

    return GuardedProtocol


def serve(config: GatewayConfig, host: str = "127.0.0.1", port: int = 8080,
          log_level: str = "info", reload: Callable[[], GatewayConfig] | None = None) -> None:
    """Run the gateway with uvicorn until SIGINT/SIGTERM (which drain); ``reload`` builds
    the configuration again on SIGHUP."""
    import prometheus_client
    import uvicorn

    from .app import create_app

    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     gateway: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(log_level.upper() if log_level != "trace" else "DEBUG")
        logger.propagate = False
    if not config.api_keys:
        logger.warning("no API key: the gateway runs WITHOUT authentication "
                       "(allow_no_auth); anyone who can reach it can use it")
    prometheus_client.disable_created_metrics()  # half the series, none of them useful here
    metrics = GatewayMetrics()
    app = create_app(config, metrics, reload=reload)
    protocol = guarded_protocol(config, metrics)
    uvicorn.run(app, host=host, port=port, log_level=log_level, http=protocol or "auto",
                ws="none",
                # uvicorn annotates an int but schedules it with call_later: seconds as float
                timeout_keep_alive=config.keep_alive_timeout,  # type: ignore[arg-type]
                timeout_graceful_shutdown=config.shutdown_timeout,  # type: ignore[arg-type]
                access_log=log_level in ("debug", "trace"))
