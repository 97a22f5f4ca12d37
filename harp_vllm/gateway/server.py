"""Running the gateway under uvicorn, guarded against slow and surplus client connections.

uvicorn has a keep-alive timeout but no limit on how long a client may take to send its
request headers (a slow-loris client sending a byte a second holds a connection forever) and
no cap on open connections. :func:`guarded_protocol` adds both to uvicorn's httptools
protocol: a connection over ``max_client_connections`` is answered 503 and closed, and one
whose request headers are not complete ``header_timeout`` s after it opened (or after its
next request began) is answered 408 and closed. The body's own timeout is enforced by the app.
"""

from __future__ import annotations

import asyncio
import json
import logging

from .config import GatewayConfig
from .errors import error_payload
from .metrics import GatewayMetrics

logger = logging.getLogger("harp_vllm.gateway")


def _raw_response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps(error_payload(status, message, code)).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n"
            + ("retry-after: 1\r\n" if status == 503 else "") + "\r\n").encode() + body


def guarded_protocol(config: GatewayConfig, metrics: GatewayMetrics) -> type | None:
    """uvicorn's httptools protocol with a header timeout and a connection cap (None when
    httptools is not installed; uvicorn then runs unguarded, with a warning). Long: the
    protocol subclass is defined inside, to close over ``config`` and ``metrics``."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        logger.warning("httptools is not installed: no header timeout or connection cap")
        return None
    too_many = _raw_response(503, "Service Unavailable", "too many open connections",
                             "too_many_connections")
    too_slow = _raw_response(408, "Request Timeout", "request headers not received within "
                             f"{config.header_timeout} s", "request_timeout")

    class GuardedProtocol(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None
        _refused = False

        def connection_made(self, transport) -> None:
            if len(self.connections) >= config.max_client_connections:
                self._refused, self.transport = True, transport
                metrics.rejected.labels("503", "too_many_connections").inc()
                transport.write(too_many)
                transport.close()
                return
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if not self._refused:
                super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if not self._refused:
                super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

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

    return GuardedProtocol


def serve(config: GatewayConfig, host: str = "127.0.0.1", port: int = 8080,
          log_level: str = "info") -> None:
    """Run the gateway with uvicorn until interrupted."""
    import prometheus_client
    import uvicorn

    from .app import create_app

    prometheus_client.disable_created_metrics()  # half the series, none of them useful here
    metrics = GatewayMetrics()
    app = create_app(config, metrics)
    protocol = guarded_protocol(config, metrics)
    uvicorn.run(app, host=host, port=port, log_level=log_level, http=protocol or "auto",
                # uvicorn annotates an int but schedules it with call_later: seconds as float
                timeout_keep_alive=config.keep_alive_timeout,  # type: ignore[arg-type]
                timeout_graceful_shutdown=5,
                access_log=log_level in ("debug", "trace"))
