"""Cross-layer KV sharing (``kv_sharing``): a Llama or Gemma 3 attention with its own queries
over an earlier layer's KV cache. vLLM's ``Attention(kv_sharing_target_layer_name=...)`` reads the
target's cache and writes none; the model runner registers no KV-cache spec for the layer, so
the scheduler allocates it no blocks (it joins its target's KV-cache group on the worker).

Imported only by the model modules, i.e. inside vLLM processes (it imports vLLM).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import GemmaRMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaAttention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType

from ..spec import CONFIG_KEY
from .attention import _shard_name
from .checkpoint_spec import HarpCheckpointError
from .fold import check_heads


class SharedWeightsMixin:
    """``load_weights`` of a sharing attention: its own q (and q-norm) and o weights; any
    other weight (k_proj, v_proj, k_norm) is refused: the layer reads its target's keys and
    values."""

    prefix: str
    target_prefix: str

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())  # type: ignore[attr-defined]
        loaded: set[str] = set()
        for raw_name, w in weights:
            name = _shard_name(raw_name, w)
            if name not in params:
                raise HarpCheckpointError(
                    f"unexpected weight {self.prefix}.{name}: layer "
                    f"{extract_layer_index(self.prefix)} shares the KV cache of "
                    f"{self.target_prefix.rsplit('.', 2)[0]} ('{CONFIG_KEY}.kv_sharing') and "
                    f"keeps only {', '.join(sorted(params))}")
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, w)
            loaded.add(name)
        return loaded


class SharedKVLlamaAttention(SharedWeightsMixin, LlamaAttention):
    """Llama attention reading layer ``kv_sharing[i]``'s keys and values: ``q_proj`` (column-
    parallel), the family's rotary embedding (``LlamaAttention._init_rotary_emb``), vLLM's
    ``Attention`` with ``kv_sharing_target_layer_name`` and the layer's sliding window (from
    the layer's config, its target's), ``o_proj``. No ``k_proj``/``v_proj``: the checkpoint
    has none for the layer, and one that has them is refused (``load_weights``)."""

    def __init__(self, *, config: Any, hidden_size: int, num_heads: int, num_kv_heads: int,
                 target_prefix: str, max_position_embeddings: int = 8192,
                 quant_config: Any = None, bias: bool = False, bias_o_proj: bool = False,
                 cache_config: Any = None, prefix: str = "",
                 attn_type: str = AttentionType.DECODER) -> None:
        nn.Module.__init__(self)  # LlamaAttention's own __init__ builds k/v and a KV cache
        self.prefix, self.target_prefix = prefix, target_prefix
        layer_idx = extract_layer_index(prefix)
        tp_size = get_tensor_model_parallel_world_size()
        try:
            check_heads(num_heads, num_kv_heads, tp_size)
        except ValueError as e:
            raise HarpCheckpointError(f"{prefix}: {e}") from None
        self.hidden_size = hidden_size
        self.total_num_heads, self.num_heads = num_heads, num_heads // tp_size
        self.total_num_kv_heads = num_kv_heads
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.head_dim = getattr(config, "head_dim", None) or hidden_size // num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim**-0.5
        self.max_position_embeddings = max_position_embeddings
        self.q_proj = ColumnParallelLinear(hidden_size, num_heads * self.head_dim, bias=bias,
                                           gather_output=False, quant_config=quant_config,
                                           prefix=f"{prefix}.q_proj")
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, hidden_size,
                                        bias=bias_o_proj, quant_config=quant_config,
                                        prefix=f"{prefix}.o_proj")
        self._init_rotary_emb(config, quant_config=quant_config)
        types = getattr(config, "layer_types", None)
        window = (config.sliding_window if types and types[layer_idx] == "sliding_attention"
                  else None)
        self.attn = Attention(self.num_heads, self.head_dim, self.scaling,
                              num_kv_heads=self.num_kv_heads, cache_config=cache_config,
                              quant_config=quant_config, per_layer_sliding_window=window,
                              attn_type=attn_type, prefix=f"{prefix}.attn",
                              kv_sharing_target_layer_name=target_prefix)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, _ = self.q_proj(hidden_states)
        q, _ = self.rotary_emb(positions, q, None)
        out, _ = self.o_proj(self.attn(q, None, None))
        return out

class SharedKVGemma3Attention(SharedWeightsMixin, nn.Module):
    """Gemma 3 attention reading layer ``kv_sharing[i]``'s keys and values: ``q_proj``, the
    per-head ``q_norm``, the rotary embedding of the layer's type (local or global), vLLM's
    ``Attention`` with ``kv_sharing_target_layer_name`` and the layer's sliding window,
    ``o_proj``; the decoder layer's post-attention norm follows as in a dense layer. No
    ``k_proj``/``v_proj``/``k_norm``. Takes Gemma3Attention's keyword arguments."""

    def __init__(self, *, config: Any, hidden_size: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, max_position_embeddings: int, target_prefix: str,
                 cache_config: Any = None, quant_config: Any = None,
                 attn_logits_soft_cap: float | None = None, prefix: str = "") -> None:
        super().__init__()
        self.prefix, self.target_prefix = prefix, target_prefix
        tp_size = get_tensor_model_parallel_world_size()
        try:
            check_heads(num_heads, num_kv_heads, tp_size)
        except ValueError as e:
            raise HarpCheckpointError(f"{prefix}: {e}") from None
        self.num_heads, self.head_dim = num_heads // tp_size, head_dim
        bias = bool(config.attention_bias)
        self.q_proj = ColumnParallelLinear(hidden_size, num_heads * head_dim, bias=bias,
                                           gather_output=False, quant_config=quant_config,
                                           prefix=f"{prefix}.q_proj")
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden_size, bias=bias,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.q_norm = GemmaRMSNorm(head_dim, eps=config.rms_norm_eps)
        layer_type = config.layer_types[extract_layer_index(prefix)]
        self.rotary_emb = get_rope(head_dim, max_position=max_position_embeddings,
                                   rope_parameters=config.rope_parameters[layer_type],
                                   is_neox_style=True)
        window = config.sliding_window if layer_type == "sliding_attention" else None
        self.attn = Attention(self.num_heads, head_dim, config.query_pre_attn_scalar**-0.5,
                              num_kv_heads=max(1, num_kv_heads // tp_size),
                              cache_config=cache_config, quant_config=quant_config,
                              logits_soft_cap=attn_logits_soft_cap,
                              per_layer_sliding_window=window, prefix=f"{prefix}.attn",
                              kv_sharing_target_layer_name=target_prefix)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, **kwargs: Any
                ) -> torch.Tensor:
        q, _ = self.q_proj(hidden_states)
        q = self.q_norm(q.unflatten(-1, (self.num_heads, self.head_dim))).flatten(-2, -1)
        q, _ = self.rotary_emb(positions, q, None)
        out, _ = self.o_proj(self.attn(q, None, None))
        return out


def shared_kv_factory(target_prefix: str, cls: type):
    """An attention "class" for a layer sharing the KV cache of the attention ``target_prefix``
    (``model.layers.J.self_attn.attn``); takes the family attention's keyword arguments
    (``cls``: the family's sharing attention)."""

    def make(**kw: Any) -> nn.Module:
        return cls(target_prefix=target_prefix, **kw)

    return make
