"""Fill vLLM's model-info cache for the architectures the tests serve, in this one process.

vLLM inspects a lazily registered model class (every HARP architecture, and vLLM's own
models) in a fresh subprocess the first time a process needs it, about 15 s each on this
machine, and keeps the result in ``$VLLM_CACHE_ROOT/modelinfos`` keyed by a hash of the class's
module file. On an empty cache a test session paid that about ten times, once per architecture
and server. This script does what ``_LazyRegisteredModel.inspect_model_cls`` does (import the
class, ``_ModelInfo.from_model_cls``, save under the module's hash), for all of them in one
import of vLLM; vLLM then reads the entries as its own. Entries already there are kept.

Not warmed: the sixth family of ``tests/test_families.py`` (``qwen3_plugin``), whose first
start must still go through vLLM's subprocess inspection as a new family's does.

Prints vLLM's cache root (the session shares it with the native stack it starts).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def main() -> None:
    from vllm import ModelRegistry, envs
    from vllm.model_executor.models.registry import _LazyRegisteredModel, _ModelInfo

    from harp_vllm.families import FAMILIES
    from harp_vllm.vllm_plugin import register

    register()
    registry = ModelRegistry.models
    for arch in [f.harp_architecture for f in FAMILIES] + [f.hf_architecture for f in FAMILIES]:
        model = registry[arch]
        if not isinstance(model, _LazyRegisteredModel):
            continue
        spec = importlib.util.find_spec(model.module_name)
        assert spec is not None and spec.origin, model.module_name
        digest = model._get_modelinfo_module_hash(Path(spec.origin))
        if model._load_modelinfo_from_cache(digest) is None:
            model._save_modelinfo_to_cache(_ModelInfo.from_model_cls(model.load_model_cls()),
                                           digest)
    print(envs.VLLM_CACHE_ROOT)


if __name__ == "__main__":
    main()
