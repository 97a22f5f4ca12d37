"""Can a per-head sink logit (vLLM's ``sinks``, which stock vLLM serves beside a sliding
window) stand in for the attention sink a window drops? HF forward, no vLLM (issues 23, 24).

For a layout of sliding windows (``0-1:1024,2-6:2048``), each windowed head gets a constant
logit ``s_h`` added to its softmax as a column with no value (vLLM's semantics: at every
query, also before the window is full). ``s_h`` is fitted in closed form on one long
WikiText-2 validation window (between the planner's fit windows), dense attention, from the
queries past the window, as the median of:

- ``first4``: the log-sum-exp of the query's logits on the first 4 keys (the sink tokens a
  window drops, StreamingLLM's sink);
- ``evicted``: the log-sum-exp over every key the window drops (section 11's probe's fit).

Printed per variant (no sink / first4 / evicted): teacher-forced NLL per token of " " + the
key on passkey prompts (evaluation text: a diagnosis, never a choice) and perplexity by
position on WikiText-2 validation windows.

    python benchmarks/sink_logit_probe.py 0-1:1024,2-6:2048,8-10:2048,11:512
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from recall_probe import parse
from retrieval_heads import key_nll
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from harp_vllm import models
from harp_vllm.evaluation.tasks.passkey import build_trials
from harp_vllm.pruning.calibration.logits import normed_head_logits
from harp_vllm.pruning.calibration.windows import load_calibration_text, unused_long_windows
from harp_vllm.pruning.reference import decoder_layers, load_model

BUCKETS = ((0, 256), (256, 1024), (1024, 4096), (4096, 8192))
SINK_TOKENS = 4


class Attn:
    """A Llama attention forward with a window and an optional sink logit per head (an extra
    key every query sees, logit ``s_h``, value 0: SDPA over head dim + 1), and a fit pass
    (dense attention, log-sum-exp statistics of the queries past ``fit_window``)."""

    def __init__(self, attn):
        self.attn, self.window, self.sink = attn, None, None
        self.fit_window: int | None = None
        self.stats: dict[str, list[torch.Tensor]] = {"first4": [], "evicted": []}

    def __call__(self, hidden_states, position_embeddings=None, attention_mask=None, **kw):
        a = self.attn
        shp = (*hidden_states.shape[:-1], -1, a.head_dim)
        q = a.q_proj(hidden_states).view(shp).transpose(1, 2)
        k = a.k_proj(hidden_states).view(shp).transpose(1, 2)
        v = a.v_proj(hidden_states).view(shp).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        t = q.shape[2]
        pos = torch.arange(t)
        if self.fit_window is not None:
            self._collect(q, k, pos)
        seen = pos[None, :] <= pos[:, None]
        if self.window is not None:
            seen = seen & (pos[:, None] - pos[None, :] < self.window)
        if self.sink is not None:  # key t: q' = [q, 1], k' = [0, s_h / scale], v' = 0
            b, h, _, d = q.shape
            q = torch.cat([q, q.new_ones(b, h, t, 1)], -1)
            k = torch.cat([k, k.new_zeros(b, h, t, 1)], -1)
            ks = torch.zeros(b, h, 1, d + 1, dtype=k.dtype)
            ks[..., -1] = (self.sink / a.scaling).view(1, h, 1)
            k = torch.cat([k, ks], 2)
            v = torch.cat([v, v.new_zeros(b, h, 1, d)], 2)
            seen = torch.cat([seen, torch.ones(t, 1, dtype=torch.bool)], 1)
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=seen, scale=a.scaling)
        o = out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)
        return a.o_proj(o), None

    def _collect(self, q, k, pos) -> None:
        w = self.fit_window
        for c0 in range(w, q.shape[2], 1024):
            i = pos[c0:c0 + 1024, None]
            lg = q[0, :, c0:c0 + 1024] @ k[0].transpose(-1, -2) * self.attn.scaling
            evicted = (pos[None, :] <= i) & (i - pos[None, :] >= w)
            self.stats["first4"].append(lg[..., :SINK_TOKENS].logsumexp(-1))
            self.stats["evicted"].append(lg.masked_fill(~evicted, -math.inf).logsumexp(-1))


def bucket_ppl(nll: torch.Tensor) -> list[float]:
    return [math.exp(float(nll[lo:hi].mean())) for lo, hi in BUCKETS if lo < nll.numel()]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("layout", help="windows per layer, e.g. 0-1:1024,2-6:2048")
    ap.add_argument("--length", type=int, default=7168, help="passkey prompt tokens")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--ppl-windows", type=int, default=2)
    ap.add_argument("--ppl-len", type=int, default=7168)
    args = ap.parse_args()
    torch.set_num_threads(2)
    src = models.resolve("smollm2-135m")
    tok = models.load_tokenizer(src)
    model = load_model(src).eval()
    layout = parse(args.layout)
    layers = decoder_layers(model)
    original = {j: layers[j].self_attn.forward for j in layout}
    attns = {j: Attn(layers[j].self_attn) for j in layout}
    text, _ = load_calibration_text()
    long = unused_long_windows(tok, text, 20, 1024, 0, 1 + args.ppl_windows, args.ppl_len)
    t0 = time.perf_counter()
    for j, w in layout.items():
        attns[j].fit_window = w
        layers[j].self_attn.forward = attns[j]
    model.model(input_ids=long[:1], use_cache=False)
    sinks = {name: {j: torch.cat(attns[j].stats[name], -1).median(-1).values for j in layout}
             for name in ("first4", "evicted")}
    for j in layout:
        attns[j].fit_window = None
    print(f"fit on 1 x {args.ppl_len} validation tokens: {time.perf_counter() - t0:.0f} s")
    for name in ("first4", "evicted"):
        print(f"  {name} sink logits, per layer mean over heads: " + ", ".join(
            f"{j}: {float(s.mean()):.2f}" for j, s in sinks[name].items()))
    trials = build_trials(tok, [args.length], args.trials, args.seed)
    evals = long[1:]

    def run(label: str, windows: dict[int, int], sink: dict | None) -> None:
        t1 = time.perf_counter()
        for j, a in attns.items():  # dense: HF's own forward
            a.window = windows.get(j)
            a.sink = None if sink is None else sink[j]
            layers[j].self_attn.forward = a if j in windows else original[j]
        nll, right = key_nll(model, tok, trials)
        tok_nll = []
        for w in evals:
            hid = model.model(input_ids=w[None], use_cache=False).last_hidden_state[0, :-1]
            lp = torch.log_softmax(normed_head_logits(model, hid).float(), -1)
            tok_nll.append(-lp[torch.arange(len(w) - 1), w[1:]])
        allnll = torch.stack(tok_nll).mean(0)
        ppl = math.exp(float(torch.cat(tok_nll).mean()))
        print(f"{label:28s} passkey NLL/token {nll:.3f}, all key tokens argmax "
              f"{right:.2f}; validation ppl {ppl:.3f} by position "
              + " / ".join(f"{p:.2f}" for p in bucket_ppl(allnll))
              + f" ({time.perf_counter() - t1:.0f} s)", flush=True)

    run("dense", {}, None)
    run("windows, no sink", layout, None)
    run("windows + first4 sink logit", layout, sinks["first4"])
    run("windows + evicted sink logit", layout, sinks["evicted"])


if __name__ == "__main__":
    main()
