"""Closed-form linear replacement of attention sublayers (``--method linear``).

For each chosen layer the attention sublayer ``y = attn(norm(h))`` is replaced by an affine,
token-local map ``y ~ x W + b`` with ``x = norm(h)`` (``input="normed"``, the attention's own
input) or ``x = h`` (``input="raw"``, the residual stream before the norm, as NBL does). The
map is fitted by ridge least squares from streamed second moments (float64, O(d^2) memory per
layer, never the activations)::

    C_xx = Cov(x),  C_xy = Cov(x, t),  W = (C_xx + lam*I)^-1 C_xy,  b = E[t] - E[x] W

and optionally cut to rank ``r`` by reduced-rank regression (the top-r principal directions
``V_r`` of the fitted values ``x W``: ``W_r = W V_r V_r^T``, stored as two linears
``in_proj = (W V_r)^T`` [r, d] and ``out_proj = V_r`` [d, r] with the bias on ``out_proj``).

The target ``t`` and the inputs depend on the fitting ``order``:

- ``dense`` (default): every layer fitted on the dense model's activations, ``t`` = the dense
  attention output (the "local" objective).
- ``sequential``: bottom-up, each layer fitted on the inputs the already-replaced layers below
  produce, ``t`` = the dense attention output on those inputs.
- ``residual``: bottom-up like ``sequential``, but ``t`` = what brings the residual
  stream back to the dense model's: ``h_dense + attn(norm(h_dense)) - h``, where ``h_dense`` is
  the dense model's hidden state at that layer. Each map also repairs the drift the replaced
  layers below it left in the residual stream. Not for post-norm families.

Post-norm families (Gemma 2/3: ``h + post_norm(attn(norm(h)))``): the map replaces
``attn`` only and the post-attention norm stays, so the map's output is normalized like the
attention's was, and the fit targets the attention output that norm reads (where HARP's
token-local path sits too, its alpha applied after the norm).
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from ...errors import UserError
from ...families import head_dim
from ...families import post_norm as family_post_norm
from ..calibration.damage import kwargs_hooks, record_dense, run_layer, suffix_kl
from ..calibration.logits import head_logits
from ..costs import LayerShape, layer_params
from ..reference import LinearAttention, decoder_layers, install_map

INPUTS = ("normed", "raw")
ORDERS = ("residual", "sequential", "dense")


@dataclass
class LinearMap:
    """One fitted replacement: ``y = out_proj(in_proj(x))`` (low rank) or ``out_proj(x)``."""

    input: str
    out_weight: torch.Tensor  # [d, r] (low rank) or [d, d] (full)
    bias: torch.Tensor  # [d]
    in_weight: torch.Tensor | None = None  # [r, d]; None for a full-rank map

    @property
    def rank(self) -> int | None:
        return None if self.in_weight is None else self.in_weight.shape[0]

    def spec(self) -> dict:
        return {"input": self.input, "rank": self.rank}

    def module(self) -> LinearAttention:
        """The reference module holding this map's weights."""
        mod = LinearAttention(self.out_weight.shape[0], self.rank)
        with torch.no_grad():
            if mod.in_proj is not None and self.in_weight is not None:
                mod.in_proj.weight.copy_(self.in_weight)
            mod.out_proj.weight.copy_(self.out_weight)
            mod.out_proj.bias.copy_(self.bias)
        return mod


@dataclass
class FitResult:
    maps: dict[int, LinearMap]
    seconds: float = 0.0
    tokens: int = 0
    stats: dict[int, dict] = field(default_factory=dict)  # per layer: relative residual etc.
    # For ``refine``: the dense hidden states entering the lowest replaced layer and the call
    # arguments of it and every layer above (per layer), and (``teacher=True``) the dense
    # last-layer outputs, per batch.
    inputs: list[torch.Tensor] = field(default_factory=list)
    kwargs: dict[int, dict] = field(default_factory=dict)
    teacher: list[torch.Tensor] | None = None


class Moments:
    """Streamed first and second moments of (x, t) in float64."""

    def __init__(self, d: int):
        self.n = 0
        self.sx = torch.zeros(d, dtype=torch.float64)
        self.st = torch.zeros(d, dtype=torch.float64)
        self.sxx = torch.zeros(d, d, dtype=torch.float64)
        self.sxt = torch.zeros(d, d, dtype=torch.float64)
        self.stt = torch.zeros((), dtype=torch.float64)

    def add(self, x: torch.Tensor, t: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        t = t.reshape(-1, t.shape[-1]).double()
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.st += t.sum(0)
        self.sxx += x.T @ x
        self.sxt += x.T @ t
        self.stt += (t * t).sum()


M = TypeVar("M")


def merged(parts: list[M]) -> M:
    """The moments of the union of ``parts``' tokens: every field of a streamed-moments
    object (``Moments``, ``group_fit.HeadMoments``) is a sum over tokens."""
    out = copy.deepcopy(parts[0])
    for part in parts[1:]:
        for name, value in vars(part).items():
            setattr(out, name, getattr(out, name) + value)
    return out


def _centred(m: Moments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E[x], E[t], C_xx, C_xt) from the moments."""
    mx, mt = m.sx / m.n, m.st / m.n
    return mx, mt, m.sxx / m.n - torch.outer(mx, mx), m.sxt / m.n - torch.outer(mx, mt)


def affine_fit(m: Moments, ridge: float, rank: int | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The float64 ridge (reduced-rank) fit ``t ~ x W + b`` from the moments: ``(W, b, V)``,
    ``V`` [d, r] the fitted values' top principal directions the rank cut keeps (``W`` is
    already cut: ``W V V^T``), None at full rank."""
    mx, mt, cxx, cxt = _centred(m)
    d = cxx.shape[0]
    lam = ridge * torch.trace(cxx) / d
    w = torch.linalg.solve(cxx + lam * torch.eye(d, dtype=cxx.dtype), cxt)  # x @ w
    v = None
    if rank is not None and rank < d:
        _, vecs = torch.linalg.eigh(w.T @ cxx @ w)  # ascending
        v = vecs[:, -rank:]
        w = w @ v @ v.T
    return w, mt - mx @ w, v


def solve(m: Moments, ridge: float, rank: int | None, input_kind: str
          ) -> tuple[LinearMap, dict]:
    """Ridge (reduced-rank) regression from the moments; returns the map and fit statistics."""
    w, b, v = affine_fit(m, ridge, rank)
    # low rank: in_proj (W V)^T [r, d], out_proj V [d, r]; full: one Linear weight [out, in]
    in_w, out_w = (None, w.T) if v is None else ((w @ v).T, v)
    # Fraction of the target's variance left unexplained (on the calibration tokens).
    _, mt, cxx, cxt = _centred(m)
    ctt = m.stt / m.n - mt @ mt
    explained = torch.trace(w.T @ cxt) * 2 - torch.trace(w.T @ cxx @ w)
    stats = {"unexplained": float((ctt - explained) / ctt), "target_var": float(ctt)}
    lm = LinearMap(input=input_kind, out_weight=out_w.float(), bias=b.float(),
                   in_weight=None if in_w is None else in_w.float())
    return lm, stats


def map_cost(config, rank: int | None) -> dict[str, int]:
    """Multiply-adds per token of one replaced layer's attention, beside HARP's folded path
    (``d -> n_kv*d_h -> d``) and the dense attention's projections (without the N-dependent
    score/value products), from the cost model in ``costs.py``."""
    kv = config.num_key_value_heads * head_dim(config)
    attention = LayerShape("dense", config.num_attention_heads, config.num_key_value_heads)
    return {"linear": layer_params(config, LayerShape("linear", rank=rank)),
            "harp_fold": layer_params(config, LayerShape("linear", rank=kv)),
            "dense_projections": layer_params(config, attention)}


def check_options(d: int, rank: int | None, input_kind: str, order: str, ridge: float,
                  post_norm: bool = False) -> None:
    if rank is not None and not 1 <= rank <= d:
        raise UserError(f"--rank {rank} is out of range: a map of the hidden size d = {d} has "
                        f"rank 1..{d} (or 'full')")
    if input_kind not in INPUTS:
        raise UserError(f"--input must be one of {', '.join(INPUTS)}, got {input_kind!r}")
    if order not in ORDERS:
        raise UserError(f"--fit-order must be one of {', '.join(ORDERS)}, got {order!r}")
    if not ridge >= 0:
        raise UserError(f"--ridge must be >= 0, got {ridge}")
    if order == "residual" and post_norm:
        raise UserError("--fit-order residual fits what the residual stream needs added, but a "
                        "post-norm family (Gemma) normalizes the map's output before adding it: "
                        "use dense or sequential")


@torch.no_grad()
def fit_linear(model, windows: torch.Tensor, layers: list[int], rank: int | None = None,
               input_kind: str = "normed", order: str = "dense", ridge: float = 1e-3,
               batch: int = 8, teacher: bool = False, progress: bool = True) -> FitResult:
    """Fit a linear map for every layer in ``layers`` and install them in ``model``.

    Runs the model once up to the lowest chosen layer, then layer by layer upwards over all
    calibration windows (in batches), keeping the current (partly replaced) hidden states and,
    for the ``residual`` order, the dense ones beside them.
    """
    start = time.perf_counter()
    d = model.config.hidden_size
    check_options(d, rank, input_kind, order, ridge, family_post_norm(model.config))
    all_layers = decoder_layers(model)
    chosen = sorted(set(layers))
    if not chosen:
        raise UserError("no layers to replace")
    first, last = chosen[0], chosen[-1]
    hidden, kwargs = _capture_inputs(model, windows, first, batch)
    result = FitResult(maps={}, tokens=int(windows.numel()), inputs=list(hidden),
                       kwargs=kwargs)
    if teacher:  # the dense model from the lowest replaced layer up, before any replacement
        result.teacher = []
        for h in hidden:
            for j in range(first, len(all_layers)):
                h = run_layer(all_layers[j], h, kwargs[j])
            result.teacher.append(h)
    dense = list(hidden) if order == "residual" else None
    bar = tqdm(total=(last - first + 1) * len(hidden), disable=not progress,
               desc="linear fit", unit="batch")
    for j in range(first, last + 1):
        layer = all_layers[j]
        if j in chosen:
            m = Moments(d)
            for b, h in enumerate(hidden):
                x_norm, attn_out = _attention_io(layer, h, kwargs[j])
                if dense is not None:
                    hd = dense[b]
                    target = hd + _attention_io(layer, hd, kwargs[j])[1] - h
                else:
                    target = attn_out
                m.add(x_norm if input_kind == "normed" else h, target)
            lm, stats = solve(m, ridge, rank, input_kind)
            result.maps[j], result.stats[j] = lm, stats
            bar.set_postfix({f"unexplained[{j}]": f"{stats['unexplained']:.3f}"})
        if j == last:
            bar.update(len(hidden))
            break
        if dense is not None:  # the dense stream goes through the dense layer j
            dense = [run_layer(layer, hd, kwargs[j]) for hd in dense]
        if j in chosen and order != "dense":
            install_map(layer, result.maps[j].module(), input_kind)
        for b in range(len(hidden)):
            hidden[b] = run_layer(layer, hidden[b], kwargs[j])
            bar.update()
    for j, lm in result.maps.items():
        if not isinstance(all_layers[j].self_attn, LinearAttention):
            install_map(all_layers[j], lm.module(), input_kind)
    bar.close()
    result.seconds = time.perf_counter() - start
    return result


def _capture_inputs(model, windows: torch.Tensor, first: int, batch: int
                    ) -> tuple[list[torch.Tensor], dict[int, dict]]:
    """Dense hidden states entering layer ``first`` (in batches) and the kwargs of that layer
    and every layer above (the first batch runs the whole model, the rest stop at ``first``)."""
    layers = decoder_layers(model)
    hidden: list[torch.Tensor] = []
    kwargs: dict[int, dict] = {}

    def hook(module, args, kw):
        hidden.append(args[0] if args else kw["hidden_states"])
        if len(hidden) > 1:
            raise _Stop

    handles = [layers[first].register_forward_pre_hook(hook, with_kwargs=True),
               *kwargs_hooks(layers, kwargs, first)]
    try:
        for i in range(0, len(windows), batch):
            with contextlib.suppress(_Stop):
                model.model(input_ids=windows[i:i + batch], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    sizes = {h.shape[0] for h in hidden}
    if len(sizes) > 1:  # the kwargs (mask, rotary) were captured for the first batch's size
        raise UserError(f"--calib-samples must be a multiple of the fit batch ({batch})")
    return hidden, kwargs


class _Stop(Exception):
    pass


def _attention_io(layer, h: torch.Tensor, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(h), dense attention output) of ``layer`` on hidden states ``h``."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    if isinstance(attn, LinearAttention):
        raise AssertionError("attention already replaced")
    out = attn(hidden_states=x, **kw)[0]
    return x, out


def refine(model, fit: FitResult, steps: int, lr: float = 2e-4, positions: int = 64,
           seed: int = 0, progress: bool = True) -> dict:
    """Jointly refine the installed maps' parameters (only those) against the dense model.

    Loss: KL(dense || replaced) of the next-token distributions at ``positions`` random token
    positions per window (the LM head runs only there), one calibration batch per step, from
    the inputs and dense outputs ``fit`` recorded (``fit_linear(..., teacher=True)``). Adam
    with cosine decay.
    """
    if fit.teacher is None:
        raise ValueError("refine needs fit_linear(..., teacher=True)")
    start = time.perf_counter()
    all_layers: Any = decoder_layers(model)
    chosen = sorted(fit.maps)
    first = chosen[0]
    params = [p for j in chosen for p in all_layers[j].self_attn.parameters()]
    ids = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    bar = tqdm(range(steps), disable=not progress, desc="refine maps", unit="step")
    for _ in bar:
        b = int(torch.randint(len(fit.inputs), (1,), generator=g))
        nb, t = fit.inputs[b].shape[:2]
        pos = torch.randint(t - 1, (nb, positions), generator=g)
        rows = torch.arange(nb)[:, None]
        h = fit.inputs[b]
        for j in range(first, len(all_layers)):
            h = run_layer(all_layers[j], h, fit.kwargs[j])
        student = torch.log_softmax(head_logits(model, h[rows, pos]).float(), -1)
        with torch.no_grad():
            target = torch.log_softmax(head_logits(model, fit.teacher[b][rows, pos]).float(),
                                       -1)
        loss = (target.exp() * (target - student)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(kl=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
    for p in model.parameters():
        p.requires_grad_(False)
    tail = losses[-10:]
    return {"steps": steps, "lr": lr, "positions": positions, "kl_first": losses[0],
            "kl_last10": sum(tail) / len(tail), "seconds": time.perf_counter() - start}


@torch.no_grad()
def layer_damage(model, windows: torch.Tensor, rank: int | None = None,
                 input_kind: str = "normed", ridge: float = 1e-3, batch: int = 8,
                 positions: int = 64, layers: list[int] | None = None, seed: int = 0,
                 progress: bool = True) -> dict[int, float]:
    """Per layer: the calibration KL(dense || model with only that layer's attention replaced
    by its fitted map), nats per token, at ``positions`` random positions per window (all
    positions when the windows are not longer). The
    quality estimate ``--select damage`` ranks layers by.

    One dense pass records every layer's input (``damage.record_dense``); each layer's map is
    fitted on its own dense inputs and the model is run from that layer up with the map in
    place.
    """
    all_layers = decoder_layers(model)
    todo = sorted(range(len(all_layers)) if layers is None else set(layers))
    d = model.config.hidden_size
    rec = record_dense(model, windows, todo, batch, positions, seed)
    damage: dict[int, float] = {}
    for j in tqdm(todo, disable=not progress, desc="per-layer damage", unit="layer"):
        layer = all_layers[j]
        m = Moments(d)
        for h in rec.inputs[j]:
            x, y = _attention_io(layer, h, rec.kwargs[j])
            m.add(x if input_kind == "normed" else h, y)
        lm, _ = solve(m, ridge, rank, input_kind)
        saved = (layer.self_attn, layer.input_layernorm)
        install_map(layer, lm.module(), input_kind)
        try:
            damage[j] = suffix_kl(model, rec, j)
        finally:
            layer.self_attn, layer.input_layernorm = saved
    return damage


def lowest_damage(damage: dict[int, float], count: int) -> list[int]:
    """The ``count`` layers whose single replacement costs the least."""
    return sorted(sorted(damage, key=lambda j: (damage[j], j))[:count])
