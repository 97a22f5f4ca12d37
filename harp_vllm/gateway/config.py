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
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import UserError

API_KEYS_ENV = "HARP_GATEWAY_API_KEYS"


class Backend(BaseModel):
    """One OpenAI-compatible server (normally a vLLM ``harp-vllm serve``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    url: str
    # Served model names; None: discovered from the backend's /v1/models (and re-discovered).
    models: list[str] | None = None
    # Key sent upstream as "Authorization: Bearer ..." (the caller's key is never forwarded).
    api_key: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if v.endswith("/v1"):
            v = v[:-3]
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"backend url must start with http:// or https://, got {v!r}")
        return v


class AliasTarget(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backend: str
    weight: float = Field(default=1.0, gt=0)
    # The model name sent to that backend; None: the backend's (first) served model.
    model: str | None = None


class Alias(BaseModel):
    """A model name split across backends by weight (an A/B test)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    targets: list[AliasTarget] = Field(min_length=1)


class Shadow(BaseModel):
    """Mirror ``fraction`` of the requests served by backend ``source`` to backend ``target``.

    The mirrored response is measured (role="shadow" in the metrics) and discarded; the caller
    never waits for it.
    """

    model_config = ConfigDict(extra="forbid")

    source: str
    target: str
    fraction: float = Field(ge=0, le=1)
    model: str | None = None


class GatewayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backends: list[Backend] = Field(min_length=1)
    aliases: list[Alias] = Field(default_factory=list)
    shadows: list[Shadow] = Field(default_factory=list)
    api_keys: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, gt=0)
    connect_timeout: float = Field(default=5.0, gt=0)
    # Longest wait for the next byte from a backend (a non-streamed answer arrives all at once).
    read_timeout: float = Field(default=600.0, gt=0)
    write_timeout: float = Field(default=30.0, gt=0)
    health_timeout: float = Field(default=3.0, gt=0)
    discovery_interval: float = Field(default=15.0, gt=0)
    max_connections: int = Field(default=256, gt=0)
    shadow_max_inflight: int = Field(default=16, ge=1)
    seed: int | None = None

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


def build_config(config_file: Path | None = None, backends: list[str] | None = None,
                 aliases: list[str] | None = None, shadows: list[str] | None = None,
                 api_keys: list[str] | None = None, **overrides: Any) -> GatewayConfig:
    """Merge a config file, flags and ``$HARP_GATEWAY_API_KEYS`` (comma-separated)."""
    data: dict[str, Any] = read_config_file(config_file) if config_file else {}
    data.setdefault("backends", [])
    data["backends"] = list(data["backends"]) + [parse_backend_flag(b) for b in backends or []]
    data["aliases"] = list(data.get("aliases", [])) + [parse_alias_flag(a) for a in aliases or []]
    data["shadows"] = list(data.get("shadows", [])) + [parse_shadow_flag(s)
                                                       for s in shadows or []]
    keys = list(data.get("api_keys", [])) + list(api_keys or [])
    keys += [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    data["api_keys"] = keys
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
                             for err in e.errors())
        raise UserError(f"invalid gateway config: {problems}") from None
