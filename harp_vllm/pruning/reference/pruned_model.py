"""A pruned model for good: a checkpoint's whole pruning section applied to an HF model
(``apply_pruning``), and any fp32 causal LM loaded with its pruning (``load_model``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...errors import UserError
from ...families import check_served, family_of
from ...spec import PruningSpec
from .fitted_maps import GroupMap, LinearAttention, attach_group_map, install_map
from .model_layers import check_layers, decoder_layers
from .shared_kv import SharedKVAttention, check_sharing_family, share_kv
from .sliding_windows import attach_group_window, attach_window
from .token_local import prune_layers
from .window_sinks import attach_sinks


def apply_pruning(model, spec: PruningSpec):
    """Prune ``model`` in place for good: q/k (and v/o where alpha = 0) are gone."""
    family_of(model.config)  # UserError for an unsupported family
    prune_layers(model, spec.layers)
    if spec.maps:
        check_served(model.config, lambda f: f.linear_maps, "linear maps are")
    check_layers(model, spec.maps)
    for idx, m in spec.replaced.items():  # a fitted map already in place is kept
        layer = decoder_layers(model)[idx]
        if not isinstance(layer.self_attn, LinearAttention):
            install_map(layer, LinearAttention(model.config.hidden_size, m["rank"]), m["input"])
    for idx, m in spec.added.items():
        attn: Any = decoder_layers(model)[idx].self_attn
        if not hasattr(attn, "group_map"):
            attach_group_map(attn, GroupMap(model.config.hidden_size, m["rank"]))
    if spec.kv_sharing:
        check_sharing_family(model)
    check_layers(model, spec.kv_sharing)
    for idx, target in spec.kv_sharing.items():  # a sharing layer already in place is kept
        if not isinstance(decoder_layers(model)[idx].self_attn, SharedKVAttention):
            share_kv(model, idx, target)
    check_layers(model, spec.windows)
    for idx, w in spec.windows.items():
        windowed_layer: Any = decoder_layers(model)[idx]
        attach_window(windowed_layer.self_attn, w)
    if spec.group_windows:
        check_served(model.config, lambda f: f.group_windows, "windows per KV group are")
    check_layers(model, spec.group_windows)
    for idx, g in spec.group_windows.items():
        attach_group_window(decoder_layers(model)[idx].self_attn, g["window"],
                            g["full_groups"])
    if spec.sinks:
        check_served(model.config, lambda f: f.window_sinks, "window sinks are")
    for idx in spec.sinks:  # fitted sink logits already in place are kept
        attach_sinks(decoder_layers(model)[idx].self_attn)
    model.config.harp_pruning = spec.to_dict()
    return model


def load_model(path: Path):
    """The fp32 causal LM at ``path``; a pruned checkpoint is built with its pruning applied."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    pruning = PruningSpec.from_config(config)
    if pruning is not None:
        return load_pruned(path, config, pruning)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    return model.eval()


def load_pruned(path: Path, config, spec: PruningSpec):
    """Build the pruned model described by ``config`` and load its safetensors strictly."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    family_of(config)  # UserError for an unsupported family
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                             attn_implementation="sdpa")
    if spec.shapes is not None:  # head/MLP-level pruning: every layer gets its own shapes
        from ..heads import check_family, resize_layer

        check_family(config)
        for idx, layer in enumerate(decoder_layers(model)):
            shape = spec.layer_shape(idx)
            assert shape is not None  # spec.shapes is set
            resize_layer(layer, config, **shape)
    apply_pruning(model, spec)
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise UserError(f"no .safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    expected = set(model.state_dict())
    tied = getattr(config, "tie_word_embeddings", False)
    missing = sorted(k for k in expected - set(state) if not (tied and k == "lm_head.weight"))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
        raise UserError(f"checkpoint weights do not match its pruning section: "
                        f"{'; '.join(parts)} ({path})")
    model.load_state_dict(state, strict=False)
    if tied:
        model.tie_weights()
    return model.eval()
