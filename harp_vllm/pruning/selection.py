"""Which layers a job changes: a layer list (``22-29,31``), or the top or bottom P layers."""

from __future__ import annotations

from ..errors import UserError


def parse_layer_list(text: str) -> list[int]:
    """``"22-29,31"`` -> ``[22, ..., 29, 31]``."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise UserError(f"bad layer list item {part!r} (use e.g. 22-29,31)") from None
    if not out:
        raise UserError("the layer list is empty")
    return sorted(set(out))


def select_layers(num_layers: int, count: int | None = None, ratio: float | None = None,
                  layer_list: str | None = None, position: str = "top") -> list[int]:
    """The layers to prune: the top (or bottom, layer 0 excluded) P, or an explicit list."""
    given = sum(x is not None for x in (count, ratio, layer_list))
    if given != 1:
        raise UserError("give exactly one of --layers P, --ratio r or --layer-list")
    if layer_list is not None:
        layers = parse_layer_list(layer_list)
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise UserError(f"layer index {bad[0]} out of range (the model has {num_layers} "
                            f"layers: 0..{num_layers - 1})")
        return layers
    if ratio is not None:
        if not 0 < ratio < 1:
            raise UserError(f"--ratio must be in (0, 1), got {ratio}")
        count = round(ratio * num_layers)
    assert count is not None
    limit = num_layers - 1 if position == "bottom" else num_layers
    if not 1 <= count <= limit:
        raise UserError(f"cannot prune {count} layers of {num_layers} ({position}); "
                        f"choose 1..{limit}")
    if position == "top":
        return list(range(num_layers - count, num_layers))
    if position == "bottom":
        return list(range(1, count + 1))
    raise UserError(f"--position must be top or bottom, got {position!r}")
