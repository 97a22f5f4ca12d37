"""Cross-layer KV sharing refitted: layer ``i``'s projections fitted to layer ``j``'s keys and
values (``kv_sharing``; KVSharer shares without refitting).

Closed-form and local, on calibration activations of the dense model:

- ``q_proj`` by least squares on the attention logits: per query head,
  ``min_W sum_{t, s <= t} (scale * rot_t(W x_t) . K^j_s - scale * q_t . K^i_s)^2`` over the
  tokens ``s`` the query sees (causal, the layer's window), ``K`` the rotated keys. The logits
  are linear in ``W`` (the rotary embedding is a fixed rotation per position), so this is one
  linear least-squares problem per head, solved by conjugate gradients on its normal equations
  with matrix-free products (each costs about two attention passes), from the original
  ``q_proj`` and with a small ridge towards it.
- then ``o_proj`` by ridge least squares from the new attention's per-head outputs (softmax
  over ``K^j``, values ``V^j``) to the layer's original attention output.

With QK-norm (Gemma 3: ``q_norm`` on each query head) the logits are not linear in
``q_proj``, so only ``o_proj`` is refitted there (``fit_output``: the same ridge least squares,
from the sharing attention's per-head outputs with the layer's own queries).

``fit_shared`` returns the new weights and the relative errors before and after.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..reference import decoder_layers, window_mask


@dataclass
class SharedFit:
    """Refitted projections of a layer sharing another's KV cache, and how well they fit."""

    q_weight: torch.Tensor  # [H*h, d]
    o_weight: torch.Tensor  # [d, H*h]
    logit_error: dict[str, float]  # relative logit error: "shared" (unfitted), "fitted"
    output_error: dict[str, float]  # relative attention-output error: "shared", "q", "q+o"


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotary embedding of ``x`` [b, H, T, h] (``cos``/``sin`` [b, T, h]); the inverse
    rotation is ``_rotate(x, cos, -sin)``."""
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + turned * sin[:, None]


@dataclass
class _Acts:
    x_i: torch.Tensor  # [b, T, d] layer i's normed attention input
    y_i: torch.Tensor  # [b, T, d] layer i's attention output
    k_i: torch.Tensor  # [b, G, T, h] rotated
    k_j: torch.Tensor
    v_j: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


def _activations(model: Any, ids: torch.Tensor, idx: int, target: int) -> _Acts:
    layers: Any = decoder_layers(model)
    seen: dict[str, Any] = {}
    hooks = [layers[k].input_layernorm.register_forward_hook(
        lambda m, a, out, k=k: seen.__setitem__(f"x{k}", out.detach())) for k in (idx, target)]
    hooks.append(layers[idx].self_attn.register_forward_hook(
        lambda m, a, out: seen.__setitem__("y", out[0].detach())))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    a_i, a_j = layers[idx].self_attn, layers[target].self_attn
    h = int(a_i.head_dim)
    b, t = ids.shape
    pos = torch.arange(t)[None].expand(b, -1)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(seen[f"x{idx}"], pos)

        def heads(lin: Any, x: torch.Tensor) -> torch.Tensor:
            return lin(x).view(b, t, -1, h).transpose(1, 2)

        return _Acts(seen[f"x{idx}"], seen["y"],
                     _rotate(heads(a_i.k_proj, seen[f"x{idx}"]), cos, sin),
                     _rotate(heads(a_j.k_proj, seen[f"x{target}"]), cos, sin),
                     heads(a_j.v_proj, seen[f"x{target}"]), cos, sin)


def _cg(apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x: torch.Tensor,
        steps: int, tol: float = 1e-8) -> torch.Tensor:
    """Conjugate gradients for ``apply(x) = b`` (``apply`` symmetric positive definite)."""
    r = b - apply(x)
    p, rr = r.clone(), (r * r).sum()
    for _ in range(steps):
        if rr <= tol * (b * b).sum():
            break
        ap = apply(p)
        alpha = rr / (p * ap).sum()
        x, r = x + alpha * p, r - alpha * ap
        rr_new = (r * r).sum()
        p, rr = r + (rr_new / rr) * p, rr_new
    return x


def _ridge_o(z: torch.Tensor, target: torch.Tensor, ridge: float) -> torch.Tensor:
    """``o_proj``'s weight [d, H*h] by ridge least squares from per-head outputs ``z``
    [n, H*h] to ``target`` [n, d] (the ridge scaled by the Gram matrix's mean diagonal)."""
    gram = z.T @ z
    lam = ridge * gram.diagonal().mean()
    return torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype),
                              z.T @ target).T


def fit_shared(model: Any, idx: int, target: int, ids: torch.Tensor,
               window: int | None = None, steps: int = 40, ridge: float = 1e-4,
               local_steps: int = 0, lr: float = 1e-4) -> SharedFit:
    """Layer ``idx``'s ``q_proj`` and ``o_proj`` refitted to layer ``target``'s keys and values
    on the calibration token windows ``ids`` [b, T] (the dense model's activations; ``window``:
    the layer's sliding window). The model is not changed. With QK-norm, ``fit_output``
    (``local_steps`` Adam steps at ``lr`` on q and o)."""
    if getattr(decoder_layers(model)[idx].self_attn, "q_norm", None) is not None:
        return fit_output(model, idx, target, ids, ridge, local_steps, lr)
    acts = _activations(model, ids, idx, target)
    attn: Any = decoder_layers(model)[idx].self_attn
    w_q = attn.q_proj.weight.detach().double()
    w_o = attn.o_proj.weight.detach().double()
    h, scale = int(attn.head_dim), float(attn.scaling)
    n_q = w_q.shape[0] // h
    b, t, _ = acts.x_i.shape
    x = acts.x_i.double()
    cos, sin = acts.cos.double(), acts.sin.double()
    rep = n_q // acts.k_j.shape[1]
    k_i = acts.k_i.double().repeat_interleave(rep, 1)
    k_j = acts.k_j.double().repeat_interleave(rep, 1)
    v_j = acts.v_j.double().repeat_interleave(rep, 1)
    seen = window_mask(window or t, t, t, torch.float64) == 0  # [1, 1, T, T]
    q_bias = attn.q_proj.bias.detach().double() if attn.q_proj.bias is not None else None

    def queries(w: torch.Tensor, bias: torch.Tensor | None = q_bias) -> torch.Tensor:
        q = x @ w.T + (0 if bias is None else bias)
        return _rotate(q.view(b, t, n_q, h).transpose(1, 2), cos, sin)

    def logits(w: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None = q_bias
               ) -> torch.Tensor:
        return (queries(w, bias) @ keys.transpose(2, 3) * scale) * seen

    def gram(w: torch.Tensor) -> torch.Tensor:  # the normal operator: A^T A w (+ ridge)
        return back(logits(w, k_j, None)) + ridge * w

    def back(r: torch.Tensor) -> torch.Tensor:  # A^T r: logit residuals -> q_proj gradient
        g = _rotate((r * seen) @ k_j * scale, cos, -sin)  # [b, H, T, h]
        return g.transpose(1, 2).reshape(b * t, n_q * h).T @ x.reshape(b * t, -1)

    want = logits(w_q, k_i)
    rhs = back(want - (0 if q_bias is None else logits(torch.zeros_like(w_q), k_j)))
    new_q = _cg(gram, rhs + ridge * w_q, w_q.clone(), steps)

    def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
        return float((a - ref).norm() / ref.norm())

    def heads_out(w: torch.Tensor) -> torch.Tensor:  # [b*T, H*h] softmax(logits) V_j
        s = logits(w, k_j).masked_fill(~seen, float("-inf"))
        z = torch.softmax(s, -1) @ v_j
        return z.transpose(1, 2).reshape(b * t, n_q * h)

    y = acts.y_i.double().reshape(b * t, -1)
    o_bias = attn.o_proj.bias.detach().double() if attn.o_proj.bias is not None else 0
    z_old, z_new = heads_out(w_q), heads_out(new_q)
    new_o = _ridge_o(z_new, y - o_bias, ridge)
    return SharedFit(
        q_weight=new_q.to(attn.q_proj.weight.dtype),
        o_weight=new_o.to(attn.o_proj.weight.dtype),
        logit_error={"shared": rel(logits(w_q, k_j), want),
                     "fitted": rel(logits(new_q, k_j), want)},
        output_error={"shared": rel(z_old @ w_o.T + o_bias, y),
                      "q": rel(z_new @ w_o.T + o_bias, y),
                      "q+o": rel(z_new @ new_o.T + o_bias, y)})


def fit_output(model: Any, idx: int, target: int, ids: torch.Tensor, ridge: float = 1e-4,
               q_steps: int = 0, lr: float = 1e-4) -> SharedFit:
    """Layer ``idx`` sharing ``target``'s keys and values (the model's own sharing reference,
    so QK-norm and native windows are as served), fitted to its dense attention output on
    ``ids`` [b, T]: ``o_proj`` by ridge least squares from the per-head outputs; then, with
    ``q_steps``, ``q_proj`` and ``o_proj`` by that many Adam steps of local reconstruction
    (the relative squared error of the attention output over all windows), and ``o_proj`` by
    least squares again. The model is not changed."""
    from ..reference import shared

    layers: Any = decoder_layers(model)
    attn: Any = layers[idx].self_attn
    q0, o0 = attn.q_proj.weight.detach().clone(), attn.o_proj.weight.detach().clone()
    dense: list[torch.Tensor] = []
    with torch.no_grad():
        hook = attn.register_forward_hook(lambda m, a, out: dense.append(out[0].detach()))
        try:
            for row in ids:
                model(input_ids=row[None], use_cache=False)
        finally:
            hook.remove()
    y = torch.cat([d.reshape(-1, d.shape[-1]) for d in dense]).double()
    o_bias = attn.o_proj.bias.detach().double() if attn.o_proj.bias is not None else 0

    def rel(a: torch.Tensor) -> float:
        return float((a - y).norm() / y.norm())

    with shared(model, {idx: target}):
        module: Any = layers[idx].self_attn
        kv_owner: Any = layers[target].self_attn
        calls: list[tuple[dict, Any]] = []  # the module's inputs and its target's, per window

        def keep(m: Any, args: tuple, kw: dict) -> None:
            calls.append(({k: v for k, v in kw.items() if k != "past_key_values"},
                          kv_owner.harp_kv_input))

        pre = module.register_forward_pre_hook(keep, with_kwargs=True)
        try:
            with torch.no_grad():
                for row in ids:
                    model(input_ids=row[None], use_cache=False)
        finally:
            pre.remove()

        def heads() -> torch.Tensor:  # [b*T, H*h] the per-head outputs with today's q_proj
            got: list[torch.Tensor] = []
            h = module.o_proj.register_forward_pre_hook(lambda m, a: got.append(a[0]))
            try:
                with torch.no_grad():
                    for kw, stash in calls:
                        kv_owner.harp_kv_input = stash
                        module(**kw)
            finally:
                h.remove()
            return torch.cat([g.reshape(-1, g.shape[-1]) for g in got]).double()

        try:
            z = heads()
            errors = {"shared": rel(z @ o0.double().T + o_bias)}
            new_o = _ridge_o(z, y - o_bias, ridge)
            errors["o"] = rel(z @ new_o.T + o_bias)
            new_q = q0
            if q_steps:
                with torch.no_grad():
                    module.o_proj.weight.copy_(new_o.to(o0.dtype))
                params = [module.q_proj.weight, module.o_proj.weight]
                opt = torch.optim.Adam(params, lr=lr)
                scale = float(y.pow(2).sum())
                for _ in range(q_steps):
                    opt.zero_grad()
                    loss = torch.zeros((), dtype=torch.float64)
                    for (kw, stash), want in zip(calls, dense, strict=True):
                        kv_owner.harp_kv_input = stash
                        out = module(**kw)[0]
                        loss = loss + (out - want).double().pow(2).sum() / scale
                    loss.backward()
                    opt.step()
                new_q = module.q_proj.weight.detach().clone()
                z = heads()
                new_o = _ridge_o(z, y - o_bias, ridge)
                errors["q+o"] = rel(z @ new_o.T + o_bias)
        finally:
            with torch.no_grad():  # the dense layer's own weights back
                attn.q_proj.weight.copy_(q0)
                attn.o_proj.weight.copy_(o0)
    return SharedFit(q_weight=new_q, o_weight=new_o.to(o0.dtype), logit_error={},
                     output_error=errors)


def apply_fit(model: Any, idx: int, fit: SharedFit) -> None:
    """Write ``fit``'s projections into layer ``idx`` of the (dense or shared) model."""
    attn: Any = decoder_layers(model)[idx].self_attn
    with torch.no_grad():
        attn.q_proj.weight.copy_(fit.q_weight)
        attn.o_proj.weight.copy_(fit.o_weight)
