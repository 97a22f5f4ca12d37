"""The pruning section a pruned checkpoint carries in its config.json.

Format (version 1)::

    "harp_pruning": {
      "version": 1,
      "method": "harp",                    # harp | gate-norm | hybrid | ...
      "layers": {"22": 0.3, "29": 0.8},    # pruned layer index -> alpha (0 = sublayer removed)
      "source_model": "...", "source_architecture": "LlamaForCausalLM",
      "calibration": {...}                 # how the alphas were chosen (free-form)
    }

A pruned layer has no q/k projections and computes ``h + alpha * o_proj(repeat_kv(v_proj(
input_layernorm(h))))``; with alpha = 0 it has no v/o projections either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

CONFIG_KEY = "harp_pruning"
SPEC_VERSION = 1

# HF architecture -> HARP architecture name registered with vLLM.
HARP_ARCHITECTURES = {
    "LlamaForCausalLM": "HarpLlamaForCausalLM",
    "MistralForCausalLM": "HarpMistralForCausalLM",
    "Qwen2ForCausalLM": "HarpQwen2ForCausalLM",
    "Gemma2ForCausalLM": "HarpGemma2ForCausalLM",
    "Gemma3ForCausalLM": "HarpGemma3ForCausalLM",
}


@dataclass
class PruningSpec:
    """Which layers are pruned and with what alpha, plus provenance."""

    layers: dict[int, float]
    method: str = "harp"
    source_model: str | None = None
    source_architecture: str | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    version: int = SPEC_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "method": self.method,
            "layers": {str(k): float(v) for k, v in sorted(self.layers.items())},
            "source_model": self.source_model,
            "source_architecture": self.source_architecture,
            "calibration": self.calibration,
        }

    @classmethod
    def from_dict(cls, d: Any, num_layers: int | None = None) -> PruningSpec:
        """Parse and validate a pruning section; every problem gets a precise message."""
        if not isinstance(d, dict):
            raise UserError(f"'{CONFIG_KEY}' must be an object, got {type(d).__name__}")
        version = d.get("version")
        if version != SPEC_VERSION:
            raise UserError(f"'{CONFIG_KEY}.version' is {version!r}; this harp-vllm reads "
                            f"version {SPEC_VERSION}")
        raw = d.get("layers")
        if not isinstance(raw, dict):
            raise UserError(f"'{CONFIG_KEY}.layers' must be an object mapping layer index to "
                            "alpha")
        layers: dict[int, float] = {}
        for k, v in raw.items():
            try:
                idx = int(k)
            except (TypeError, ValueError):
                raise UserError(f"'{CONFIG_KEY}.layers' has a non-integer layer index {k!r}"
                                ) from None
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise UserError(f"'{CONFIG_KEY}.layers[{k}]' alpha must be a number, got {v!r}")
            if num_layers is not None and not 0 <= idx < num_layers:
                raise UserError(f"'{CONFIG_KEY}.layers' has layer index {idx} out of range "
                                f"(the model has {num_layers} layers: 0..{num_layers - 1})")
            layers[idx] = float(v)
        return cls(layers=layers, method=str(d.get("method", "harp")),
                   source_model=d.get("source_model"),
                   source_architecture=d.get("source_architecture"),
                   calibration=dict(d.get("calibration") or {}), version=version)

    @classmethod
    def from_config(cls, config: Any) -> PruningSpec | None:
        """The spec in an HF config (object or dict), or None for a dense model."""
        raw = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(
            config, CONFIG_KEY, None)
        if raw is None:
            return None
        n = (config.get("num_hidden_layers") if isinstance(config, dict)
             else getattr(config, "num_hidden_layers", None))
        return cls.from_dict(raw, n)
