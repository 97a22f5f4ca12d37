"""The parts of the pruning section (``harp_vllm.spec``): its version constants and the
parser and checks of each part (maps, windows, sinks, windows per KV group, sharing, shapes);
every problem gets a message naming the part and the layer."""

from __future__ import annotations

from typing import Any

from .errors import UserError

PruningSpec = Any  # a ``spec.PruningSpec`` (the spec module imports this one, not back)

CONFIG_KEY = "harp_pruning"
SPEC_VERSION = 2  # written when no layer is windowed (older harp-vllm reads it)
WINDOWS_VERSION = 3  # written when ``windows`` is set
SHARING_VERSION = 4  # written when ``kv_sharing`` is set
SINKS_VERSION = 5  # written when ``sinks`` is set
GROUP_WINDOWS_VERSION = 6  # written when ``group_windows`` is set
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
MAP_INPUTS = ("normed", "raw")
SHAPE_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def _layer_index(key: Any, where: str, num_layers: int | None) -> int:
    """A section's layer-index key as an int in range; UserError naming ``where`` if not."""
    try:
        idx = int(key)
    except (TypeError, ValueError):
        raise UserError(f"{where} has a non-integer layer index {key!r}") from None
    if num_layers is not None and not 0 <= idx < num_layers:
        raise UserError(f"{where} has layer index {idx} out of range (the model has "
                        f"{num_layers} layers: 0..{num_layers - 1})")
    return idx


def _open_part(raw: Any, name: str, version: int, need: int, kind: type, shape: str) -> str:
    """The part ``name`` of the section (``raw``, given): UserError unless the section's
    ``version`` is at least ``need`` (the part came with it) and ``raw`` is a ``kind``
    (``shape`` says what it holds). Returns the part's name for messages."""
    where = f"'{CONFIG_KEY}.{name}'"
    if version < need:
        raise UserError(f"{where} needs '{CONFIG_KEY}.version' {need}, the file says {version}")
    if not isinstance(raw, kind):
        raise UserError(f"{where} must be {shape}")
    return where


def _parse_maps(raw: Any, layers: dict[int, float], num_layers: int | None, version: int
                ) -> dict[int, dict[str, Any]]:
    """Validate the optional linear-map layers: index -> {"input": ..., "rank": int | None}."""
    if raw is None:
        return {}
    where = _open_part(raw, "maps", version, 2, dict,
                       "an object mapping layer index to a map description")
    maps: dict[int, dict[str, Any]] = {}
    for k, v in raw.items():
        idx = _layer_index(k, where, num_layers)
        if idx in layers:
            raise UserError(f"layer {idx} is in both '{CONFIG_KEY}.layers' and {where}")
        if not isinstance(v, dict) or not {"input", "rank"} <= set(v) <= {"input", "rank",
                                                                           "add"}:
            raise UserError(f"{where}[{k}] must be an object with 'input' and 'rank' (and "
                            f"optionally 'add')")
        add = v.get("add", False)
        if not isinstance(add, bool):
            raise UserError(f"{where}[{k}].add must be true or false, got {add!r}")
        if add and (v["input"] != "normed" or v["rank"] is None):
            raise UserError(f"{where}[{k}]: a map added to the attention ('add': true) reads "
                            f"the normed input and has a rank (the removed heads' width); got "
                            f"input {v['input']!r}, rank {v['rank']!r}")
        if v["input"] not in MAP_INPUTS:
            raise UserError(f"{where}[{k}].input must be one of {', '.join(MAP_INPUTS)}, got "
                            f"{v['input']!r}")
        rank = v["rank"]
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)
                                 or rank < 1):
            raise UserError(f"{where}[{k}].rank must be a positive integer or null (full), "
                            f"got {rank!r}")
        maps[idx] = {"input": v["input"], "rank": rank, **({"add": True} if add else {})}
    return maps


def _parse_windows(raw: Any, layers: dict[int, float], maps: dict[int, dict[str, Any]],
                   num_layers: int | None, version: int) -> dict[int, int]:
    """Validate the optional sliding windows: layer index -> window in tokens (>= 1)."""
    if raw is None:
        return {}
    where = _open_part(raw, "windows", version, WINDOWS_VERSION, dict,
                       "an object mapping layer index to a window in tokens")
    windows: dict[int, int] = {}
    for k, v in raw.items():
        idx = _layer_index(k, where, num_layers)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"{where}[{k}] must be a positive number of tokens, got {v!r}")
        if idx in layers or (idx in maps and not maps[idx].get("add")):
            raise UserError(f"layer {idx} is in {where} but has no attention (it is in "
                            f"'{CONFIG_KEY}.{'layers' if idx in layers else 'maps'}')")
        windows[idx] = v
    return windows


def _parse_sinks(raw: Any, spec: PruningSpec, num_layers: int | None) -> list[int]:
    """Validate the optional window sinks: a list of windowed layers' indices."""
    if raw is None:
        return []
    where = _open_part(raw, "sinks", spec.version, SINKS_VERSION, list,
                       "a list of windowed layers' indices")
    sinks = [_layer_index(k, where, num_layers) for k in raw]
    for idx in sinks:
        if idx not in spec.windows or idx in spec.kv_sharing:
            raise UserError(f"layer {idx} is in {where} but is not a windowed layer with its own "
                            f"KV cache (a sink logit stands in for what a window drops)")
    return sorted(set(sinks))


def _parse_group_windows(raw: Any, spec: PruningSpec, num_layers: int | None
                         ) -> dict[int, dict[str, Any]]:
    """Validate the optional windows per KV group: layer -> {"window", "full_groups"}."""
    if raw is None:
        return {}
    where = _open_part(raw, "group_windows", spec.version, GROUP_WINDOWS_VERSION, dict,
                       'an object mapping layer index to {"window": W, "full_groups": [...]}')
    targets = set(spec.kv_sharing.values())
    out: dict[int, dict[str, Any]] = {}
    for k, v in raw.items():
        idx = _layer_index(k, where, num_layers)
        if not isinstance(v, dict) or set(v) != {"window", "full_groups"}:
            raise UserError(f"{where}[{k}] must be an object with exactly 'window' and "
                            f"'full_groups'")
        w, groups = v["window"], v["full_groups"]
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise UserError(f"{where}[{k}].window must be a positive number of tokens, got "
                            f"{w!r}")
        if not isinstance(groups, list) or not groups or not all(
                isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in groups) \
                or len(set(groups)) != len(groups):
            raise UserError(f"{where}[{k}].full_groups must be a non-empty list of distinct KV "
                            f"group indices (the groups kept whole), got {groups!r}")
        clash = next((name for name, present in (
            ("layers", idx in spec.layers), ("maps", idx in spec.maps),
            ("windows", idx in spec.windows), ("kv_sharing", idx in spec.kv_sharing),
            ("kv_sharing (as a target)", idx in targets), ("sinks", idx in spec.sinks))
            if present), None)
        if clash is not None:
            raise UserError(f"layer {idx} is in {where} and in '{CONFIG_KEY}.{clash}'; a layer "
                            f"windowed per KV group keeps its own attention whole otherwise")
        if spec.shapes is not None:
            _check_groups(idx, groups, spec.shapes["num_key_value_heads"][idx])
        out[idx] = {"window": w, "full_groups": sorted(groups)}
    return out


def _check_groups(idx: int, groups: list[int], kv_heads: int) -> None:
    """Layer ``idx``'s ``full_groups`` index its ``kv_heads`` KV groups and leave one windowed."""
    where = f"'{CONFIG_KEY}.group_windows[{idx}]'"
    if max(groups) >= kv_heads or len(groups) >= kv_heads:
        raise UserError(f"{where}.full_groups is {groups}, but layer {idx} has {kv_heads} KV "
                        f"groups (0..{kv_heads - 1}): keep some of them whole and window the "
                        f"rest (all whole: leave the layer out; none: use 'windows')")


def _parse_sharing(raw: Any, spec: PruningSpec, num_layers: int | None) -> dict[int, int]:
    """Validate the optional cross-layer KV sharing: layer index -> earlier target layer."""
    if raw is None:
        return {}
    where = _open_part(raw, "kv_sharing", spec.version, SHARING_VERSION, dict,
                       "an object mapping layer index to the earlier layer whose KV cache it "
                       "reads")
    sharing: dict[int, int] = {}
    for k, v in raw.items():
        idx = _layer_index(k, where, num_layers)
        if isinstance(v, bool) or not isinstance(v, int):
            raise UserError(f"{where}[{k}] must be a layer index, got {v!r}")
        target = _layer_index(v, f"{where}[{k}]", num_layers)
        sharing[idx] = target
    for idx, target in sorted(sharing.items()):
        _check_sharing(spec, sharing, idx, target, where)
    return sharing


def _check_sharing(spec: PruningSpec, sharing: dict[int, int], idx: int, target: int,
                   where: str) -> None:
    """Layer ``idx`` may read layer ``target``'s KV cache (see the module docstring)."""
    def no_attention(i: int) -> str | None:
        if i in spec.layers:
            return f"it is pruned ('{CONFIG_KEY}.layers')"
        if i in spec.replaced:
            return f"it is replaced by a linear map ('{CONFIG_KEY}.maps')"
        return None

    why = no_attention(idx) or (f"it has a map added to its attention ('{CONFIG_KEY}.maps', "
                                "not served with sharing)" if idx in spec.maps else None)
    if why is not None:
        raise UserError(f"layer {idx} is in {where} but {why}: only a layer with attention can "
                        f"read another layer's keys and values")
    if target >= idx:
        raise UserError(f"{where}[{idx}] is {target}: layer {idx} can only share the KV cache "
                        f"of an earlier layer (0..{idx - 1})")
    why = no_attention(target)
    if why is not None:
        raise UserError(f"{where}[{idx}] is {target}, but layer {target} has no KV cache to "
                        f"share: {why}")
    if target in sharing:
        raise UserError(f"{where}[{idx}] is {target}, but layer {target} itself shares layer "
                        f"{sharing[target]}'s KV cache (no chains: point layer {idx} at "
                        f"{sharing[target]})")
    if spec.windows.get(idx) != spec.windows.get(target):
        raise UserError(f"{where}[{idx}] is {target}, a layer of another kind: layer {idx} has "
                        f"window {spec.windows.get(idx)}, layer {target} "
                        f"{spec.windows.get(target)} (None: full attention); a sharing layer "
                        f"has its target's window")
    if spec.shapes is not None:
        heads = spec.shapes["num_key_value_heads"]
        if heads[idx] != heads[target]:
            raise UserError(f"{where}[{idx}] is {target}, a layer of another kind: layer {idx} "
                            f"has {heads[idx]} KV heads, layer {target} {heads[target]}")


def _parse_shapes(raw: Any, num_layers: int | None) -> dict[str, list[int]] | None:
    """Validate the optional per-layer shapes (head counts, MLP widths) of every layer."""
    if raw is None:
        return None
    where = f"'{CONFIG_KEY}.shapes'"
    if not isinstance(raw, dict) or set(raw) != set(SHAPE_KEYS):
        raise UserError(f"{where} must be an object with exactly {', '.join(SHAPE_KEYS)}")
    shapes: dict[str, list[int]] = {}
    for key in SHAPE_KEYS:
        vals = raw[key]
        if not isinstance(vals, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vals):
            raise UserError(f"{where}.{key} must be a list of non-negative integers")
        if num_layers is not None and len(vals) != num_layers:
            raise UserError(f"{where}.{key} has {len(vals)} entries; the model has "
                            f"{num_layers} layers")
        shapes[key] = list(vals)
    lengths = {len(v) for v in shapes.values()}
    if len(lengths) != 1:
        raise UserError(f"{where} lists differ in length")
    for i, (q, kv, inter) in enumerate(zip(*(shapes[k] for k in SHAPE_KEYS), strict=True)):
        if q < 1 or kv < 1 or q % kv:
            raise UserError(f"{where}: layer {i} has {q} query heads and {kv} KV heads; each "
                            f"layer keeps at least one KV head, and its query heads must be a "
                            f"multiple of its KV heads")
        if inter < 1:
            raise UserError(f"{where}: layer {i} has intermediate_size {inter} (keep at least "
                            f"one MLP channel)")
    return shapes
