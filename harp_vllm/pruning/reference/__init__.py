"""Reference HARP implementation on Hugging Face transformers models: the ground truth the
alpha search, the planner, evaluation and the vLLM plugin are checked against.

A pruned layer keeps its input norm, MLP and residuals; its attention becomes the token-local
path ``alpha * o_proj(repeat_kv(v_proj(x)))`` (no q/k, no RoPE, no softmax, no KV cache).
Llama/Mistral/Qwen2 apply alpha to that output; Gemma2/Gemma3 apply it after the
post-attention norm. alpha = 0 removes the attention sublayer (no v/o either).

One module per kind of layer change, and the whole section applied for good:

- ``token_local.py``: HARP's token-local path (``pruned``, ``prune_layers``);
- ``fitted_maps.py``: attention replaced by a fitted map, or a map added for removed KV groups;
- ``sliding_windows.py``: sliding-window attention (``windowed``, ``window_mask``);
- ``shared_kv.py``: a layer over an earlier layer's keys and values (``shared``);
- ``pruned_model.py``: a checkpoint's pruning section applied (``apply_pruning``) and any
  checkpoint loaded (``load_model``);
- ``model_layers.py``: the decoder layers and the layer-index check.
"""

from .fitted_maps import GroupMap, LinearAttention, attach_group_map, install_map
from .model_layers import decoder_layers
from .pruned_model import apply_pruning, load_model, load_pruned
from .shared_kv import SharedKVAttention, attention_restored, share_kv, shared
from .sliding_windows import WindowedAttention, attach_window, window_mask, windowed
from .token_local import TokenLocalAttention, pruned

__all__ = ["GroupMap", "LinearAttention", "SharedKVAttention", "TokenLocalAttention",
           "WindowedAttention", "apply_pruning", "attach_group_map", "attach_window",
           "attention_restored", "decoder_layers", "install_map", "load_model", "load_pruned",
           "pruned", "share_kv", "shared", "window_mask", "windowed"]
