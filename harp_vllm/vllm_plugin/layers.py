"""Pieces shared by the HARP model families: the pruned attention modules, the decoder-layer
and model mixins every family's classes use, the checks, and the one helper that swaps a vLLM
module global.

Imported only by the model modules, i.e. inside vLLM processes (it imports vLLM).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.utils import extract_layer_index

from ..errors import UserError
from ..families import BY_HARP_ARCHITECTURE, STRUCTURED_MODEL_TYPES, Family, head_dim
from ..spec import CONFIG_KEY, PruningSpec
from . import SKIP_VERSION_CHECK_ENV, SUPPORTED_VLLM, UnsupportedVllmVersion, pp_buffers
from .fold import check_heads, fold_o, fold_v, rank_heads


class HarpCheckpointError(UserError):
    """A HARP checkpoint that vLLM cannot serve as described (the message says why)."""


def pruning_spec(config: Any, arch: str) -> PruningSpec:
    """The validated pruning section of ``config`` for HARP architecture ``arch``."""
    families = BY_HARP_ARCHITECTURE[arch].model_types
    model_type = getattr(config, "model_type", None)
    if model_type not in families:
        raise HarpCheckpointError(
            f"{arch} does not support model_type {model_type!r} (supported: "
            f"{', '.join(families)}); the HARP plugin serves Llama, Mistral, Qwen2, Gemma2 "
            f"and Gemma3 checkpoints")
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
    if spec.shapes is not None and model_type not in STRUCTURED_MODEL_TYPES:
        raise HarpCheckpointError(
            f"invalid '{CONFIG_KEY}' section in config.json: per-layer head counts "
            f"('shapes', method {spec.method}) are served for "
            f"{', '.join(STRUCTURED_MODEL_TYPES)} "
            f"models only, not {model_type!r}")
    check_tensor_parallel(config, spec, get_tensor_model_parallel_world_size())
    pp_buffers.install()  # vLLM 0.32 CPU, eager: pipeline stage > 0 lacks its input buffer
    return spec


def check_tensor_parallel(config: Any, spec: PruningSpec, tp_size: int) -> None:
    """Every layer's own head counts and MLP width split over ``tp_size`` ranks the way vLLM
    shards them; HarpCheckpointError naming the first layer that does not (vLLM itself checks
    only the config's head count, and would fail on a pruned layer with a bare assertion)."""
    if tp_size <= 1:
        return
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
    """The config decoder layer ``prefix`` is built from: the model's own, or for a head/MLP
    pruned checkpoint a copy with the layer's head counts and MLP width (vLLM's attention
    then registers a KV cache of the layer's own size)."""
    spec = PruningSpec.from_config(config)
    shape = None if spec is None else spec.layer_shape(extract_layer_index(prefix))
    if shape is None:
        return config
    layer_cfg = copy.copy(config)
    layer_cfg.head_dim = head_dim(config)  # before the head count changes
    for key, value in shape.items():
        setattr(layer_cfg, key, value)
    return layer_cfg


def layer_alpha(config: Any, prefix: str) -> float | None:
    """alpha of the decoder layer named ``prefix`` ("model.layers.7"), None if it is dense."""
    spec = PruningSpec.from_config(config)
    return None if spec is None else spec.layers.get(extract_layer_index(prefix))


@contextlib.contextmanager
def swapped_global(module: Any, name: str, value: Any) -> Iterator[None]:
    """Temporarily replace ``module.name``, a class vLLM's model code looks up by its
    module-level name where vLLM offers no hook (Qwen2's attention and model, Gemma's decoder
    layers). Written for vLLM ``SUPPORTED_VLLM``: on another vLLM (unless the version check
    is skipped) or when the global is gone, ``UnsupportedVllmVersion`` says which one, instead
    of a model silently built from vLLM's own class."""
    import vllm

    skip = os.environ.get(SKIP_VERSION_CHECK_ENV, "") in ("1", "true", "yes")
    where = f"{module.__name__}.{name}"
    if not skip:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version

        try:
            ok = Version(Version(vllm.__version__).base_version) in SpecifierSet(SUPPORTED_VLLM)
        except InvalidVersion:
            ok = False
        if not ok:
            raise UnsupportedVllmVersion(
                f"harp-vllm replaces {where} while building the model, which was written for "
                f"vLLM {SUPPORTED_VLLM}; the running vLLM is {vllm.__version__!r}")
    if not hasattr(module, name):
        raise UnsupportedVllmVersion(
            f"harp-vllm replaces {where} while building the model, but vLLM "
            f"{vllm.__version__} has no such name (written for vLLM {SUPPORTED_VLLM})")
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _shard_name(name: str, weight: torch.Tensor) -> str:
    """Undo vLLM's stacking rename: ``qkv_proj.weight`` + shard "v" -> ``v_proj.weight``."""
    shard = getattr(weight, "shard_id", None)
    if name.startswith("qkv_proj.") and shard in ("q", "k", "v"):
        return f"{shard}_proj.{name.split('.', 1)[1]}"
    return name


class RemovedAttention(nn.Module):
    """The attention sublayer of an alpha = 0 layer: no weights, never called."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def forward(self, *args, **kwargs):  # the decoder layer skips the branch
        raise RuntimeError(f"{self.prefix} is removed (alpha = 0) and must not be called")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        for name, w in weights:
            raise HarpCheckpointError(
                f"unexpected weight {self.prefix}.{_shard_name(name, w)}: layer "
                f"{extract_layer_index(self.prefix)} is pruned with alpha = 0 in "
                f"'{CONFIG_KEY}', so its attention has no weights")
        return set()


class TokenLocalLinear(nn.Module):
    """A token-local attention replacement: ``x -> out_proj(in_proj(x))``, or ``out_proj(x)``
    with no ``in_proj`` (a full-rank map). No ``Attention`` module is built, so vLLM allocates
    no KV cache for the layer.

    ``in_proj`` is column-parallel and ``out_proj`` row-parallel (its all-reduce sums the
    ranks); a full-rank ``out_proj`` splits its input across ranks. This class loads a fitted
    linear map (``--method linear``: ``in_proj``/``out_proj`` in the checkpoint);
    ``TokenLocalAttention`` fills the same two linears from HARP's v/o weights.
    """

    kind = "linear map"

    def __init__(self, *, hidden_size: int, width: int | None, in_bias: bool, out_bias: bool,
                 prefix: str, quant_config=None):
        super().__init__()
        if quant_config is not None:
            raise HarpCheckpointError(f"{prefix}: quantized HARP checkpoints are not supported "
                                      f"(the token-local layers need unquantized weights)")
        self.prefix = prefix
        self.layer_idx = extract_layer_index(prefix)
        self.tp_size = get_tensor_model_parallel_world_size()
        self.tp_rank = get_tensor_model_parallel_rank()
        if width is None:
            self.in_proj = None
            self.out_proj = RowParallelLinear(hidden_size, hidden_size, bias=out_bias,
                                              input_is_parallel=False, reduce_results=True,
                                              prefix=f"{prefix}.out_proj")
        else:
            self.in_proj = ColumnParallelLinear(hidden_size, width, bias=in_bias,
                                                gather_output=False, prefix=f"{prefix}.in_proj")
            self.out_proj = RowParallelLinear(width, hidden_size, bias=out_bias,
                                              input_is_parallel=True, reduce_results=True,
                                              prefix=f"{prefix}.out_proj")
        self.expected = {"out_proj.weight"} | ({"out_proj.bias"} if out_bias else set())
        if width is not None:
            self.expected |= {"in_proj.weight"} | ({"in_proj.bias"} if in_bias else set())
        self.loaded: set[str] = set()

    def forward(self, positions: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        x = hidden_states
        if self.in_proj is not None:
            x, _ = self.in_proj(x)
        out, _ = self.out_proj(x)
        return out

    def _unexpected(self, name: str) -> HarpCheckpointError:
        return HarpCheckpointError(
            f"unexpected weight {self.prefix}.{name}: layer {self.layer_idx} is replaced by a "
            f"{self.kind} and keeps only {', '.join(sorted(self.expected))}")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        for raw_name, w in weights:
            name = _shard_name(raw_name, w)
            if name not in self.expected:
                raise self._unexpected(name)
            param = params[name]
            full = _full_shape(param, name, self.tp_size)
            if tuple(w.shape) != full:
                raise HarpCheckpointError(
                    f"{self.prefix}.{name}: checkpoint shape {tuple(w.shape)}, expected {full} "
                    f"(from '{CONFIG_KEY}.maps[{self.layer_idx}]' and the hidden size)")
            param.weight_loader(param, w)  # type: ignore[attr-defined]  # set by vLLM
            self.loaded.add(name)
        return set(self.loaded)

    def missing(self) -> list[str]:
        return [f"{self.prefix}.{n}" for n in sorted(self.expected - self.loaded)]


def _full_shape(param: torch.Tensor, name: str, tp_size: int) -> tuple[int, ...]:
    """The unsharded checkpoint shape of a column- (in_proj) or row-parallel (out_proj) param."""
    shape = list(param.shape)
    if name == "in_proj.weight" or name == "in_proj.bias":
        shape[0] *= tp_size
    elif name == "out_proj.weight":
        shape[1] *= tp_size
    return tuple(shape)


class TokenLocalAttention(TokenLocalLinear):
    """HARP pruned attention, folded into ``TokenLocalLinear``: ``in_proj`` = this rank's
    ``v_proj`` rows, ``out_proj`` = ``scale * W_O`` with the query-head blocks that read the
    same KV head summed (see ``fold.py``). ``scale`` is alpha for Llama-like families and 1
    for Gemma (which scales after its post-attention norm).
    """

    kind = "HARP token-local path"

    def __init__(self, *, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 alpha: float, post_norm: bool, v_bias: bool, o_bias: bool, prefix: str,
                 quant_config=None):
        tp_size = get_tensor_model_parallel_world_size()
        try:
            check_heads(num_heads, num_kv_heads, tp_size)
        except ValueError as e:
            raise HarpCheckpointError(f"{prefix}: {e}") from None
        kv_heads, _ = rank_heads(num_heads, num_kv_heads, tp_size,
                                 get_tensor_model_parallel_rank())
        # Sized so each rank's partition is exactly its own KV heads (also when replicated).
        super().__init__(hidden_size=hidden_size, width=len(kv_heads) * head_dim * tp_size,
                         in_bias=v_bias, out_bias=o_bias, prefix=prefix,
                         quant_config=quant_config)
        self.alpha = float(alpha)
        self.scale = 1.0 if post_norm else self.alpha
        self.n_q, self.n_kv, self.head_dim, self.kv_heads = (num_heads, num_kv_heads, head_dim,
                                                             kv_heads)
        self.expected = {"v_proj.weight", "o_proj.weight"}
        if v_bias:
            self.expected.add("v_proj.bias")
        if o_bias:
            self.expected.add("o_proj.bias")

    def _unexpected(self, name: str) -> HarpCheckpointError:
        return HarpCheckpointError(
            f"unexpected weight {self.prefix}.{name}: layer {self.layer_idx} is pruned "
            f"(alpha = {self.alpha}) and keeps only {', '.join(sorted(self.expected))}")

    def _copy(self, param: Any, value: torch.Tensor, name: str) -> None:
        if tuple(param.shape) != tuple(value.shape):
            raise HarpCheckpointError(f"{self.prefix}.{name}: shape {tuple(value.shape)} after "
                                      f"folding does not fit {tuple(param.shape)}")
        with torch.no_grad():
            param.data.copy_(value.to(param.dtype))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        assert self.in_proj is not None
        for raw_name, w in weights:
            name = _shard_name(raw_name, w)
            if name not in self.expected:
                raise self._unexpected(name)
            if name == "v_proj.weight":
                self._copy(self.in_proj.weight, fold_v(w, self.head_dim, self.kv_heads), name)
            elif name == "v_proj.bias":
                self._copy(self.in_proj.bias, fold_v(w, self.head_dim, self.kv_heads), name)
            elif name == "o_proj.weight":
                try:
                    folded = fold_o(w, self.n_q, self.n_kv, self.head_dim, self.scale,
                                    self.tp_size, self.tp_rank)
                except ValueError as e:
                    raise HarpCheckpointError(f"{self.prefix}.o_proj.weight: {e}") from None
                self._copy(self.out_proj.weight, folded, name)
            else:  # o_proj.bias: the full output bias (the row-parallel layer adds it once)
                self._copy(self.out_proj.bias, w * self.scale, name)
            self.loaded.add(name)
        return set(self.loaded)


def linear_map_factory(rank: int | None):
    """An attention "class" for a layer replaced by a fitted linear map (``maps`` entry)."""

    def make(**kw: Any) -> nn.Module:
        return TokenLocalLinear(hidden_size=kw["hidden_size"], width=rank, in_bias=False,
                                out_bias=True, prefix=kw["prefix"],
                                quant_config=kw.get("quant_config"))

    return make


def with_group_map(base: type, rank: int) -> type:
    """An attention class for a layer with a map added (``"add": true``): the family's
    attention ``base`` (narrowed to the layer's own heads by ``layer_config``) plus
    ``group_map``, the removed KV groups' fitted stand-in (``pruning/methods/group_fit.py``),
    added to its output. The map owns no KV cache; vLLM sizes the attention's own."""

    class AttentionWithGroupMap(base):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.group_map = TokenLocalLinear(hidden_size=kw["hidden_size"], width=rank,
                                              in_bias=True, out_bias=False,
                                              prefix=f"{kw['prefix']}.group_map",
                                              quant_config=kw.get("quant_config"))

        def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor
                    ) -> torch.Tensor:
            out = super().forward(positions, hidden_states)
            return out + self.group_map(hidden_states=hidden_states)

    return AttentionWithGroupMap


def layer_map(config: Any, prefix: str) -> dict[str, Any] | None:
    """The linear-map description of decoder layer ``prefix``, None if it has none."""
    spec = PruningSpec.from_config(config)
    return None if spec is None else spec.maps.get(extract_layer_index(prefix))


def token_local_factory(alpha: float, family: Family):
    """An attention "class" for a pruned layer of ``family``; takes the family attention's
    keyword args (``family.biases(kwargs)`` gives v_bias, o_bias from them)."""

    def make(**kw: Any) -> nn.Module:
        prefix = kw["prefix"]
        if alpha == 0.0:
            return RemovedAttention(prefix)
        hidden, n_q = kw["hidden_size"], kw["num_heads"]
        d = kw.get("head_dim") or head_dim(kw.get("config"), hidden, n_q)
        v_bias, o_bias = family.biases(kw)
        return TokenLocalAttention(hidden_size=hidden, num_heads=n_q,
                                   num_kv_heads=kw["num_kv_heads"], head_dim=d,
                                   alpha=alpha, post_norm=family.post_norm, v_bias=v_bias,
                                   o_bias=o_bias, prefix=prefix,
                                   quant_config=kw.get("quant_config"))

    return make


def check_attention_weights(model: nn.Module, layers: nn.ModuleList, start: int, end: int,
                            seen: set[str], spec: PruningSpec, layer_prefix: str) -> None:
    """After loading: every layer got the attention weights its pruning status requires.

    ``seen`` holds the checkpoint's own weight names. A dense layer needs q/k/v/o (vLLM's own
    check cannot see a missing q or k: they share the stacked qkv parameter with v).
    """
    for idx in range(start, end):
        attn = getattr(layers[idx], "self_attn", None)
        base = f"{layer_prefix}.{idx}.self_attn"
        if isinstance(attn, TokenLocalLinear):
            missing = attn.missing()
            if missing:
                what = (f"alpha = {spec.layers[idx]}" if idx in spec.layers
                        else f"linear map {spec.maps[idx]}")
                raise HarpCheckpointError(
                    f"weights missing for layer {idx} (pruned, {what}): "
                    f"{', '.join(missing)} not in the checkpoint")
        elif isinstance(attn, RemovedAttention):
            continue
        else:
            group_map = getattr(attn, "group_map", None)
            if isinstance(group_map, TokenLocalLinear) and group_map.missing():
                raise HarpCheckpointError(
                    f"weights missing for layer {idx} (KV groups removed, a map in their "
                    f"place: {spec.maps[idx]}): {', '.join(group_map.missing())} not in the "
                    f"checkpoint")
            need = [f"{base}.{p}_proj.weight" for p in ("q", "k", "v", "o")]
            missing = [n for n in need if n not in seen]
            if missing:
                raise HarpCheckpointError(
                    f"weights missing for layer {idx} (dense: not in '{CONFIG_KEY}.layers'): "
                    f"{', '.join(missing)} not in the checkpoint; if the layer is pruned, its "
                    f"index must be listed in '{CONFIG_KEY}.layers'")


def recording(weights: Iterable[tuple[str, torch.Tensor]], seen: set[str]
              ) -> Iterator[tuple[str, torch.Tensor]]:
    for name, w in weights:
        seen.add(name)
        yield name, w


def _add_norm(norm: nn.Module, hidden_states: torch.Tensor, residual: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's fused residual add + norm (the first layer has no residual yet)."""
    if residual is None:
        return norm(hidden_states), hidden_states
    return norm(hidden_states, residual)


class HarpDecoderLayerMixin:
    """The pruned-layer forward of every family's decoder layer (listed before vLLM's class).

    Dense layers (``harp_alpha`` None) run the parent's forward. alpha = 0: the attention
    branch is skipped and only the MLP half runs. Pre-norm families (Llama, Qwen2) run their
    token-local attention through the parent's forward; post-norm families (Gemma:
    ``harp_post_norm``) scale the normed attention output by alpha here.
    """

    harp_alpha: float | None = None
    harp_post_norm = False

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None, **kwargs: Any
                ) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.harp_alpha
        if alpha is None or (alpha != 0.0 and not self.harp_post_norm):
            return super().forward(positions, hidden_states, residual, **kwargs)  # type: ignore[misc]
        layer: Any = self
        if not self.harp_post_norm:  # alpha = 0
            hidden_states, residual = _add_norm(layer.post_attention_layernorm, hidden_states,
                                                residual)
            return layer.mlp(hidden_states), residual
        if alpha == 0.0:
            hidden_states, residual = _add_norm(layer.pre_feedforward_layernorm, hidden_states,
                                                residual)
        else:
            hidden_states, residual = _add_norm(layer.input_layernorm, hidden_states, residual)
            hidden_states = layer.self_attn(positions=positions, hidden_states=hidden_states)
            hidden_states = layer.post_attention_layernorm(hidden_states)
            if alpha != 1.0:
                hidden_states = hidden_states * alpha
            hidden_states, residual = layer.pre_feedforward_layernorm(hidden_states, residual)
        hidden_states = layer.mlp(hidden_states)
        hidden_states = layer.post_feedforward_layernorm(hidden_states)
        return hidden_states, residual


class HarpModelMixin:
    """The checked ``load_weights`` of every family's model class (listed before vLLM's):
    after vLLM's own loading, every layer got the attention weights its pruning status
    requires (``check_attention_weights``)."""

    harp_arch: str
    harp_spec: PruningSpec

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        seen: set[str] = set()
        loaded = super().load_weights(recording(weights, seen))  # type: ignore[misc]
        model: Any = self
        check_attention_weights(model, model.model.layers, model.model.start_layer,
                                model.model.end_layer, seen, self.harp_spec, "model.layers")
        return loaded
