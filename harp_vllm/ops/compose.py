"""The compose file as the native stack runner reads it: where it is, ``.env``, Compose's
variable interpolation (see ``ops.stack`` for the whole translation)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..paths import cache_dir

STACK_DIR_ENV = "HARP_STACK_DIR"
STATE_FILE = "state.json"
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the repository (harp_vllm/ops/../..)
DEFAULT_COMPOSE = Path("deploy") / "docker-compose.yml"
CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")



def stack_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$HARP_STACK_DIR`` or ``<model cache>/stack``."""
    env = os.environ if env is None else env
    value = env.get(STACK_DIR_ENV)
    return Path(value).expanduser() if value else cache_dir() / "stack"


def find_compose_file(path: str | Path | None = None) -> Path:
    """The compose file: ``path``, else ``deploy/docker-compose.yml`` here or in the source tree."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"compose file not found: {p}")
        return p.resolve()
    for cand in (Path.cwd() / DEFAULT_COMPOSE, SOURCE_ROOT / DEFAULT_COMPOSE):
        if cand.is_file():
            return cand.resolve()
    raise UserError(f"no {DEFAULT_COMPOSE} in {Path.cwd()} or {SOURCE_ROOT}; pass --file")


# -- compose file: .env, interpolation -----------------------------------------------------------

def read_env_file(path: Path) -> dict[str, str]:
    """A Compose ``.env`` file: ``KEY=VALUE`` lines, ``#`` comments, optional quotes."""
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        out[key] = value
    return out


_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])((?:[^{}]|\{[^{}]*\})*))?\}"
                  r"|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose variable interpolation of every string in ``value`` (recursively)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        val = env.get(name)
        if op is None:
            return val or ""
        unset_or_empty = val is None or (op.startswith(":") and val == "")
        if op.endswith("-"):
            return interpolate(arg, env) if unset_or_empty else (val or "")
        if op.endswith("?"):
            if unset_or_empty:
                raise UserError(f"compose variable {name} is required: {arg}")
            return val or ""
        return "" if unset_or_empty else interpolate(arg, env)  # "+": alternative value

    return _VAR.sub(sub, value)


def load_compose(path: Path, env: Mapping[str, str] | None = None) -> dict:
    """The compose file with variables interpolated (shell environment over ``.env``)."""
    import yaml

    merged = {**read_env_file(path.parent / ".env"), **(os.environ if env is None else env)}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        raise UserError(f"{path} has no services")
    return interpolate(data, merged)
