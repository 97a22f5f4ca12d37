"""Where does SmolLM2 retrieve from far context, and what do early-layer windows take away?
HF forward, no vLLM (issue 23 item 3, issue 24). Two diagnostics:

``heads``: per (layer, KV group), the attention mass that the positions predicting a recalled
code's digits put on that digit where the code was first written (the copy source), max over
the group's query heads, mean over probe positions; on recall-planted WikiText-2 validation
windows (``calibration.recall_probe``; natural text and, with ``--repeat``, a repetitive one).

``passkey LAYOUT...``: teacher-forced NLL per token of " " + the key on passkey prompts
(evaluation text: a diagnosis, never a choice), for sliding windows per layer (``0-1:1024,
2-6:2048``), optionally with the first ``--sink-tokens`` tokens kept visible in every window
(StreamingLLM's attention sink; stock vLLM's sliding window cannot keep them).

    python benchmarks/retrieval_heads.py heads --seq-len 4096
    python benchmarks/retrieval_heads.py passkey 0-1:1024,2-6:2048 --sink-tokens 4
"""
from __future__ import annotations

import argparse
import time

import torch
from recall_probe import parse
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from harp_vllm import models
from harp_vllm.evaluation.tasks.passkey import build_trials
from harp_vllm.pruning.calibration.logits import normed_head_logits
from harp_vllm.pruning.calibration.recall_probe import plant_recall
from harp_vllm.pruning.calibration.windows import load_calibration_text, unused_long_windows
from harp_vllm.pruning.reference import decoder_layers, load_model, window_mask


def copy_sources(tok, ids: list[int], picks: list[int]) -> list[int]:
    """For each probe position (predicting digit ``ids[p + 1]`` of a recalled code), where
    that digit sits in the code's first occurrence (the planted fact)."""
    def digit(i: int) -> bool:
        return tok.decode([ids[i]]).strip().isdigit()

    out = []
    for p in picks:
        lo = hi = p + 1
        while digit(lo - 1):
            lo -= 1
        while hi + 1 < len(ids) and digit(hi + 1):
            hi += 1
        code = ids[lo:hi + 1]
        first = next(j for j in range(len(ids)) if ids[j:j + len(code)] == code)
        out.append(first + p + 1 - lo)
    return out


@torch.no_grad()
def copy_mass(model, tok, seq_len: int, repeat: int, windows: int = 2) -> torch.Tensor:
    """[layers, KV groups]: see ``heads`` in the module docstring."""
    cfg = model.config
    h, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // h
    text, _ = load_calibration_text()
    long = unused_long_windows(tok, text, 20, 1024, 0, windows + 1, seq_len)[1:]
    total = torch.zeros(cfg.num_hidden_layers, h)
    for i, w in enumerate(long):
        ids, picks = plant_recall(tok, w, 3, i + 1, repeat=repeat)
        src = torch.tensor(copy_sources(tok, ids.tolist(), picks.tolist()))

        def hook(attn, args, kwargs, picks=picks, src=src):
            x = kwargs["hidden_states"][0]
            cos, sin = kwargs["position_embeddings"]
            q = attn.q_proj(x).view(-1, h, d).transpose(0, 1)[None]
            k = attn.k_proj(x).view(-1, hkv, d).transpose(0, 1)[None]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k = k[0].repeat_interleave(h // hkv, 0)
            s = q[0][:, picks] @ k.transpose(1, 2) / d ** 0.5  # [heads, probes, tokens]
            s = s.masked_fill(torch.arange(k.shape[1]) > picks[:, None], float("-inf"))
            a = s.softmax(-1)[:, torch.arange(len(picks)), src]
            total[attn.layer_idx] += a.mean(-1)

        handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
                   for layer in decoder_layers(model)]
        try:
            model.model(input_ids=ids[None], use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
    return (total / len(long)).view(cfg.num_hidden_layers, hkv, h // hkv).amax(-1)


def sink_window_mask(window: int, sinks: int, t: int, dtype: torch.dtype) -> torch.Tensor:
    """``window_mask`` over ``t`` tokens with the first ``sinks`` keys also seen by every
    later query."""
    mask = window_mask(window, t, t, dtype)
    rows, cols = torch.arange(t)[:, None], torch.arange(min(sinks, t))[None, :]
    mask[0, 0, :, :cols.shape[1]] = torch.where(cols <= rows, 0.0, torch.finfo(dtype).min)
    return mask


def sink_window_hook(window: int, sinks: int):
    """A pre-hook: sliding-window causal attention that also keeps the first ``sinks``
    tokens."""
    def hook(attn, args, kwargs):
        x = kwargs["hidden_states"]
        kwargs["attention_mask"] = sink_window_mask(window, sinks, x.shape[1], x.dtype)
        return args, kwargs
    return hook


@torch.no_grad()
def passkey_nll(model, tok, windows: dict[int, int], sinks: int, length: int, trials: int,
                seed: int) -> tuple[float, float]:
    """(NLL per token of " " + key, fraction of trials with every one of them argmax)."""
    layers = decoder_layers(model)
    handles = [layers[j].self_attn.register_forward_pre_hook(sink_window_hook(w, sinks),
                                                               with_kwargs=True)
               for j, w in windows.items()]
    try:
        return key_nll(model, tok, build_trials(tok, [length], trials, seed))
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def key_nll(model, tok, trials: list) -> tuple[float, float]:
    """The model as it is on passkey ``trials``: (NLL per token of " " + key, fraction of
    trials with every one of them argmax)."""
    nll = right = n = 0.0
    for t in trials:
        ids = torch.tensor(t.prompt_ids + tok(" " + t.key, add_special_tokens=False)[
            "input_ids"])
        picks = torch.arange(len(t.prompt_ids) - 1, len(ids) - 1)
        hid = model.model(input_ids=ids[None], use_cache=False).last_hidden_state
        lp = torch.log_softmax(normed_head_logits(model, hid[0, picks]).float(), -1)
        target = ids[picks + 1]
        nll += float(-lp[torch.arange(len(picks)), target].sum())
        right += float((lp.argmax(-1) == target).all())
        n += len(picks)
    return nll / n, right / len(trials)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["heads", "passkey"])
    ap.add_argument("layouts", nargs="*", help="passkey: windows per layer, e.g. 0-1:1024")
    ap.add_argument("--seq-len", type=int, default=4096, help="heads: probe window tokens")
    ap.add_argument("--repeat", type=int, default=24, help="heads: the repetitive probe's R")
    ap.add_argument("--length", type=int, default=7168, help="passkey: prompt tokens")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--sink-tokens", type=int, default=0)
    ap.add_argument("--seed", type=int, default=123)
    args = ap.parse_args()
    torch.set_num_threads(2)
    src = models.resolve("smollm2-135m")
    tok = models.load_tokenizer(src)
    model = load_model(src).eval()
    if args.what == "heads":
        for repeat in (0, args.repeat):
            mass = copy_mass(model, tok, args.seq_len, repeat)
            print(f"copy-source attention mass, probe repeat={repeat} (layer: per KV group)")
            for j, row in enumerate(mass.tolist()):
                print(f"{j:2d}: " + " ".join(f"{v:.3f}" for v in row))
        return
    for name in ["dense", *args.layouts]:
        t0 = time.perf_counter()
        win = {} if name == "dense" else parse(name)
        nll, right = passkey_nll(model, tok, win, args.sink_tokens, args.length, args.trials,
                                 args.seed)
        print(f"{name} (sink tokens {args.sink_tokens if win else 0}): NLL/token {nll:.3f}, "
              f"all key tokens argmax {right:.2f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
