"""The causal LM's head on hidden states: final norm, LM head and (Gemma) logit soft-capping,
as the model's own forward applies them; for scoring layers run outside the full forward."""

from __future__ import annotations

import torch


def head_logits(model, h: torch.Tensor) -> torch.Tensor:
    """Final norm, LM head and (Gemma) logit soft-capping, as the causal-LM forward does."""
    return normed_head_logits(model, model.model.norm(h))


def normed_head_logits(model, h: torch.Tensor) -> torch.Tensor:
    """LM head and soft-capping of hidden states that already went through the final norm."""
    logits = model.lm_head(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
