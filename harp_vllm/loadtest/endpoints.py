"""The endpoints of an A/B load test, checked before any load: reachable, serving the model
asked for, honouring ``max_tokens`` with ``ignore_eos``, and counting a prompt's tokens the
way our tokenizer does."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import httpx

from harp_vllm.errors import UserError, describe

from . import server_metrics as prom


class EndpointError(UserError):
    """An endpoint is unreachable, serves another model, or fails the requests sent to it."""


@dataclass
class Endpoint:
    label: str
    url: str
    model: str | None = None
    metrics_url: str | None = None
    # filled in by check_endpoint
    served_model: str | None = None
    root: str | None = None
    max_model_len: int | None = None
    cache_info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        base = self.url.strip().rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        if not base.startswith(("http://", "https://")):
            raise UserError(f"{self.label} URL must start with http:// or https://: {self.url}")
        self.url = base
        if self.metrics_url is None:
            self.metrics_url = base + "/metrics"

    def describe(self) -> dict:
        return {"label": self.label, "url": self.url, "model": self.served_model,
                "root": self.root, "max_model_len": self.max_model_len,
                "metrics_url": self.metrics_url, "cache_info": self.cache_info}


def api_headers() -> dict[str, str]:
    """``$OPENAI_API_KEY`` as a Bearer token, as vLLM's load generator sends it with every
    request of a run (a gateway with API keys); the key is never stored or written out."""
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def check_endpoint(ep: Endpoint, timeout: float = 30.0) -> None:
    """Resolve the served model and check one tiny completion; raise EndpointError if not."""
    try:
        r = httpx.get(ep.url + "/v1/models", headers=api_headers(), timeout=timeout)
    except httpx.HTTPError as e:
        raise EndpointError(f"{ep.label} endpoint {ep.url} is unreachable ({describe(e)})") from e
    if r.status_code != 200:
        raise EndpointError(f"{ep.label} endpoint {ep.url}/v1/models answered HTTP "
                            f"{r.status_code}: {r.text[:200]}")
    try:
        models = r.json()["data"]
    except Exception as e:
        raise EndpointError(f"{ep.label} endpoint {ep.url} is not an OpenAI-compatible server "
                            f"(/v1/models: {r.text[:120]!r})") from e
    ids = [m.get("id") for m in models]
    if ep.model is None:
        if not ids:
            raise EndpointError(f"{ep.label} endpoint {ep.url} serves no model")
        ep.model = ids[0]
    if ep.model not in ids:
        raise EndpointError(f"{ep.label} endpoint {ep.url} does not serve model {ep.model!r} "
                            f"(it serves: {', '.join(map(str, ids)) or 'nothing'})")
    info = next(m for m in models if m.get("id") == ep.model)
    ep.served_model = ep.model
    ep.root = info.get("root")
    ep.max_model_len = info.get("max_model_len")
    body = {"model": ep.model, "prompt": "Hello", "max_tokens": 2, "ignore_eos": True,
            "temperature": 0.0}
    try:
        r = httpx.post(ep.url + "/v1/completions", json=body, headers=api_headers(),
                       timeout=timeout)
    except httpx.HTTPError as e:
        raise EndpointError(f"{ep.label} endpoint {ep.url}: a test completion failed "
                            f"({describe(e)})") from e
    if r.status_code != 200:
        raise EndpointError(f"{ep.label} endpoint {ep.url}: a test completion answered HTTP "
                            f"{r.status_code}: {r.text[:300]}")
    got = (r.json().get("usage") or {}).get("completion_tokens")
    if got != 2:
        raise EndpointError(f"{ep.label} endpoint {ep.url}: asked for 2 tokens with ignore_eos, "
                            f"got {got} (the server must honour max_tokens and ignore_eos)")
    snap = prom.scrape(ep.metrics_url) if ep.metrics_url else None
    if snap is None:
        ep.metrics_url = None  # not a vLLM metrics endpoint (e.g. through a gateway)
    else:
        ep.cache_info = snap.get("cache_info", {})


def check_prompt_tokens(ep: Endpoint, text: str, expected: int, timeout: float = 60.0) -> None:
    """The server must count ``text`` as ``expected`` tokens (same tokenizer as ours)."""
    body = {"model": ep.served_model, "prompt": text, "max_tokens": 1, "temperature": 0.0}
    try:
        r = httpx.post(ep.url + "/v1/completions", json=body, headers=api_headers(),
                       timeout=timeout)
        r.raise_for_status()
        got = r.json()["usage"]["prompt_tokens"]
    except Exception as e:
        raise EndpointError(f"{ep.label} endpoint {ep.url}: the tokenizer check failed "
                            f"({describe(e)})") from e
    if got != expected:
        raise EndpointError(f"{ep.label} endpoint counts {got} tokens in a prompt our tokenizer "
                            f"counts as {expected}: pass --tokenizer with the served model's "
                            "tokenizer (both endpoints must use the same one)")
