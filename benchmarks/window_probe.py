"""Probe (issue 24): sliding-window attention, with and without a per-head sink logit, on
SmolLM2 layers, in the HF forward (no vLLM). WikiText-2 validation and Python-stdlib dev text,
2 windows of SEQ tokens each; prints overall perplexity and per-position buckets
(0-255, 256-1k, 1k-4k). The sink logit of a head is the median over queries past the window of
log sum exp of its logits to the evicted keys (a closed-form fit).

    python benchmarks/window_probe.py 4096
"""
import math
import sys
import time

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from harp_vllm import models
from harp_vllm.evaluation.domains import domain_text
from harp_vllm.evaluation.quality import bucket_nll, token_windows
from harp_vllm.pruning.reference import load_model

torch.set_num_threads(2)
path = models.resolve("smollm2-135m")
tok = models.load_tokenizer(path)
model = load_model(path).eval()
L = len(model.model.layers)
SEQ = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
NWIN = 2
dev = domain_text("wikitext", "dev")
wins = torch.tensor(token_windows(tok, dev, SEQ, NWIN))
py_dev = domain_text("python", "dev", max_chars=SEQ * NWIN * 6 + 20000)
pyt = torch.tensor(token_windows(tok, py_dev, SEQ, NWIN))

CFG: dict[int, tuple[int, torch.Tensor | None]] = {}   # layer -> (W, sink[H] or None)
STATS: dict[int, list] = {}
FIT_W: list[int] = []


def attend(q, k, v, W, sink, scale, stats=None):
    # q,k,v [b,H,T,d]
    b, H, T, d = q.shape
    out = torch.empty_like(q)
    i_all = torch.arange(T)
    for c0 in range(0, T, 1024):
        qi = q[:, :, c0:c0 + 1024]
        c = qi.shape[2]
        logits = (qi @ k.transpose(-1, -2)) * scale  # b,H,c,T
        i = i_all[c0:c0 + c, None]
        j = i_all[None, :]
        causal = j <= i
        if stats is not None:
            for w in FIT_W:
                ev = causal & (i - j >= w)
                lse = torch.logsumexp(logits.masked_fill(~ev, -math.inf), -1)  # b,H,c
                keep = (i[:, 0] >= w)
                if keep.any():
                    stats.setdefault(w, []).append(lse[:, :, keep].permute(1, 0, 2).reshape(H, -1))
        allowed = causal if W is None else causal & (i - j < W)
        logits = logits.masked_fill(~allowed, -math.inf)
        if sink is not None:
            s = sink.view(1, H, 1, 1).expand(b, H, c, 1)
            logits = torch.cat([logits, s], -1)
            p = torch.softmax(logits, -1)[..., :-1]
        else:
            p = torch.softmax(logits, -1)
        out[:, :, c0:c0 + c] = p @ v
    return out


def make_forward(attn, idx):
    def forward(hidden_states, position_embeddings=None, attention_mask=None,
                past_key_values=None, **kw):
        shp = (*hidden_states.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(hidden_states).view(shp).transpose(1, 2)
        k = attn.k_proj(hidden_states).view(shp).transpose(1, 2)
        v = attn.v_proj(hidden_states).view(shp).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = repeat_kv(k, attn.num_key_value_groups)
        v = repeat_kv(v, attn.num_key_value_groups)
        W, sink = CFG.get(idx, (None, None))
        stats = STATS.setdefault(idx, {}) if FIT_W else None
        o = attend(q, k, v, W, sink, attn.scaling, stats)
        o = o.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        return attn.o_proj(o), None
    return forward


for idx, layer in enumerate(model.model.layers):
    layer.self_attn.forward = make_forward(layer.self_attn, idx)


@torch.inference_mode()
def score(windows):
    tot = []
    for w in windows:
        logits = model(input_ids=w[None]).logits
        logp = torch.log_softmax(logits[0, :-1].float(), -1)
        nll = -logp.gather(-1, w[1:, None])[:, 0]
        tot.append(nll.tolist())
    flat = [x for t in tot for x in t]
    bk = [bucket_nll(t) for t in tot]
    buckets = []
    for i in range(len(bk[0])):
        s = sum(b[i]["nll_sum"] for b in bk)
        n = sum(b[i]["tokens"] for b in bk)
        buckets.append(round(math.exp(s / n), 2))
    return round(math.exp(sum(flat) / len(flat)), 3), buckets


def fit_sinks(ws):
    global FIT_W
    FIT_W = ws
    STATS.clear()
    CFG.clear()
    t = time.time()
    score(wins[:1])
    FIT_W = []
    sinks = {}
    for idx, st in STATS.items():
        for w, parts in st.items():
            allv = torch.cat(parts, -1)  # H, N
            sinks[(idx, w)] = allv.median(-1).values
    print(f"fit {time.time()-t:.0f}s", flush=True)
    return sinks


def run(name, cfg):
    CFG.clear()
    CFG.update(cfg)
    t = time.time()
    a, b = score(wins), score(pyt)
    print(f"{name:40s} wiki {a}  python {b}  ({time.time()-t:.0f}s)", flush=True)


if __name__ == "__main__":
    run("dense", {})
    sinks = fit_sinks([256, 1024])
    for W in (1024, 256):
        top = list(range(L // 2, L))
        bot = list(range(0, L // 2))
        odd = list(range(1, L, 2))
        for nm, layers in (("top half", top), ("bottom half", bot), ("odd", odd)):
            run(f"W{W} {nm} no sink", {i: (W, None) for i in layers})
            run(f"W{W} {nm} sink", {i: (W, sinks[(i, W)]) for i in layers})
