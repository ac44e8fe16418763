"""One adapted layer as `keras-lora inspect` reports it, whatever the file."""

import math


def layer_entry(
    path, rank, alpha, use_rslora, dropout=None, shapes=None, use_dora=False, init=None
):
    """One adapted layer of `describe`'s output (alpha None means rank)."""
    alpha = float(rank if alpha is None else alpha)
    entry = {
        "path": path,
        "rank": rank,
        "alpha": alpha,
        "scale": alpha / math.sqrt(rank) if use_rslora else alpha / rank,
        "use_rslora": bool(use_rslora),
    }
    if use_dora:
        entry["use_dora"] = True
    if init:
        entry["init"] = init
    if dropout is not None:
        entry["dropout"] = dropout
    if shapes is not None:
        entry["a_shape"], entry["b_shape"] = (list(shape) for shape in shapes)
    return entry
