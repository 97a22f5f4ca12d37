"""The checkpoint's pruning section as the plugin reads it: validated once per model
(``validated_spec``: family, section, per-layer shapes, the tensor- and pipeline-parallel
split; where vLLM builds its config by ``config_check``, and again in every worker by
``pruning_spec``) and read per decoder layer (its alpha, its map, its own head counts and MLP
width).

Imported only by the model modules, i.e. inside vLLM processes (it imports vLLM).
"""

from __future__ import annotations

import copy
from typing import Any

from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.distributed.utils import get_pp_indices
from vllm.model_executor.models.utils import extract_layer_index

from .. import families
from ..errors import UserError
from ..families import Family, head_dim, model_types
from ..spec import CONFIG_KEY, PruningSpec
from .fold import check_heads


class HarpCheckpointError(UserError):
    """A HARP checkpoint that vLLM cannot serve as described (the message says why)."""


def pruning_spec(config: Any, family: Family) -> PruningSpec:
    """The validated pruning section of ``config`` for a model class of ``family``, checked
    against this process's tensor- and pipeline-parallel sizes (inside a vLLM worker)."""
    return validated_spec(config, family, get_tensor_model_parallel_world_size(),
                          get_pp_group().world_size)


def validated_spec(config: Any, family: Family, tp_size: int, pp_size: int) -> PruningSpec:
    """The pruning section of ``config`` for ``family``, validated (family, section, per-layer
    shapes, windows and sharing served by the family) and checked against ``tp_size`` and
    ``pp_size``; HarpCheckpointError naming the first problem."""
    arch = family.harp_architecture
    model_type = getattr(config, "model_type", None)
    if model_type not in family.model_types:
        raise HarpCheckpointError(
            f"{arch} does not support model_type {model_type!r} (supported: "
            f"{', '.join(family.model_types)}); the HARP plugin serves "
            f"{', '.join(f.hf_architecture for f in families.FAMILIES)} checkpoints")
    if getattr(config, CONFIG_KEY, None) is None:
        raise HarpCheckpointError(
            f"config.json declares architecture {arch} but has no '{CONFIG_KEY}' section; a "
            f"HARP checkpoint must list its pruned layers (write it with "
            f"harp_vllm.pruning.jobs.checkpoint.save_pruned)")
    try:
        spec = PruningSpec.from_config(config)
    except UserError as e:
        raise HarpCheckpointError(f"invalid '{CONFIG_KEY}' section in config.json: {e}"
                                  ) from None
    assert spec is not None
    for served, present, what in (  # each kind of change: the families that serve it
            (lambda f: f.heads, spec.shapes is not None,
             f"per-layer head counts ('shapes', method {spec.method}) are"),
            (lambda f: f.windows, bool(spec.windows), "sliding windows ('windows') are"),
            (lambda f: f.kv_sharing, bool(spec.kv_sharing),
             "cross-layer KV sharing ('kv_sharing') is"),
            (lambda f: f.window_sinks, bool(spec.sinks), "window sink logits ('sinks') are"),
            (lambda f: f.group_windows, bool(spec.group_windows),
             "windows per KV group ('group_windows') are")):
        if present and model_type not in model_types(served):
            raise HarpCheckpointError(
                f"invalid '{CONFIG_KEY}' section in config.json: {what} served for "
                f"{', '.join(model_types(served))} models only, not {model_type!r}")
    check_tensor_parallel(config, spec, tp_size)
    check_pipeline_parallel(config, spec, pp_size)
    return spec


def check_pipeline_parallel(config: Any, spec: PruningSpec, pp_size: int) -> None:
    """Every sharing layer is on the same pipeline stage as its target (vLLM reads the
    target's KV cache on the stage's own worker); HarpCheckpointError naming the first pair
    split over two stages."""
    if pp_size <= 1 or not spec.kv_sharing:
        return
    n = int(config.num_hidden_layers)
    bounds = [get_pp_indices(n, rank, pp_size) for rank in range(pp_size)]

    def stage(idx: int) -> int:
        return next(r for r, (lo, hi) in enumerate(bounds) if lo <= idx < hi)

    for idx, target in sorted(spec.kv_sharing.items()):
        if stage(idx) != stage(target):
            raise HarpCheckpointError(
                f"pipeline parallel size {pp_size} puts layer {idx} (stage {stage(idx)}) and "
                f"the layer whose KV cache it shares, {target} (stage {stage(target)}), on "
                f"different stages (layers per stage: "
                f"{', '.join(f'{lo}..{hi - 1}' for lo, hi in bounds)}); choose stages that "
                f"keep them together (VLLM_PP_LAYER_PARTITION) or serve without pipeline "
                f"parallelism")


def check_tensor_parallel(config: Any, spec: PruningSpec, tp_size: int) -> None:
    """Every layer's own head counts and MLP width split over ``tp_size`` ranks the way vLLM
    shards them; HarpCheckpointError naming the first layer that does not (vLLM itself checks
    only the config's head count, and would fail on a pruned layer with a bare assertion)."""
    if tp_size <= 1:
        return
    if spec.group_windows:
        raise HarpCheckpointError(
            f"tensor parallel size {tp_size}: the layers windowed per KV group "
            f"({sorted(spec.group_windows)}, 'group_windows') are not served with tensor "
            f"parallelism yet; serve this checkpoint with --pipeline-parallel-size instead "
            f"(layers are not split)")
    if spec.sinks:
        raise HarpCheckpointError(
            f"tensor parallel size {tp_size}: the window sink logits of layers {spec.sinks} "
            f"are not served with tensor parallelism yet; serve this checkpoint with "
            f"--pipeline-parallel-size instead (layers are not split)")
    for idx in range(int(config.num_hidden_layers)):
        shape = spec.layer_shape(idx) or {
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": getattr(config, "num_key_value_heads", None)
            or config.num_attention_heads,
            "intermediate_size": config.intermediate_size}
        n_q, n_kv = shape["num_attention_heads"], shape["num_key_value_heads"]
        width = shape["intermediate_size"]
        problem = None
        if idx in spec.added and spec.maps[idx]["rank"] % tp_size:
            problem = (f"its added map's rank ({spec.maps[idx]['rank']}) must be divisible by "
                       f"the tensor parallel size ({tp_size})")
        elif idx in spec.replaced:  # a map splits its rank (full rank: its input) over ranks
            width_in = spec.maps[idx]["rank"] or config.hidden_size
            if width_in % tp_size:
                problem = (f"its linear map's {'rank' if spec.maps[idx]['rank'] else 'input'} "
                           f"({width_in}) must be divisible by the tensor parallel size "
                           f"({tp_size})")
        if problem is None and idx not in spec.replaced and spec.layers.get(idx) != 0.0:
            # alpha = 0: no attention weights to split
            try:
                check_heads(n_q, n_kv, tp_size)
            except ValueError as e:
                problem = str(e)
        if problem is None and width % tp_size:
            problem = (f"the MLP width (intermediate_size {width}) must be divisible by the "
                       f"tensor parallel size ({tp_size})")
        if problem is not None:
            raise HarpCheckpointError(
                f"tensor parallel size {tp_size} cannot split layer {idx} of this checkpoint "
                f"({n_q} query heads, {n_kv} KV heads, MLP width {width}): {problem}. Serve "
                f"it with --pipeline-parallel-size instead (layers are not split), or prune to "
                f"head counts and MLP widths that divide by {tp_size}")


def layer_config(config: Any, prefix: str) -> Any:
    """The config decoder layer ``prefix`` is built from: the model's own, or a copy with the
    layer's own head counts and MLP width (head/MLP pruning: vLLM's attention then registers a
    KV cache of the layer's own size) and its sliding window (``windows``: the family's
    attention reads ``layer_types`` and ``sliding_window`` and registers a sliding-window KV
    cache, whose blocks outside the window vLLM frees)."""
    spec = PruningSpec.from_config(config)
    idx = extract_layer_index(prefix)
    shape = None if spec is None else spec.layer_shape(idx)
    window = None if spec is None else spec.windows.get(idx)
    if shape is None and window is None:
        return config
    layer_cfg = copy.copy(config)
    layer_cfg.head_dim = head_dim(config)  # before the head count changes
    for key, value in (shape or {}).items():
        setattr(layer_cfg, key, value)
    if window is not None:
        types = list(getattr(config, "layer_types", None)
                     or ["full_attention"] * int(config.num_hidden_layers))
        if types[idx] == "sliding_attention" and getattr(config, "sliding_window", None):
            window = min(window, int(config.sliding_window))  # never wider than its own
        rope = getattr(config, "rope_parameters", None)
        if types[idx] != "sliding_attention" and isinstance(rope, dict) and types[idx] in rope:
            # Gemma 3 picks a layer's rotary by its type: a global layer given a window
            # keeps its own (base 1M, not the local layers' 10k), as in the HF reference
            layer_cfg.rope_parameters = {**rope, "sliding_attention": rope[types[idx]]}
        types[idx] = "sliding_attention"
        layer_cfg.layer_types = types
        layer_cfg.sliding_window = window
    return layer_cfg


def layer_alpha(config: Any, prefix: str) -> float | None:
    """alpha of the decoder layer named ``prefix`` ("model.layers.7"), None if it is dense."""
    spec = PruningSpec.from_config(config)
    return None if spec is None else spec.layers.get(extract_layer_index(prefix))


def layer_map(config: Any, prefix: str) -> dict[str, Any] | None:
    """The linear-map description of decoder layer ``prefix``, None if it has none."""
    spec = PruningSpec.from_config(config)
    return None if spec is None else spec.maps.get(extract_layer_index(prefix))


def layer_sinks(config: Any, prefix: str) -> bool:
    """Whether windowed decoder layer ``prefix`` has sink logits (``sinks``)."""
    spec = PruningSpec.from_config(config)
    return spec is not None and extract_layer_index(prefix) in spec.sinks


def layer_group_window(config: Any, prefix: str) -> dict[str, Any] | None:
    """Decoder layer ``prefix``'s window per KV group (``group_windows``), None if it has
    none."""
    spec = PruningSpec.from_config(config)
    return None if spec is None else spec.group_windows.get(extract_layer_index(prefix))


def layer_sharing(config: Any, prefix: str) -> int | None:
    """The earlier layer whose KV cache decoder layer ``prefix`` reads, None if its own."""
    spec = PruningSpec.from_config(config)
    return None if spec is None else spec.kv_sharing.get(extract_layer_index(prefix))
