"""A layer's separation choice as plans, latency tables, the manifest and the report write it (no TensorFlow: the
report reads it on a device too): an int K for the depthwise-separable form (0: the layer kept as it is), or "s<r>" for
the spatially separable form (a kh x 1 then a 1 x kw convolution) with r channels between its halves."""

from __future__ import annotations

DEPTHWISE, SPATIAL = "depthwise", "spatial"
FORMS = (DEPTHWISE, SPATIAL)
SPATIAL_PREFIX = "s"  # a per-layer choice of the spatial form at rank r is written "s<r>" ("s16")

# A layer's choice, as plans, tables and the manifest write it: an int K for the depthwise-separable form (0: the layer
# kept as it is), or "s<r>" for the spatially separable form at rank r.
Choice = int | str


def spatial_choice(rank: int) -> str:
    return f"{SPATIAL_PREFIX}{int(rank)}"


def parse_choice(choice) -> tuple[str, int]:
    """(form, rank) of a per-layer choice: (DEPTHWISE, K) for an int (0: kept), (SPATIAL, r) for "s<r>"; ValueError
    for anything else."""
    if isinstance(choice, int) and not isinstance(choice, bool) and choice >= 0:
        return DEPTHWISE, choice
    if isinstance(choice, str) and choice.startswith(SPATIAL_PREFIX) and choice[1:].isdigit() and int(choice[1:]) >= 1:
        return SPATIAL, int(choice[1:])
    raise ValueError(f"not a per-layer choice: {choice!r} (a whole number K >= 0, or 's<r>' for the spatial form)")


def is_choice(value) -> bool:
    """A per-layer choice `parse_choice` reads."""
    return _form(value) is not None


def spatial_rank(choice) -> int | None:
    """r of a spatial choice ("s16" -> 16); None for a depthwise K, keeping, or anything else."""
    return parse_choice(choice)[1] if _form(choice) == SPATIAL else None


def choice_of_key(key: str):
    """The choice a table key names ("2" -> 2, "s16" -> "s16"; latency_choice.rank_key's inverse for separations)."""
    return int(key) if key.isdigit() else key


def choice_label(choice) -> str:
    """How reports name a choice: "K=2", "spatial r=16", "kept" (anything else as it is written)."""
    try:
        form, rank = parse_choice(choice)
    except ValueError:
        return str(choice)
    if form == SPATIAL:
        return f"spatial r={rank}"
    return f"K={rank}" if rank else "kept"


def choice_order(choice) -> tuple:
    """A sort key over choices of both forms: depthwise K ascending, then spatial r ascending (anything else last)."""
    try:
        form, rank = parse_choice(choice)
    except ValueError:
        return (2, 0, str(choice))
    return (int(form == SPATIAL), rank, "")


def choice_columns(layers) -> list:
    """Table columns over the choices of several layers (`layers`: each layer's choices): one per depthwise K, then one
    per position among a layer's spatial ranks (theirs differ from layer to layer: "spatial #1" is each layer's
    smallest r). Each column is (header, pick), pick(choices) giving that column's choice of a layer or None."""
    ks = sorted({c for choices in layers for c in choices if _form(c) == DEPTHWISE and c}, key=choice_order)
    spatial = max([sum(_form(c) == SPATIAL for c in choices) for choices in layers] or [0])

    def depthwise(k):
        return lambda choices: k if k in choices else None

    def nth(index):
        def pick(choices):
            found = sorted((c for c in choices if _form(c) == SPATIAL), key=choice_order)
            return found[index] if index < len(found) else None
        return pick

    return ([(choice_label(k), depthwise(k)) for k in ks]
            + [(f"spatial #{index + 1}", nth(index)) for index in range(spatial)])


def _form(choice) -> str | None:
    try:
        return parse_choice(choice)[0]
    except ValueError:
        return None
