"""Relaying a backend's answer: per-request metrics, SSE event parsing, capped reads.

* :class:`Recorder` times one upstream request and writes its metrics exactly once (the
  in-flight gauge goes up when it is made and down when it is closed).
* :class:`SSERelay` splits an SSE byte stream into events in linear time (a partial line is
  never rescanned) and refuses an event over ``max_event_bytes``.
* :func:`read_capped` reads a non-streamed answer, refusing one over the size cap.
"""

from __future__ import annotations

import time

import aiohttp

from ..serving.metrics import UNKNOWN_BUCKET, context_bucket
from .openai_errors import loads_reply, status_label
from .prometheus_metrics import GatewayMetrics


class TooLarge(Exception):
    """A backend's reply or SSE event is over the configured cap."""


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

    def _close(self, status: str, bucket: str) -> None:
        self.done = True
        self.m.inflight.labels(self.backend, self.role).dec()
        self.m.requests.labels(self.backend, self.model, self.role, bucket, status).inc()

    def finish(self, status: int, usage: dict | None = None) -> None:
        """The backend answered ``status`` (an error status counts as ``upstream`` error)."""
        if self.done:
            return
        usage = usage if isinstance(usage, dict) else self.usage
        prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        output = usage.get("completion_tokens") if isinstance(usage, dict) else None
        prompt = prompt if isinstance(prompt, int) and not isinstance(prompt, bool) else None
        output = output if isinstance(output, int) and not isinstance(output, bool) else None
        bucket = context_bucket(prompt)
        label = status_label(status)
        self._close(label, bucket)
        if status >= 400:
            self.m.errors.labels(self.backend, self.role, label, "upstream").inc()
            return
        e2e = time.perf_counter() - self.t0
        labels = (self.backend, self.role, bucket)
        self.m.e2e.labels(*labels).observe(e2e)
        if prompt is not None and prompt >= 0:
            self.m.prompt_tokens.labels(*labels).inc(prompt)
        if output is not None and output >= 0:
            self.m.output_tokens.labels(*labels).inc(output)
            if e2e > 0:
                self.m.tps.labels(*labels).observe(output / e2e)
        if self.first is not None:
            self.m.ttft.labels(*labels).observe(self.first - self.t0)
        if self.gaps:
            itl = self.m.itl.labels(*labels)
            for g in self.gaps:
                itl.observe(g)

    def fail(self, status: int, kind: str) -> None:
        """The request failed before a complete answer (``kind``: see ``metrics``)."""
        if self.done:
            return
        label = status_label(status)
        self._close(label, UNKNOWN_BUCKET)
        self.m.errors.labels(self.backend, self.role, label, kind).inc()


class SSERelay:
    """Splits a backend's SSE byte stream into events, watching timing and usage on the way.

    Lines end with LF or CRLF; a blank line ends an event. The bytes of an unfinished line
    are scanned once (``_scan`` remembers where the search for a newline stopped), so the
    cost is linear in the stream size, and an event over ``max_event_bytes`` raises
    :class:`TooLarge` as soon as that many bytes are buffered.
    """

    def __init__(self, rec: Recorder, forward_usage_chunk: bool, max_event_bytes: int):
        self.rec = rec
        self.forward_usage_chunk = forward_usage_chunk
        self.max_event_bytes = max_event_bytes
        self.buf = bytearray()
        self._scan = 0
        self.lines: list[bytes] = []
        self.size = 0
        self.saw_done = False
        self.saw_error: dict | None = None

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self.buf
        buf += chunk
        out: list[bytes] = []
        pos = 0
        i = buf.find(b"\n", self._scan)
        while i >= 0:
            end = i - 1 if i > pos and buf[i - 1] == 13 else i
            if end > pos:
                self.size += end - pos + 1
                if self.size > self.max_event_bytes:
                    raise TooLarge(f"an SSE event over {self.max_event_bytes} bytes")
                self.lines.append(bytes(buf[pos:end]))
            elif self.lines:
                ev = self._event(self.lines)
                self.lines, self.size = [], 0
                if ev is not None:
                    out.append(ev)
            pos = i + 1
            i = buf.find(b"\n", pos)
        if pos:
            del buf[:pos]
        self._scan = len(buf)
        if self.size + len(buf) > self.max_event_bytes:
            raise TooLarge(f"an SSE event over {self.max_event_bytes} bytes")
        return out

    def flush(self) -> list[bytes]:
        """Events left when the stream ended without a final blank line."""
        if self.buf.strip():
            self.lines.append(bytes(self.buf).rstrip(b"\r"))
        self.buf.clear()
        lines, self.lines = self.lines, []
        ev = self._event(lines) if lines else None
        return [ev] if ev is not None else []

    def _event(self, lines: list[bytes]) -> bytes | None:
        raw = b"\n".join(lines) + b"\n\n"
        data = b"\n".join(ln[5:].lstrip() for ln in lines if ln.startswith(b"data:"))
        if not data:
            return raw
        if data == b"[DONE]":
            self.saw_done = True
            return raw
        try:
            obj = loads_reply(data)
        except ValueError:
            return raw
        if not isinstance(obj, dict):
            return raw
        if "error" in obj:
            self.saw_error = obj["error"] if isinstance(obj["error"], dict) else {}
            return raw
        choices = obj.get("choices") or []
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.rec.usage = usage
        if isinstance(choices, list) and has_text(choices):
            self.rec.token()
        if not choices and usage and not self.forward_usage_chunk:
            return None
        return raw


async def read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """The whole body of ``resp``, or :class:`TooLarge` past ``cap`` bytes."""
    if resp.content_length is not None:
        if resp.content_length > cap:
            raise TooLarge(f"a {resp.content_length}-byte reply (the limit is {cap})")
        return await resp.read()
    chunks, size = [], 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > cap:
            raise TooLarge(f"a reply over {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
