"""Gate-Norm (arXiv 2512.20636): data-free ranking of attention sublayers by query-key coupling.

``G_l = (1/sqrt(d_h)) * sqrt(sum_h ||W_Q,h W_K,g(h)^T||_F^2)``: the Frobenius norm of the
bilinear form that produces layer l's attention logits, over all query heads h, each paired
with the KV head g(h) = h // (n_q / n_kv) it shares under GQA. Per head the norm is computed
exactly from d_h x d_h Gram matrices, ``||A B^T||_F^2 = tr((A^T A)(B^T B))`` with A, B the
head's [d, d_h] query and key maps. The 1/sqrt(d_h) logit scale (Gemma2:
``query_pre_attn_scalar``) is the same for every layer of a model, so it never changes the
ranking. RoPE is left out (it rotates query/key pairs per position and does not enter the
weights), as are q/k biases (Qwen2) and QK-norm weights (Gemma3).

Weights are streamed tensor by tensor from the safetensors files; nothing else is loaded.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from ...errors import UserError

Q_KEY = "model.layers.{i}.self_attn.q_proj.weight"
K_KEY = "model.layers.{i}.self_attn.k_proj.weight"


def _index(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file that holds it."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise UserError(f"no .safetensors files in {model_dir}")
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(f, "pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
                where[k] = f
    return where


def layer_score(wq: torch.Tensor, wk: torch.Tensor, n_q: int, n_kv: int, head_dim: int,
                scale: float) -> float:
    """Gate-Norm of one layer from HF-layout q/k weights ([n*d_h, d])."""
    r = n_q // n_kv
    q = wq.double().view(n_q, head_dim, -1)  # head h: rows h*d_h .. (h+1)*d_h
    k = wk.double().view(n_kv, head_dim, -1)
    gq = q @ q.transpose(1, 2)  # [n_q, d_h, d_h] = W_Q,h^T W_Q,h in x-space terms
    gk = k @ k.transpose(1, 2)  # [n_kv, d_h, d_h]
    gk = gk.repeat_interleave(r, dim=0)  # pair each query head with its KV head
    sq_norms = (gq * gk.transpose(1, 2)).sum(dim=(1, 2))  # tr(Gq Gk) per head
    return scale * math.sqrt(float(sq_norms.sum()))


def gate_norm_scores(model_dir: Path) -> dict[int, float]:
    """Gate-Norm score of every layer of the HF checkpoint at ``model_dir``."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    n_layers, n_q = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_q
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_q
    scale = (cfg.get("query_pre_attn_scalar") or head_dim) ** -0.5
    where = _index(model_dir)
    scores: dict[int, float] = {}
    for i in range(n_layers):
        qk, kk = Q_KEY.format(i=i), K_KEY.format(i=i)
        if qk not in where or kk not in where:
            raise UserError(f"layer {i} has no q_proj/k_proj weights in {model_dir} (already "
                            "pruned, or not a Llama/Mistral/Qwen2/Gemma-layout checkpoint)")
        with safe_open(where[qk], "pt") as fq, safe_open(where[kk], "pt") as fk:
            scores[i] = layer_score(fq.get_tensor(qk), fk.get_tensor(kk), n_q, n_kv, head_dim,
                                    scale)
    return scores


def lowest_scoring(scores: dict[int, float], k: int) -> list[int]:
    """The ``k`` layers with the smallest scores (ties broken by layer index), sorted."""
    if not 1 <= k <= len(scores):
        raise UserError(f"cannot remove {k} attention sublayers of {len(scores)}; choose "
                        f"1..{len(scores)}")
    return sorted(sorted(scores, key=lambda i: (scores[i], i))[:k])
