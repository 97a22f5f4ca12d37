"""The scenario files of ``harp-vllm loadtest``, read and checked key by key: a *profile* (the
load: ``scenarios.PROFILE_KEYS``) and a *comparison* (the dense and the pruned endpoint, and
which profile to run against them).

The profiles that ship with the package are the repository's ``loadtest/profiles/*.toml``:
``harp_vllm/loadtest/profiles`` is a symlink to that folder, which a wheel build follows (the
files are package data, see ``pyproject.toml``), so an installed package reads the same files.
Every problem is a :class:`ScenarioFileError` naming the file and the key.
"""

from __future__ import annotations

import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from harp_vllm.errors import UserError

from .scenarios import PROFILE_KEYS, Config

PROFILE_DIR = Path(__file__).parent / "profiles"
# Keys that would hold a secret: refused with a pointer to the environment variable instead.
SECRET_KEYS = {"api_key", "api_keys", "key", "token", "password", "authorization", "headers"}
KEY_HINT = ("API keys are not stored in scenario files: export OPENAI_API_KEY (sent as a Bearer "
            "token to both endpoints)")


class ScenarioFileError(UserError):
    """A profile or comparison file is missing, not TOML, or has a wrong, missing or unknown
    key; the message starts with the file and names the key."""


@dataclass
class Side:
    """One endpoint of a comparison."""

    url: str
    model: str | None = None
    metrics_url: str | None = None


@dataclass
class Comparison:
    path: Path
    profile: Path  # resolved: a shipped profile or a file relative to the comparison
    dense: Side
    pruned: Side
    tokenizer: str | None = None


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def profile_path(ref: str, base: Path | None = None) -> Path:
    """The file of a profile: ``ref`` is a shipped profile's name (no ``/``, no ``.toml``) or a
    path (relative to ``base``, default the working directory)."""
    if "/" not in ref and not ref.endswith(".toml"):
        path = PROFILE_DIR / f"{ref}.toml"
        if not path.is_file():
            raise ScenarioFileError(f"no profile named {ref!r} (the profiles: "
                                    f"{', '.join(profile_names())}; or give a .toml path)")
        return path
    path = Path(ref).expanduser()
    return path if base is None or path.is_absolute() else base / path


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioFileError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScenarioFileError(f"{path}: cannot be read ({e})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioFileError(f"{path}: not valid TOML ({e})") from None


def _unknown(path: Path, data: dict, allowed: typing.Iterable[str], prefix: str = "") -> None:
    for key in data:
        if key in allowed:
            continue
        if key.lower() in SECRET_KEYS:
            raise ScenarioFileError(f"{path}: {prefix}{key}: {KEY_HINT}")
        raise ScenarioFileError(f"{path}: unknown key '{prefix}{key}' (known: "
                                f"{', '.join(allowed)})")


def _check(path: Path, key: str, value: Any, kind: Any) -> Any:
    """``value`` if it is a ``kind`` (positive for integers), else the error for ``key``."""
    def bad(what: str) -> ScenarioFileError:
        return ScenarioFileError(f"{path}: {key} must be {what}, not {value!r}")

    if kind is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind is int:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise bad("a positive integer")
    elif kind == list[int]:
        if (not isinstance(value, list) or not value
                or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in value)):
            raise bad("a non-empty list of positive integers")
        value = list(value)
    elif kind is str:
        if not isinstance(value, str) or not value.strip():
            raise bad("a non-empty string")
    else:  # pragma: no cover - a Config field type this reader does not know
        raise TypeError(f"profile key {key}: unsupported type {kind}")
    return value


def load_profile(path: Path) -> dict[str, Any]:
    """The profile file's settings (every key of ``PROFILE_KEYS``, checked)."""
    data = _read(path)
    _unknown(path, data, PROFILE_KEYS)
    types = typing.get_type_hints(Config)
    out = {}
    for key in PROFILE_KEYS:
        if key not in data:
            raise ScenarioFileError(f"{path}: missing key {key!r} (a profile sets every one "
                                    f"of: {', '.join(PROFILE_KEYS)})")
        out[key] = _check(path, key, data[key], types[key])
    return out


def check_url(url: str, where: str) -> str:
    """``url`` if it is a plain http(s) URL; credentials in it (``user:pass@``) are refused
    (they would be sent and written into results.json; the message never shows them)."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        raise UserError(f"{where}: not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{where} must start with http:// or https://")
    if "@" in parts.netloc:
        raise UserError(f"{where}: a URL with credentials (user:password@host) is refused; "
                        f"{KEY_HINT}")
    return url


def _side(path: Path, data: dict, label: str) -> Side:
    table = data.get(label)
    if not isinstance(table, dict):
        raise ScenarioFileError(f"{path}: missing table [{label}] (with url, and optionally "
                                "model and metrics_url)")
    _unknown(path, table, ("url", "model", "metrics_url"), f"{label}.")
    if "url" not in table:
        raise ScenarioFileError(f"{path}: missing key '{label}.url'")
    vals = {k: _check(path, f"{label}.{k}", v, str) for k, v in table.items()}
    for k in ("url", "metrics_url"):
        if k in vals:
            try:
                check_url(vals[k], f"{label}.{k}")
            except UserError as e:
                raise ScenarioFileError(f"{path}: {e}") from None
    return Side(**vals)


def load_comparison(path: Path) -> Comparison:
    """A comparison file: ``profile``, optional ``tokenizer``, tables ``[dense]`` and
    ``[pruned]``; its profile is resolved (and read, so that its errors show at start)."""
    data = _read(path)
    _unknown(path, data, ("profile", "tokenizer", "dense", "pruned"))
    if "profile" not in data:
        raise ScenarioFileError(f"{path}: missing key 'profile' (a name in loadtest/profiles "
                                "or a path relative to this file)")
    ref = _check(path, "profile", data["profile"], str)
    try:
        prof = profile_path(ref, base=path.parent)
        load_profile(prof)
    except ScenarioFileError as e:
        raise ScenarioFileError(f"{path}: profile: {e}") from None
    tok = _check(path, "tokenizer", data["tokenizer"], str) if "tokenizer" in data else None
    return Comparison(path=path, profile=prof, dense=_side(path, data, "dense"),
                      pruned=_side(path, data, "pruned"), tokenizer=tok)
