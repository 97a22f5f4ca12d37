"""The pruning section a pruned checkpoint carries in its config.json.

Format (version 6 with windows per KV group, 5 with window sinks, 4 when a layer shares
another's KV cache, 3 when a layer is windowed, else 2; every older version still loads)::

    "harp_pruning": {
      "version": 6,
      "method": "harp",                    # harp | gate-norm | hybrid | linear | ...
      "layers": {"22": 0.3, "29": 0.8},    # pruned layer index -> alpha (0 = sublayer removed)
      "maps": {                            # optional: attention replaced by a fitted linear map
        "22": {"input": "normed", "rank": 192}   # rank null: one full d x d linear
      },
      "source_model": "...", "source_architecture": "LlamaForCausalLM",
      "calibration": {...},                # how the alphas were chosen (free-form)
      "shapes": {                          # optional: head/MLP-level pruning (amp, flap, ...)
        "num_attention_heads": [9, 6, ...],  # per layer, >= 1
        "num_key_value_heads": [3, 2, ...],
        "intermediate_size": [1536, ...]
      },
      "windows": {"12": 1024},             # optional (version 3): sliding-window attention
      "kv_sharing": {"14": 12},            # optional (version 4): layer -> earlier layer whose
                                           #   keys and values it attends over
      "sinks": [12],                       # optional (version 5): windowed layers with sink
                                           #   logits (``self_attn.sinks`` [heads])
      "group_windows": {                   # optional (version 6): a window on some KV groups
        "3": {"window": 2048, "full_groups": [2]}   # of a layer, the others kept whole
      }
    }

A pruned layer has no q/k projections and computes ``h + alpha * o_proj(repeat_kv(v_proj(
input_layernorm(h))))``; with alpha = 0 it has no v/o projections either. ``shapes`` gives
every layer its own head counts and MLP width (whole GQA groups removed, so the KV cache
shrinks). It combines with ``layers`` and ``maps`` (a planned checkpoint mixes all three): a
layer listed there keeps the config's head counts in ``shapes`` and has no attention.

A layer in ``maps`` has no q/k/v/o either; its attention sublayer is ``out_proj(in_proj(x))``
with a bias on ``out_proj`` (weights ``self_attn.in_proj.weight`` [rank, d],
``self_attn.out_proj.weight`` [d, rank], ``self_attn.out_proj.bias`` [d]; a full-rank map has
only ``out_proj`` [d, d]). ``x`` is the attention's normed input (``"input": "normed"``) or the
residual stream before the norm (``"raw"``: the layer then has no ``input_layernorm``).
A layer is in at most one of ``layers`` and ``maps``.

A map with ``"add": true`` does not replace the attention: it is added to it. The layer keeps
the attention heads ``shapes`` gives it (some KV groups removed) and predicts the removed
heads' outputs from the normed input, through their o_proj columns: ``attn(x) +
out_proj(in_proj(x))``, with a bias on ``in_proj`` and none on ``out_proj`` (weights
``self_attn.group_map.in_proj.weight`` [rank, d], ``.in_proj.bias`` [rank],
``self_attn.group_map.out_proj.weight`` [d, rank]; see ``pruning/methods/group_fit.py``).

A layer in ``windows`` keeps its attention and weights, but each token attends only to the
last ``W`` tokens (itself included: key ``j`` is seen by query ``i`` when ``0 <= i - j < W``),
so its KV cache holds at most ``W`` tokens of a sequence (vLLM frees the blocks outside the
window). ``W`` is smaller than the model's context (``max_position_embeddings``); a windowed
layer is not in ``layers`` or a replacing map (it has attention). A windowed layer in ``sinks``
adds one logit per query head to every softmax, a key with no value (vLLM's ``sinks``), in
place of the first tokens the window drops (``pruning/reference/window_sinks.py``).

A layer in ``group_windows`` (DuoAttention's split of a layer into retrieval and streaming
heads, per KV group) keeps its attention and weights; the query heads of its KV groups in
``full_groups`` (group ``g``: KV head ``g`` and the query heads that read it) attend to every
earlier token, the others to the last ``window`` tokens only (``windows``' convention), so the
windowed groups' KV cache holds at most ``window`` tokens of a sequence. ``full_groups`` is a
non-empty proper subset of the layer's KV groups; the layer is not in ``windows``,
``kv_sharing`` (neither side), ``sinks``, ``layers`` or ``maps``.

A layer ``i`` in ``kv_sharing`` (cross-layer KV sharing, KVSharer/CLA) attends with its own
queries over the keys and values layer ``j = kv_sharing[i]`` computed (after ``j``'s
``k_proj``/``v_proj`` and rotary embedding) and stores no KV cache of its own: it keeps
``q_proj`` and ``o_proj`` only (no ``k_proj``/``v_proj`` weights). ``j`` comes earlier, has its
own attention (not pruned, replaced by a map or itself sharing: no chains) and is the same kind
as ``i``: the same sliding window (or none) and the same KV-head count. ``i`` has attention and
no map (vLLM: ``Attention(kv_sharing_target_layer_name=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UserError
from .spec_parts import (  # noqa: F401  (the constants are this module's API too)
    CONFIG_KEY,
    GROUP_WINDOWS_VERSION,
    MAP_INPUTS,
    READABLE_VERSIONS,
    SHAPE_KEYS,
    SHARING_VERSION,
    SINKS_VERSION,
    SPEC_VERSION,
    WINDOWS_VERSION,
    _check_groups,
    _layer_index,
    _parse_group_windows,
    _parse_maps,
    _parse_shapes,
    _parse_sharing,
    _parse_sinks,
    _parse_windows,
)


@dataclass
class PruningSpec:
    """Which layers are pruned and with what alpha, plus provenance."""

    layers: dict[int, float]
    method: str = "harp"
    source_model: str | None = None
    source_architecture: str | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    shapes: dict[str, list[int]] | None = None  # SHAPE_KEYS -> one value per layer
    maps: dict[int, dict[str, Any]] = field(default_factory=dict)  # layer -> input, rank
    windows: dict[int, int] = field(default_factory=dict)  # layer -> sliding window (tokens)
    kv_sharing: dict[int, int] = field(default_factory=dict)  # layer -> earlier KV target
    sinks: list[int] = field(default_factory=list)  # windowed layers with sink logits
    # layer -> {"window": W, "full_groups": [KV groups kept whole]} (the others windowed)
    group_windows: dict[int, dict[str, Any]] = field(default_factory=dict)
    version: int = SPEC_VERSION

    @property
    def attention_free_layers(self) -> tuple[int, ...]:
        """The layers with no attention (and so no KV cache): pruned or replaced by a map."""
        return tuple(sorted({*self.layers, *self.replaced}))

    @property
    def replaced(self) -> dict[int, dict[str, Any]]:
        """The maps that replace their layer's attention (not the ``add`` ones)."""
        return {i: m for i, m in self.maps.items() if not m.get("add")}

    @property
    def added(self) -> dict[int, dict[str, Any]]:
        """The maps added to their layer's (narrowed) attention."""
        return {i: m for i, m in self.maps.items() if m.get("add")}

    def kv_heads(self, num_layers: int, num_kv_heads: int) -> list[int]:
        """KV heads per layer as served: 0 for attention-free layers and layers sharing an
        earlier layer's KV cache, else the layer's own (``shapes``) or the model's
        ``num_kv_heads``."""
        return [0 if i in self.attention_free_layers or i in self.kv_sharing
                else self.shapes["num_key_value_heads"][i] if self.shapes is not None
                else num_kv_heads for i in range(num_layers)]

    def layer_shape(self, idx: int) -> dict[str, int] | None:
        """Layer ``idx``'s head counts and MLP width, None when the layer keeps the config's."""
        if self.shapes is None:
            return None
        return {k: self.shapes[k][idx] for k in SHAPE_KEYS}

    def to_dict(self) -> dict[str, Any]:
        version = max(self.version, WINDOWS_VERSION if self.windows else 0,
                      SHARING_VERSION if self.kv_sharing else 0,
                      SINKS_VERSION if self.sinks else 0,
                      GROUP_WINDOWS_VERSION if self.group_windows else 0)
        return {
            "version": version,
            "method": self.method,
            "layers": {str(k): float(v) for k, v in sorted(self.layers.items())},
            "source_model": self.source_model,
            "source_architecture": self.source_architecture,
            "calibration": self.calibration,
            **({"shapes": {k: [int(x) for x in v] for k, v in self.shapes.items()}}
               if self.shapes is not None else {}),
            **({"maps": {str(k): {"input": v["input"], "rank": v["rank"],
                                  **({"add": True} if v.get("add") else {})}
                         for k, v in sorted(self.maps.items())}} if self.maps else {}),
            **({"windows": {str(k): int(v) for k, v in sorted(self.windows.items())}}
               if self.windows else {}),
            **({"kv_sharing": {str(k): int(v) for k, v in sorted(self.kv_sharing.items())}}
               if self.kv_sharing else {}),
            **({"sinks": sorted(self.sinks)} if self.sinks else {}),
            **({"group_windows": {str(k): {"window": int(v["window"]),
                                           "full_groups": sorted(int(g) for g in
                                                                 v["full_groups"])}
                                  for k, v in sorted(self.group_windows.items())}}
               if self.group_windows else {}),
        }

    @classmethod
    def from_dict(cls, d: Any, num_layers: int | None = None) -> PruningSpec:
        """Parse and validate a pruning section; every problem gets a precise message."""
        if not isinstance(d, dict):
            raise UserError(f"'{CONFIG_KEY}' must be an object, got {type(d).__name__}")
        version = d.get("version")
        if version not in READABLE_VERSIONS:
            raise UserError(f"'{CONFIG_KEY}.version' is {version!r}; this harp-vllm reads "
                            f"versions {', '.join(map(str, READABLE_VERSIONS))}")
        raw = d.get("layers")
        if not isinstance(raw, dict):
            raise UserError(f"'{CONFIG_KEY}.layers' must be an object mapping layer index to "
                            "alpha")
        layers: dict[int, float] = {}
        for k, v in raw.items():
            idx = _layer_index(k, f"'{CONFIG_KEY}.layers'", num_layers)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise UserError(f"'{CONFIG_KEY}.layers[{k}]' alpha must be a number, got {v!r}")
            layers[idx] = float(v)
        shapes = _parse_shapes(d.get("shapes"), num_layers)
        maps = _parse_maps(d.get("maps"), layers, num_layers, version)
        windows = _parse_windows(d.get("windows"), layers, maps, num_layers, version)
        spec = cls(layers=layers, method=str(d.get("method", "harp")),
                   source_model=d.get("source_model"),
                   source_architecture=d.get("source_architecture"),
                   calibration=dict(d.get("calibration") or {}), shapes=shapes, maps=maps,
                   windows=windows, version=version)
        spec.kv_sharing = _parse_sharing(d.get("kv_sharing"), spec, num_layers)
        spec.sinks = _parse_sinks(d.get("sinks"), spec, num_layers)
        spec.group_windows = _parse_group_windows(d.get("group_windows"), spec, num_layers)
        return spec

    @classmethod
    def from_config(cls, config: Any) -> PruningSpec | None:
        """The spec in an HF config (object or dict), or None for a dense model."""
        raw = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(
            config, CONFIG_KEY, None)
        if raw is None:
            return None
        def get(key: str) -> Any:
            return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

        spec = cls.from_dict(raw, get("num_hidden_layers"))
        if spec.shapes is not None:
            for key in SHAPE_KEYS:
                limit = get(key)
                worst = max(spec.shapes[key])
                if isinstance(limit, int) and worst > limit:
                    raise UserError(f"'{CONFIG_KEY}.shapes.{key}' has {worst}, more than the "
                                    f"config's {key} = {limit}")
            for idx in spec.attention_free_layers:
                for key in SHAPE_KEYS[:2]:
                    limit = get(key)
                    if isinstance(limit, int) and spec.shapes[key][idx] != limit:
                        raise UserError(
                            f"layer {idx} has no attention (in '{CONFIG_KEY}.layers' or "
                            f"'.maps') but '{CONFIG_KEY}.shapes.{key}[{idx}]' is "
                            f"{spec.shapes[key][idx]}; such a layer keeps the config's "
                            f"{key} = {limit}")
        context = get("max_position_embeddings")
        kv_heads = get("num_key_value_heads") or get("num_attention_heads")
        for idx, w in [*spec.windows.items(),
                       *((i, g["window"]) for i, g in spec.group_windows.items())]:
            where = "windows" if idx in spec.windows else "group_windows"
            if isinstance(context, int) and w >= context:
                raise UserError(f"'{CONFIG_KEY}.{where}[{idx}]' is {w} tokens, not smaller "
                                f"than the model's context (max_position_embeddings = "
                                f"{context}): such a window never drops a token; leave the "
                                f"layer out")
        for idx, g in spec.group_windows.items():
            own = (spec.shapes["num_key_value_heads"][idx] if spec.shapes is not None
                   else kv_heads)
            if isinstance(own, int):
                _check_groups(idx, g["full_groups"], own)
        d = get("hidden_size")
        for idx, m in spec.maps.items():
            if isinstance(d, int) and m["rank"] is not None and m["rank"] > d:
                raise UserError(f"'{CONFIG_KEY}.maps[{idx}].rank' is {m['rank']}, larger than "
                                f"the hidden size {d} (use null for a full-rank map)")
        return spec
