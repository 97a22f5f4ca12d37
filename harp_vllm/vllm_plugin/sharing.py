"""Cross-layer KV sharing (``kv_sharing``): a Llama attention with its own queries over an
earlier layer's KV cache. vLLM's ``Attention(kv_sharing_target_layer_name=...)`` reads the
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
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.llama import LlamaAttention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType

from ..spec import CONFIG_KEY
from .attention import _shard_name
from .checkpoint_spec import HarpCheckpointError
from .fold import check_heads


class SharedKVLlamaAttention(LlamaAttention):
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

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """q_proj and o_proj (and their biases); any other weight (k_proj, v_proj) is refused:
        the layer reads its target's keys and values."""
        params = dict(self.named_parameters())
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
            param.weight_loader(param, w)  # type: ignore[attr-defined]  # set by vLLM
            loaded.add(name)
        return loaded


def shared_kv_factory(target_prefix: str):
    """An attention "class" for a layer sharing the KV cache of the attention ``target_prefix``
    (``model.layers.J.self_attn.attn``); takes LlamaAttention's keyword arguments."""

    def make(**kw: Any) -> nn.Module:
        return SharedKVLlamaAttention(target_prefix=target_prefix, **kw)

    return make
