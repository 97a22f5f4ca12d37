"""Gateway configuration: backends, A/B aliases, shadow mirroring, limits and keys.

A config file (JSON, TOML, or YAML when PyYAML is installed) holds a ``GatewayConfig``::

    {
      "backends": [{"name": "dense", "url": "http://127.0.0.1:8001"},
                   {"name": "harp", "url": "http://127.0.0.1:8002"}],
      "aliases": [{"name": "smollm2", "targets": [{"backend": "dense", "weight": 1},
                                                  {"backend": "harp", "weight": 1}]}],
      "shadows": [{"source": "dense", "target": "harp", "fraction": 0.1}],
      "api_keys": ["sk-..."], "max_body_bytes": 1048576
    }

Command-line flags use the same vocabulary (``--backend dense=URL``, ``--alias
smollm2=dense:1,harp:1``, ``--shadow dense=harp:0.1``) and extend the file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from ..errors import UserError

API_KEYS_ENV = "HARP_GATEWAY_API_KEYS"

Strict = ConfigDict(extra="forbid", strict=True)
Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


def check_key(key: object, where: str) -> str:
    """An API key, or a :class:`ValueError` naming ``where`` (never the key itself).

    A key is 1 to 4096 printable ASCII characters without spaces (a Bearer token never holds
    one), so an empty or blank key can never match a bare ``Authorization: Bearer``.
    """
    if not isinstance(key, str):
        raise ValueError(f"{where} must be a string, not {type(key).__name__}")
    if not key:
        raise ValueError(f"{where} is empty (an empty key would let a bare 'Bearer' in)")
    if key != key.strip():
        raise ValueError(f"{where} has leading or trailing whitespace")
    if len(key) > 4096 or not all("!" <= ch <= "~" for ch in key):
        raise ValueError(f"{where} is longer than 4096 characters or holds spaces, control or "
                         "non-ASCII characters")
    return key


def split_url(url: str) -> tuple[str, tuple[str, str] | None]:
    """Check a backend URL; return it without credentials, and the (user, password) if any.

    Scheme http or https, a host, a port in 1..65535, no query or fragment. Error messages
    never repeat the URL's password.
    """
    shown = redact_url(url)
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        # urllib's message may quote part of the netloc, i.e. of a password: never shown.
        raise ValueError(f"backend url {shown!r} is not a valid URL (its port, or a password "
                         "holding '/', '?', '#' or '@' that is not percent-encoded)") from None
    if "@" in url and "@" not in parts.netloc:
        # "http://user:pa/ss@host": the password's '/' ended the netloc, so urllib would take
        # the host from the password. Refused, whatever the parse found.
        raise ValueError(f"backend url {shown!r}: percent-encode '/', '?', '#' and '@' in "
                         "user:password@")
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"backend url {shown!r} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"backend url {shown!r} has no host")
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"backend url {shown!r}: port {port} is outside 1..65535")
    if parts.query or parts.fragment:
        raise ValueError(f"backend url {shown!r} must not have a query or fragment")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host if port is None else f"{host}:{port}"
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    creds = None
    if parts.username is not None or parts.password is not None:
        creds = (unquote(parts.username or ""), unquote(parts.password or ""))
    return urlunsplit((parts.scheme, netloc, path, "", "")), creds


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@`` (for messages and /health)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    if "@" in rest:
        # Everything up to the last '@' may be credentials, even past a '/' (a password
        # holding an unencoded '/' would otherwise be shown).
        rest = "***@" + rest.rpartition("@")[2]
    return f"{scheme}://{rest}"


class Backend(BaseModel):
    """One OpenAI-compatible server (normally a vLLM ``harp-vllm serve``).

    ``url`` may carry ``user:password@`` for a backend behind HTTP basic auth; it is sent as
    an ``Authorization: Basic`` header and never shown (``/health`` and messages redact it).
    It cannot be combined with ``api_key`` (both would be the Authorization header).
    """

    model_config = Strict

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    url: str
    # Served model names; None: discovered from the backend's /v1/models (and re-discovered).
    models: list[Annotated[str, StringConstraints(min_length=1)]] | None = None
    # Key sent upstream as "Authorization: Bearer ..." (the caller's key is never forwarded).
    api_key: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        split_url(v)  # raises on a bad URL
        return v.strip()

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, v: str | None) -> str | None:
        return None if v is None else check_key(v, "api_key")

    @model_validator(mode="after")
    def _one_credential(self) -> Backend:
        if self.api_key and split_url(self.url)[1]:
            raise ValueError(f"backend {self.name!r}: give either credentials in the url or "
                             "api_key, not both")
        return self

    @property
    def base_url(self) -> str:
        """The URL without credentials and without a trailing ``/v1``."""
        return split_url(self.url)[0]

    @property
    def shown_url(self) -> str:
        return redact_url(self.base_url if not split_url(self.url)[1] else self.url)

    def auth_header(self) -> str | None:
        """The ``Authorization`` value sent to this backend, if any."""
        if self.api_key:
            return f"Bearer {self.api_key}"
        creds = split_url(self.url)[1]
        if creds:
            import base64

            token = base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()
            return f"Basic {token}"
        return None


class AliasTarget(BaseModel):
    model_config = Strict

    backend: str
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    # The model name sent to that backend; None: the backend's (first) served model.
    model: str | None = Field(default=None, min_length=1)


class Alias(BaseModel):
    """A model name split across backends by weight (an A/B test)."""

    model_config = Strict

    name: str = Field(min_length=1)
    targets: list[AliasTarget] = Field(min_length=1)

    @model_validator(mode="after")
    def _finite_total(self) -> Alias:
        if not math.isfinite(sum(t.weight for t in self.targets)):
            raise ValueError(f"alias {self.name!r}: the weights' sum is not finite")
        return self


class Shadow(BaseModel):
    """Mirror ``fraction`` of the requests served by backend ``source`` to backend ``target``.

    The mirrored response is measured (role="shadow" in the metrics) and discarded; the caller
    never waits for it.
    """

    model_config = Strict

    source: str
    target: str
    fraction: float = Field(ge=0, le=1, allow_inf_nan=False)
    model: str | None = Field(default=None, min_length=1)


class GatewayConfig(BaseModel):
    """Everything the gateway needs; every limit has a default (see the README)."""

    model_config = Strict

    backends: list[Backend] = Field(min_length=1)
    aliases: list[Alias] = Field(default_factory=list)
    shadows: list[Shadow] = Field(default_factory=list)
    api_keys: list[str] = Field(default_factory=list)
    # With no API key the gateway refuses to start unless this says it may run open.
    allow_no_auth: bool = False
    # /metrics and the detailed /health need an API key too (/live stays open).
    protect_metrics: bool = False
    # -- callers
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)  # request line + headers (431)
    max_header_count: int = Field(default=100, ge=8, le=10_000)  # header lines (431)
    header_timeout: Seconds = 10.0      # connection open (or next request begun) to headers
    body_timeout: Seconds = 30.0        # headers to the whole body received
    keep_alive_timeout: Seconds = 5.0   # idle keep-alive connection closed after this
    max_client_connections: int = Field(default=1024, gt=0)
    max_connections_per_client: int = Field(default=128, gt=0)  # per client IP address
    shutdown_timeout: Seconds = 20.0    # SIGTERM: requests in flight get this long to finish
    max_json_depth: int = Field(default=32, ge=4, le=200)
    # JSON items in a request body: its , [ { outside strings (413)
    max_json_items: int = Field(default=100_000, ge=100)
    max_tokens_limit: int = Field(default=32768, gt=0)   # max_tokens, max_completion_tokens
    max_n: int = Field(default=16, gt=0)                 # n
    max_best_of: int = Field(default=16, gt=0)           # best_of
    # -- backends
    request_timeout: Seconds = 600.0    # whole request, first byte in to last byte out
    connect_timeout: Seconds = 5.0
    # Longest wait for the next byte from a backend (a non-streamed answer arrives all at once).
    read_timeout: Seconds = 300.0
    max_connections: int = Field(default=256, gt=0)      # per backend
    queue_timeout: Seconds = 10.0       # wait for a free connection to a busy backend
    max_response_bytes: int = Field(default=32 * 1024 * 1024, gt=0)  # non-streamed replies
    max_sse_event_bytes: int = Field(default=1024 * 1024, gt=0)
    health_interval: Seconds = 5.0
    health_timeout: Seconds = 3.0
    discovery_interval: Seconds = 15.0
    shadow_max_inflight: int = Field(default=16, ge=1)
    seed: int | None = None

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        return [check_key(k, f"api_keys[{i}]") for i, k in enumerate(v)]

    @model_validator(mode="after")
    def _check_names(self) -> GatewayConfig:
        names = [b.name for b in self.backends]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate backend names: {sorted(dup)}")
        known = set(names)
        for a in self.aliases:
            for t in a.targets:
                if t.backend not in known:
                    raise ValueError(f"alias {a.name!r} targets unknown backend {t.backend!r}")
        for s in self.shadows:
            for end in (s.source, s.target):
                if end not in known:
                    raise ValueError(f"shadow {s.source}->{s.target}: unknown backend {end!r}")
            if s.source == s.target:
                raise ValueError(f"shadow source and target are the same backend {s.source!r}")
        alias_names = [a.name for a in self.aliases]
        if len(set(alias_names)) != len(alias_names):
            raise ValueError("duplicate alias names")
        if self.protect_metrics and not self.api_keys:
            raise ValueError("protect_metrics needs at least one API key")
        if not self.api_keys and not self.allow_no_auth:
            raise ValueError(f"no API key: give --api-key, api_keys or ${API_KEYS_ENV}, or "
                             "--allow-no-auth (allow_no_auth: true) to run without "
                             "authentication")
        return self

    def backend(self, name: str) -> Backend:
        return next(b for b in self.backends if b.name == name)


def parse_backend_flag(text: str) -> dict[str, Any]:
    """``NAME=URL`` -> backend dict."""
    name, sep, url = text.partition("=")
    if not sep or not name or not url:
        raise UserError(f"--backend wants NAME=URL, got {text!r}")
    return {"name": name.strip(), "url": url.strip()}


def parse_alias_flag(text: str) -> dict[str, Any]:
    """``ALIAS=BACKEND[:WEIGHT],BACKEND[:WEIGHT]...`` -> alias dict."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise UserError(f"--alias wants NAME=BACKEND:WEIGHT,BACKEND:WEIGHT, got {text!r}")
    targets = []
    for part in rest.split(","):
        backend, _, weight = part.strip().partition(":")
        try:
            targets.append({"backend": backend, "weight": float(weight) if weight else 1.0})
        except ValueError:
            raise UserError(f"--alias {text!r}: weight {weight!r} is not a number") from None
    return {"name": name.strip(), "targets": targets}


def parse_shadow_flag(text: str) -> dict[str, Any]:
    """``SOURCE=TARGET:FRACTION`` -> shadow dict."""
    source, sep, rest = text.partition("=")
    target, _, frac = rest.partition(":")
    if not sep or not source or not target or not frac:
        raise UserError(f"--shadow wants SOURCE=TARGET:FRACTION, got {text!r}")
    try:
        fraction = float(frac)
    except ValueError:
        raise UserError(f"--shadow {text!r}: fraction {frac!r} is not a number") from None
    return {"source": source.strip(), "target": target.strip(), "fraction": fraction}


def read_config_file(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"cannot read gateway config {path}: {e}") from e
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise UserError("YAML config needs PyYAML; use JSON or TOML") from None
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"gateway config {path} is not valid "
                        f"{path.suffix.lstrip('.') or 'JSON'}: {e}") from e
    if not isinstance(data, dict):
        raise UserError(f"gateway config {path} must be an object at the top level")
    return data


def _list(data: dict[str, Any], key: str) -> list:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise UserError(f"invalid gateway config: {key}: must be a list, not "
                        f"{type(value).__name__}" + (" (write [\"...\"] for one entry)"
                                                     if isinstance(value, str) else ""))
    return value


def _keys(data: dict[str, Any], api_keys: list[str] | None) -> list[str]:
    """The configured keys: file, then flags, then ``$HARP_GATEWAY_API_KEYS``; each checked."""
    file_keys = _list(data, "api_keys")
    env = os.environ.get(API_KEYS_ENV)
    env_keys = [k.strip() for k in env.split(",")] if env is not None else []
    keys = []
    try:
        keys += [check_key(k, f"api_keys[{i}]") for i, k in enumerate(file_keys)]
        keys += [check_key(k, f"--api-key #{i + 1}") for i, k in enumerate(api_keys or [])]
        keys += [check_key(k, f"${API_KEYS_ENV} entry {i + 1}") for i, k in enumerate(env_keys)
                 if (env or "").strip()]
    except ValueError as e:
        raise UserError(f"invalid gateway config: {e}") from None
    return keys


def build_config(config_file: Path | None = None, backends: list[str] | None = None,
                 aliases: list[str] | None = None, shadows: list[str] | None = None,
                 api_keys: list[str] | None = None, **overrides: Any) -> GatewayConfig:
    """Merge a config file, flags and ``$HARP_GATEWAY_API_KEYS`` (comma-separated).

    Types are strict: a string where a list belongs, a string for a number, an empty key,
    a bad URL or an infinite weight are errors naming the setting (never a key's value).
    """
    data: dict[str, Any] = read_config_file(config_file) if config_file else {}
    data["backends"] = _list(data, "backends") + [parse_backend_flag(b) for b in backends or []]
    data["aliases"] = _list(data, "aliases") + [parse_alias_flag(a) for a in aliases or []]
    data["shadows"] = _list(data, "shadows") + [parse_shadow_flag(s) for s in shadows or []]
    data["api_keys"] = _keys(data, api_keys)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'config'}: "
                             f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors())
        raise UserError(f"invalid gateway config: {problems}") from None
