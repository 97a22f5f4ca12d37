"""A planned layer's candidates: ``Choice`` (keep, dropK, dropKlin, linearR, remove, winW,
winWkG, shareJ), its shape under the cost model, which sharing targets each layer is offered,
and the ``--layout`` text that names a whole layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import UserError
from ...families import family_of, head_dim
from .. import costs
from ..heads import group_size
from ..selection import parse_layer_list

KINDS = ("drop", "droplin", "linear", "remove", "window", "share",
         "group-window")  # --candidates' kinds
DEFAULT_WINDOWS = (512, 1024, 2048)  # the sliding windows ``window`` offers (tokens)
DEFAULT_SHARE_TARGETS = 2  # ``share``: each layer is offered its nearest earlier layers


@dataclass(frozen=True)
class Choice:
    """One layer's candidate: ``keep``, ``drop`` (``groups`` KV groups, FLAP's bias),
    ``droplin`` (``groups`` KV groups, a fitted map in their place), ``linear`` (``rank``,
    None = full), ``remove``, ``window`` (sliding-window attention over ``window``
    tokens: the layer keeps its weights and context up to W tokens back) or ``share``
    (attention over earlier layer ``target``'s keys and values, q/o refitted, no KV cache;
    the solver offers a layer only its ``share_targets``, and only beside a kept target).
    A window with ``full_groups`` windows only the other KV groups: those keep every token
    (``winWkG``, DuoAttention's retrieval heads per KV group)."""

    kind: str
    groups: int = 0
    rank: int | None = None
    window: int | None = None
    target: int | None = None
    full_groups: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        if self.kind == "drop":
            return f"drop{self.groups}"
        if self.kind == "droplin":
            return f"drop{self.groups}lin"
        if self.kind == "linear":
            return f"linear{'full' if self.rank is None else self.rank}"
        if self.kind == "window":
            return f"win{self.window}" + "".join(f"k{g}" for g in self.full_groups)
        if self.kind == "share":
            return f"share{self.target}"
        return self.kind

    def shape(self, cfg: Any, idx: int | None = None) -> costs.LayerShape:
        """Layer ``idx``'s ``LayerShape`` under this choice (MLP untouched). A layer that
        keeps attention keeps its own sliding window (Gemma's local layers; ``idx`` None: no
        native window), a window choice never widens it."""
        inter, r = cfg.intermediate_size, group_size(cfg)
        if self.kind == "linear":
            return costs.LayerShape("linear", rank=self.rank, intermediate=inter)
        if self.kind == "remove":
            return costs.LayerShape("removed", intermediate=inter)
        native = None if idx is None else costs.native_window(cfg, idx)
        window = native if self.window is None else min(self.window, native or self.window)
        if self.kind in ("window", "share"):
            return costs.LayerShape("dense", cfg.num_attention_heads, cfg.num_key_value_heads,
                                    None, inter, window=window, shares=self.target,
                                    whole_kv_heads=len(self.full_groups))
        kv = cfg.num_key_value_heads - self.groups
        added = self.groups * r * head_dim(cfg) if self.kind == "droplin" else 0
        return costs.LayerShape("dense", kv * r, kv, None, inter, added_rank=added,
                                window=window)


KEEP = Choice("keep")


def unserved(kind: str, cfg: Any) -> str | None:
    """Why the model's family cannot serve candidates of ``kind`` (None: it can). A KV-group
    cut needs per-layer head counts (the family's ``heads``) and a layer of more than one KV
    head (Gemma 3 has one: no cut), FLAP's bias-only cut also o_proj biases
    (``compensation``); sliding windows and KV sharing need the family's ``windows`` and
    ``kv_sharing``."""
    family = family_of(cfg)
    if kind in ("drop", "droplin"):
        if cfg.num_key_value_heads < 2:
            return "the model has a single KV head per layer: no KV group to cut"
        if not family.heads:
            return f"KV-group cuts are not served for {cfg.model_type!r} models"
        if kind == "drop" and not family.compensation:
            return f"FLAP's bias compensation is not served for {cfg.model_type!r} models"
    if kind == "window" and not family.windows:
        return f"per-layer sliding windows are not served for {cfg.model_type!r} models"
    if kind == "group-window":
        if cfg.num_key_value_heads < 2:
            return "the model has a single KV head per layer: no KV group to keep whole"
        if not family.group_windows:
            return f"windows per KV group are not served for {cfg.model_type!r} models"
    if kind == "share" and not family.kv_sharing:
        return f"cross-layer KV sharing is not served for {cfg.model_type!r} models"
    return None


def served_kinds(kinds: tuple[str, ...], cfg: Any) -> tuple[str, ...]:
    """``kinds`` without those the model's family cannot serve (the default candidate set
    follows the family)."""
    return tuple(k for k in kinds if unserved(k, cfg) is None)




def parse_choice(text: str, cfg: Any) -> Choice:
    """``keep``, ``dropK``, ``dropKlin``, ``linearR`` / ``linearfull``, ``remove``, ``winW``,
    ``winWkG..`` (KV groups ``G`` kept whole), ``shareJ`` -> ``Choice``."""
    t = text.strip().lower()
    kind = next((k for k, pre in (("droplin", "drop"), ("drop", "drop"), ("window", "win"),
                                  ("share", "share"))
                 if t.startswith(pre) and (k != "droplin" or t.endswith("lin"))), None)
    if kind == "window" and "k" in t:
        kind = "group-window"
    why = None if kind is None else unserved(kind, cfg)
    if why is not None:
        raise UserError(f"{text!r}: {why}")
    return _parse_choice(t, cfg)


def _parse_choice(text: str, cfg: Any) -> Choice:
    t = text.strip().lower()
    if t in ("keep", "remove"):
        return Choice(t)
    if t.startswith("win") and t[3:].isdigit():
        return Choice("window", window=check_window(int(t[3:]), cfg))
    if t.startswith("win") and "k" in t:
        size, *groups = t[3:].split("k")
        if size.isdigit() and groups and all(g.isdigit() for g in groups):
            return Choice("window", window=check_window(int(size), cfg),
                          full_groups=check_groups(text, [int(g) for g in groups], cfg))
    if t.startswith("share") and t[5:].isdigit():
        return Choice("share", target=int(t[5:]))
    lin = t.endswith("lin")
    count = t[4:-3] if lin else t[4:]
    if t.startswith("drop") and count.isdigit():
        k = int(count)
        if not 1 <= k < cfg.num_key_value_heads:
            raise UserError(f"{text!r}: a layer has {cfg.num_key_value_heads} KV groups; drop "
                            f"1..{cfg.num_key_value_heads - 1} (use remove for all)")
        return Choice("droplin" if lin else "drop", groups=k)
    if t.startswith("linear"):
        rest = t[6:]
        if rest == "full":
            return Choice("linear", rank=None)
        if rest.isdigit() and 1 <= int(rest) <= cfg.hidden_size:
            return Choice("linear", rank=None if int(rest) == cfg.hidden_size else int(rest))
    raise UserError(f"unknown layer choice {text!r}: use keep, drop1..drop"
                    f"{cfg.num_key_value_heads - 1}, drop1lin..drop"
                    f"{cfg.num_key_value_heads - 1}lin, linearR (R in 1..{cfg.hidden_size}), "
                    f"linearfull, remove, winW (a sliding window of W tokens), winWkG (the "
                    f"window on every KV group but G, kept whole; kG repeats) or shareJ "
                    f"(layer J's keys and values)")


def parse_layout(text: str, cfg: Any) -> dict[int, Choice]:
    """``"7:linear192,28-29:remove,3:drop1"`` -> ``{7: ..., 28: ..., 29: ..., 3: ...}``."""
    layout: dict[int, Choice] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        if ":" not in item:
            raise UserError(f"bad --layout item {item!r} (use LAYERS:CHOICE, e.g. 28:remove)")
        where, what = item.split(":", 1)
        choice = parse_choice(what, cfg)
        for j in parse_layer_list(where):
            if not 0 <= j < cfg.num_hidden_layers:
                raise UserError(f"--layout: layer {j} out of range (the model has "
                                f"{cfg.num_hidden_layers} layers: 0..{cfg.num_hidden_layers - 1})")
            if j in layout:
                raise UserError(f"--layout: layer {j} is given twice")
            layout[j] = choice
    for j, c in layout.items():
        if c.kind == "share":
            check_share(j, c, layout, cfg)
    return {j: c for j, c in layout.items() if c != KEEP}


def check_share(j: int, choice: Choice, layout: dict[int, Choice], cfg: Any) -> None:
    """Layer ``j`` may share its target's KV cache: an earlier layer kept whole (the spec's
    rules, ``spec_parts._check_sharing``, for what a layout can make of a layer)."""
    t = choice.target
    assert t is not None
    if not 0 <= t < j:
        raise UserError(f"--layout: {j}:{choice.name}: a layer shares the KV cache of an "
                        f"earlier layer (0..{j - 1})")
    if layout.get(t, KEEP) != KEEP:
        raise UserError(f"--layout: {j}:{choice.name}: layer {t} is {layout[t].name}; a "
                        f"sharing target keeps its attention whole (keep)")
    own, its = costs.native_window(cfg, j), costs.native_window(cfg, t)
    if own != its:  # Gemma 3: a global layer shares a global one, a local one a local one

        def kind(w: int | None) -> str:
            return "full attention" if w is None else f"a {w}-token sliding window"

        raise UserError(f"--layout: {j}:{choice.name}: layer {j} has {kind(own)} and layer {t} "
                        f"{kind(its)}; a layer shares the KV cache of one of its own kind")


def check_groups(text: str, groups: list[int], cfg: Any) -> tuple[int, ...]:
    """The KV groups a ``winWkG`` choice keeps whole, sorted, if they are some but not all of
    the layer's."""
    kv = cfg.num_key_value_heads
    if len(set(groups)) != len(groups) or max(groups) >= kv or len(groups) >= kv:
        raise UserError(f"{text!r}: a layer has {kv} KV groups (0..{kv - 1}); keep some of "
                        f"them whole, each once, and window the rest")
    return tuple(sorted(groups))


def check_window(window: int, cfg: Any) -> int:
    """``window`` if it is a usable sliding window for ``cfg`` (1 <= W < its context)."""
    context = int(cfg.max_position_embeddings)
    if not 1 <= window < context:
        raise UserError(f"a sliding window must be 1..{context - 1} tokens (the model's context "
                        f"is {context}), got {window}")
    return window


def share_targets(cfg: Any, j: int, count: int) -> list[int]:
    """The earlier layers layer ``j`` is offered to share (``count`` nearest first): those of
    its own kind (Gemma 3: global with global, local with local), as ``check_share`` asks."""
    own = costs.native_window(cfg, j)
    return [t for t in range(j - 1, -1, -1) if costs.native_window(cfg, t) == own][:count]


def unoffered_shares(cfg: Any, choices: list[Choice], count: int
                     ) -> frozenset[tuple[int, str]]:
    """The (layer, ``shareJ``) pairs of ``choices`` a layer is not offered: every target but
    its ``count`` nearest of its kind (``share_targets``)."""
    shares = [c for c in choices if c.kind == "share"]
    return frozenset((j, c.name) for j in range(cfg.num_hidden_layers) for c in shares
                     if c.target not in share_targets(cfg, j, count))


def candidates(cfg: Any, ranks: list[int | None], kinds: tuple[str, ...] = KINDS[:4],
               windows: tuple[int, ...] = DEFAULT_WINDOWS,
               shares: int = DEFAULT_SHARE_TARGETS,
               group_sizes: tuple[int, ...] | None = None) -> list[Choice]:
    """The candidate list of the given ``kinds`` (keep first): the same for every layer but
    ``shareJ``, listed for every target some layer is offered (``shares`` nearest of its
    kind); ``unoffered_shares`` names the pairs a layer is not offered. ``group-window``
    offers each window of ``group_sizes`` (default ``windows``) with each single KV group kept
    whole (``winWkG``)."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UserError(f"unknown candidate kind {unknown[0]!r}: use {', '.join(KINDS)}")
    for kind in kinds:
        why = unserved(kind, cfg)
        if why is not None:
            raise UserError(f"candidate kind {kind!r}: {why}")
    out = [KEEP]
    for kind in ("drop", "droplin"):
        if kind in kinds:
            out += [Choice(kind, groups=k) for k in range(1, cfg.num_key_value_heads)]
    if "linear" in kinds:
        out += [Choice("linear", rank=r) for r in ranks]
    if "remove" in kinds:
        out.append(Choice("remove"))
    if "window" in kinds:
        out += [Choice("window", window=check_window(w, cfg)) for w in windows]
    if "group-window" in kinds:
        out += [Choice("window", window=check_window(w, cfg), full_groups=(g,))
                for w in (windows if group_sizes is None else group_sizes)
                for g in range(cfg.num_key_value_heads)]
    if "share" in kinds:
        targets = {t for j in range(cfg.num_hidden_layers) for t in share_targets(cfg, j, shares)}
        out += [Choice("share", target=t) for t in sorted(targets)]
    return out
