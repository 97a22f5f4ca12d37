"""The checkpoint checked where vLLM builds its config, before any engine or worker starts.

vLLM calls ``verify_and_update_config`` of the class that ``MODELS_CONFIG_MAP`` holds for a
model's architecture while it builds the engine's config, in the process that starts it.
``install`` adds one for every HARP architecture: the pruning section is validated there
against the configured tensor- and pipeline-parallel sizes, so a checkpoint vLLM cannot serve
as asked (a pruned layer that TP cannot split, a sharing pair split over PP stages, a broken
section) fails in seconds with the plugin's message, not after the workers have started. The
workers check it again when they build the model (``checkpoint_spec.pruning_spec``).
"""

from __future__ import annotations

from typing import Any


def install() -> None:
    """Register the check for every family's HARP architecture (idempotent; an entry vLLM
    itself has for a name is kept)."""
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

    from .. import families

    class HarpCheckpointConfig(VerifyAndUpdateConfig):
        """The HARP pruning section, checked against the engine's parallel sizes."""

        @staticmethod
        def verify_and_update_config(vllm_config: Any) -> None:
            from .checkpoint_spec import validated_spec

            model_config = vllm_config.model_config
            family = families.by_harp_architecture(model_config.architecture)
            if family is None:
                return
            parallel = vllm_config.parallel_config
            validated_spec(model_config.hf_config, family, parallel.tensor_parallel_size,
                           parallel.pipeline_parallel_size)

    for family in families.FAMILIES:
        MODELS_CONFIG_MAP.setdefault(family.harp_architecture, HarpCheckpointConfig)
