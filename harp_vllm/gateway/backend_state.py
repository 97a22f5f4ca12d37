"""Backend state: connections, a bounded queue per backend, and background health checks.

"Down" and "busy" are different things here. A backend is marked down when a connection to
it fails or its ``/health`` probe fails, and up again by the next successful probe (every
``health_interval`` s, in the background: ``/health`` answers from this state and never
waits on a backend). A backend is busy when all its ``max_connections`` are in use: a request
waits up to ``queue_timeout`` for one, then gets 503 with ``Retry-After``; busy never changes
``backend_up``. Models are re-discovered from ``/v1/models`` every ``discovery_interval`` s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import aiohttp

from ..errors import describe
from .config import Backend, GatewayConfig
from .openai_errors import loads_reply
from .prometheus_metrics import GatewayMetrics

logger = logging.getLogger("harp_vllm.gateway")

# Under uvicorn's (and so vLLM's) 5 s keep-alive, so a pooled connection is dropped by the
# gateway before the backend closes it under a request.
UPSTREAM_KEEPALIVE_S = 3.0


class BackendBusy(Exception):
    """No free connection to the backend within ``queue_timeout``."""


@dataclass
class BackendState:
    cfg: Backend
    max_connections: int
    models: list[str] = field(default_factory=list)
    cards: dict[str, dict] = field(default_factory=dict)
    discovered: bool = False  # models known (configured, or read from /v1/models once)
    up: bool | None = None
    last_error: str | None = None
    checked_at: float | None = None
    session: aiohttp.ClientSession | None = None

    def __post_init__(self) -> None:
        self.url = self.cfg.base_url
        self.headers = {"Content-Type": "application/json"}
        auth = self.cfg.auth_header()
        if auth:
            self.headers["Authorization"] = auth
        if self.cfg.models:
            self.models, self.discovered = list(self.cfg.models), True
        self.slots = asyncio.Semaphore(self.max_connections)
        self.in_use = 0  # slots taken (a replaced backend's connections close at 0)

    @property
    def client(self) -> aiohttp.ClientSession:
        """The HTTP session (opened when the gateway starts)."""
        assert self.session is not None
        return self.session

    @property
    def name(self) -> str:
        return self.cfg.name

    async def acquire(self, wait: float) -> None:
        """Take a connection slot, waiting at most ``wait`` s (then :class:`BackendBusy`)."""
        if not self.slots.locked():
            await self.slots.acquire()
            self.in_use += 1
            return
        try:
            async with asyncio.timeout(wait):
                await self.slots.acquire()
        except TimeoutError:
            raise BackendBusy from None
        self.in_use += 1

    async def try_acquire(self) -> bool:
        """Take a slot only if one is free now (shadow copies never queue)."""
        if self.slots.locked():
            return False
        await self.slots.acquire()  # free: returns without waiting
        self.in_use += 1
        return True

    def release(self) -> None:
        self.in_use -= 1
        self.slots.release()


class Backends:
    """Every backend's state, its HTTP session, and the health/discovery loop."""

    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics,
                 known: set[str] | None = None):
        """``known``: backends already reported by the Backends this one replaces (a
        reload), whose ``backend_up`` stays as it is until this one's first probe."""
        self.cfg, self.metrics = config, metrics
        self.all = {b.name: BackendState(b, config.max_connections) for b in config.backends}
        targets = {s.target for s in config.shadows}
        for name in self.all:
            metrics.init_backend(name, shadow_target=name in targets)
            if name not in (known or ()):
                metrics.backend_up.labels(name).set(0)
        self._tasks: list[asyncio.Task] = []
        self._kick: asyncio.Task | None = None
        self._last_discovery = 0.0

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        c = self.cfg
        for b in self.all.values():
            b.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=c.max_connections + c.shadow_max_inflight + 4,
                    keepalive_timeout=UPSTREAM_KEEPALIVE_S, ttl_dns_cache=60),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=c.connect_timeout,
                                              sock_read=c.read_timeout),
                # No Accept-Encoding: replies are relayed byte for byte, never decompressed.
                auto_decompress=False, trust_env=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"))
        await self.check_all(discover=True)
        # One loop per backend: a hung backend's probes never delay another's.
        self._tasks = [asyncio.create_task(self._loop(b)) for b in self.all.values()]

    async def stop(self) -> None:
        await self.stop_probes()
        await self.close_sessions()

    async def stop_probes(self) -> None:
        for t in (*self._tasks, self._kick):
            if t is not None:
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t

    async def close_sessions(self) -> None:
        for b in self.all.values():
            if b.session is not None:
                await b.session.close()

    async def _loop(self, b: BackendState) -> None:
        last_discovery = time.monotonic()
        while True:
            await asyncio.sleep(self.cfg.health_interval)
            due = time.monotonic() - last_discovery >= self.cfg.discovery_interval
            if due:
                last_discovery = time.monotonic()
            try:
                await self.check(b, discover=due)
            except Exception:  # never let the loop die
                logger.exception("health check of %s failed", b.name)

    # -- probes ------------------------------------------------------------------------------
    def mark(self, b: BackendState, up: bool, error: str | None = None) -> None:
        if up != b.up and b.up is not None:
            logger.warning("backend %s is %s%s", b.name, "up" if up else "down",
                           f" ({error})" if error else "")
        b.up, b.last_error, b.checked_at = up, error, time.time()
        self.metrics.backend_up.labels(b.name).set(1 if up else 0)

    async def _get(self, b: BackendState, path: str) -> tuple[int, bytes]:
        assert b.session is not None
        async with asyncio.timeout(self.cfg.health_timeout), b.session.get(
                b.url + path, headers=b.headers) as r:
            return r.status, await r.content.read(4 * 1024 * 1024)

    async def check(self, b: BackendState, discover: bool) -> None:
        """Probe ``/health``; read ``/v1/models`` when asked, or when the models are unknown
        or the backend just came back."""
        was_up = b.up
        try:
            status, _ = await self._get(b, "/health")
            if status != 200:
                self.mark(b, False, f"/health answered {status}")
                return
            if discover or not b.discovered or not was_up:
                await self._discover(b)
            self.mark(b, True)
        except Exception as e:
            self.mark(b, False, describe(e) if not isinstance(e, TimeoutError)
                      else f"no answer within {self.cfg.health_timeout} s")

    async def _discover(self, b: BackendState) -> None:
        status, body = await self._get(b, "/v1/models")
        if status != 200:
            raise RuntimeError(f"/v1/models answered {status}")
        reply = loads_reply(body)
        data = (reply.get("data") if isinstance(reply, dict) else None) or []
        cards = {d["id"]: d for d in data if isinstance(d, dict) and isinstance(d.get("id"), str)}
        if b.cfg.models is None:
            b.models = list(cards)
        b.cards, b.discovered = cards, True

    async def check_all(self, discover: bool) -> None:
        if discover:
            self._last_discovery = time.monotonic()
        await asyncio.gather(*(self.check(b, discover) for b in self.all.values()))

    def kick(self) -> None:
        """Start a discovery round now, in the background (at most one per second)."""
        if (self._kick is not None and not self._kick.done()) or (
                time.monotonic() - self._last_discovery < 1.0):
            return
        self._kick = asyncio.create_task(self.check_all(discover=True))

    # -- reports -----------------------------------------------------------------------------
    def health(self, detailed: bool) -> tuple[int, dict]:
        """``/health`` from the last probes: 200 if any backend is up, else 503.

        The open report says up/down and models per backend; the detailed one (behind the API
        key with ``protect_metrics``) adds the URL (credentials redacted) and the last error.
        """
        states = {}
        for b in self.all.values():
            s: dict = {"up": bool(b.up), "models": b.models}
            if detailed:
                s.update(url=b.cfg.shown_url, error=b.last_error, checked_at=b.checked_at)
            states[b.name] = s
        n_up = sum(1 for s in states.values() if s["up"])
        status = "ok" if n_up == len(states) else ("degraded" if n_up else "down")
        return (200 if n_up else 503), {"status": status, "backends": states}

    def any_up(self) -> bool:
        return any(b.up for b in self.all.values())
