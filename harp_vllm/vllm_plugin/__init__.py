"""vLLM plugin: serve HARP-pruned checkpoints with vLLM's own model code.

Installed as the ``vllm.general_plugins`` entry point ``harp_vllm``; vLLM calls ``register``
in every process it starts. The model classes are registered lazily by "module:Class" name,
so importing this package (or ``harp_vllm``) does not import vLLM.

Modules: ``version.py`` (the supported vLLM releases, the guarded global swap),
``checkpoint_spec.py`` (the pruning section, validated and read per layer),
``config_check.py`` (the same validation where vLLM builds its config, before workers
start), ``fold.py`` (the V·O fold), ``attention.py`` (the changed layers' attention modules),
``factories.py`` (what a decoder layer builds in their place), ``mixins.py`` (the
pruned-layer forward and the checked weight loading), ``sharing.py`` (a layer over an
earlier layer's KV cache), ``pp_buffers.py`` (a vLLM pipeline-parallel workaround) and one
module per family (``llama.py``, ``qwen2.py``, ``gemma.py``); the families themselves are
records in ``harp_vllm.families``.
"""

from __future__ import annotations

from .. import families
from .version import (
    SKIP_VERSION_CHECK_ENV,
    SUPPORTED_VLLM,
    UnsupportedVllmVersion,
    check_vllm_version,
    version_check_skipped,
)


def plugin_classes() -> dict[str, str]:
    """HARP architecture name -> "module:Class" of its vLLM implementation, one per family."""
    return {f.harp_architecture: f.plugin_class for f in families.FAMILIES}


__all__ = ["SKIP_VERSION_CHECK_ENV", "SUPPORTED_VLLM", "UnsupportedVllmVersion",
           "check_vllm_version", "plugin_classes", "register"]


def register() -> None:
    """Register the HARP architectures with vLLM's ModelRegistry (safe to call repeatedly),
    their checkpoint check at config time (``config_check``) and the pipeline-parallel buffer
    workaround (``pp_buffers``), once per process.

    Fails with ``UnsupportedVllmVersion`` on a vLLM outside ``SUPPORTED_VLLM``.
    """
    import vllm

    if not version_check_skipped():
        check_vllm_version(vllm.__version__)
    from vllm import ModelRegistry

    from . import config_check, pp_buffers

    pp_buffers.install()
    config_check.install()
    supported = ModelRegistry.get_supported_archs()
    for arch, target in plugin_classes().items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
