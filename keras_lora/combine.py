"""`combine_adapters`: a new adapter from several weighted ones (PEFT's three ways).

For each layer that any of the adapters adapts, with ΔW_i = s_i·A_i·B_i:

- `"cat"`: A = [w_1 s_1 A_1 | w_2 s_2 A_2 | ...], B = [B_1; B_2; ...] (ranks
  concatenated), scale 1: exactly Σ w_i ΔW_i.
- `"svd"`: the truncated SVD of Σ w_i ΔW_i (per group of an EinsumDense) to
  `rank`: A = U·S, B = Vᵀ, scale 1. At full rank it is exact.
- `"linear"`: same-rank adapters, factors mixed like PEFT's `linear`:
  A = Σ sign(w_i)·√|w_i|·s_i·A_i, B = Σ √|w_i|·B_i, scale 1. Cheap, but the
  product has cross terms A_i·B_j: it is not the weighted sum of updates.

The maths is done in NumPy float64; the new adapter has dropout 0, no trained
heads (heads cannot be combined), alpha = its rank (scale 1), and is inactive.
"""

import math
import numbers

import keras
import numpy as np

from keras_lora import model_paths, named_adapters, transform
from keras_lora.spec import SPEC_VERSION

COMBINATIONS = ("linear", "cat", "svd")


def combine_adapters(model, names, weights, new_name, combination="svd", rank=None):
    """Adds adapter `new_name`, the weighted combination of `names`.

    Args:
        model: a model with named adapters.
        names: a list of adapter names.
        weights: one number per name.
        new_name: the new adapter's name.
        combination: `"linear"`, `"cat"` or `"svd"` (see the module docstring).
            `"cat"` refuses a combined rank above min(d_in, d_out) of a layer
            (PEFT allows it; a layer's rank never exceeds that here): use
            `"svd"` with `rank=min(d_in, d_out)`, which is then exact.
        rank: for `"svd"`, the new rank (default: the largest of `names`);
            must be None otherwise.

    Returns:
        The same model, with `new_name` added (inactive: `set_adapter` it).

    Example:

    >>> keras_lora.combine_adapters(model, ["a", "b"], [0.5, 0.5], "ab", "cat")
    >>> keras_lora.set_adapter(model, "ab")
    """
    known = named_adapters.list_adapters(model)
    if not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"`names` must be a non-empty list. Received: names={names!r}")
    for name in names:
        if name not in known:
            raise ValueError(
                f"Model '{model.name}' has no adapter {name!r}. Its adapters: {known}"
            )
    if (
        not isinstance(weights, (list, tuple))
        or len(weights) != len(names)
        or not all(
            # Any real number (NumPy's too), as `set_adapter` accepts.
            isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w)
            for w in weights
        )
    ):
        raise ValueError(
            "`weights` must be a list of finite numbers, one per name. "
            f"Received: weights={weights!r}"
        )
    if combination not in COMBINATIONS:
        raise ValueError(
            f"`combination` must be one of {COMBINATIONS}. "
            f"Received: combination={combination!r}"
        )
    if rank is not None and combination != "svd":
        raise ValueError(
            f"`rank` applies to combination='svd' only. Received: rank={rank!r}"
        )
    if new_name in known:
        raise ValueError(f"Model '{model.name}' already has an adapter {new_name!r}.")
    layers = [
        layer
        for layer in transform.lora_layers(model)
        if any(n in layer.lora_adapter_names for n in names)
    ]
    factors = {}
    for layer in layers:
        parts = [
            (layer.lora_adapter(n), float(w))
            for n, w in zip(names, weights)
            if n in layer.lora_adapter_names
        ]
        factors[model_paths.relative_path(model, layer.path)] = _combine(
            layer, parts, combination, rank
        )
    spec = {
        "version": SPEC_VERSION,
        "targets": f"combined:{combination}",
        "layers": {
            path: {
                "rank": int(a.shape[-1]),
                "alpha": None,
                "dropout": 0.0,
                "use_rslora": False,
                "a_initializer": "zeros",
                "b_initializer": "zeros",
            }
            for path, (a, _) in factors.items()
        },
        "train_layers": [],
    }
    named_adapters.add_spec(model, new_name, spec)
    by_path = model_paths.layers_by_path(model)
    for path, (a, b) in factors.items():
        adapter = by_path[path].lora_adapter(new_name)
        adapter.a.assign(a.astype("float32"))
        adapter.b.assign(b.astype("float32"))
    return model


def _combine(layer, parts, combination, rank):
    """Returns (A, B) NumPy factors in the layer's layout for the new adapter."""
    groups = layer.lora_group_count()
    as_np = lambda v: np.asarray(keras.ops.convert_to_numpy(v), "float64")  # noqa: E731
    if combination == "cat":
        a = np.concatenate([w * p.scale * as_np(p.a) for p, w in parts], axis=-1)
        b = np.concatenate([as_np(p.b) for p, _ in parts], axis=groups)
        return _checked(layer, a, b)
    if combination == "linear":
        ranks = {p.rank for p, _ in parts}
        if len(ranks) != 1:
            raise ValueError(
                "combination='linear' needs adapters of one rank; layer "
                f"'{layer.path}' has ranks {sorted(ranks)}. Use 'cat' or 'svd'."
            )
        a = sum(np.sign(w) * math.sqrt(abs(w)) * p.scale * as_np(p.a) for p, w in parts)
        b = sum(math.sqrt(abs(w)) * as_np(p.b) for p, w in parts)
        return a, b
    # svd: per group, the weighted ΔW as a (d_in, d_out) matrix.
    a_shape, b_shape = parts[0][0].a.shape, parts[0][0].b.shape
    group_shape = tuple(a_shape[:groups])
    g = math.prod(group_shape)
    d_in = math.prod(a_shape[groups:-1])
    d_out = math.prod(b_shape[groups + 1 :])
    delta = np.zeros((g, d_in, d_out))
    for p, w in parts:
        a_i = as_np(p.a).reshape(g, d_in, p.rank)
        b_i = as_np(p.b).reshape(g, p.rank, d_out)
        delta += w * p.scale * np.matmul(a_i, b_i)
    rank = max(p.rank for p, _ in parts) if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`rank` must be a positive integer. Received: rank={rank!r}")
    rank = min(rank, d_in, d_out)
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    a = u[:, :, :rank] * s[:, None, :rank]
    b = vt[:, :rank, :]
    a = a.reshape(*group_shape, *a_shape[groups:-1], rank)
    b = b.reshape(*group_shape, rank, *b_shape[groups + 1 :])
    return a, b


def _checked(layer, a, b):
    rank = a.shape[-1]
    _, _, d_in, d_out = layer.lora_layout()
    if rank > min(d_in, d_out):
        raise ValueError(
            f"combination='cat' gives layer '{layer.path}' rank {rank} > "
            f"min(d_in, d_out) = {min(d_in, d_out)}; use combination='svd' "
            f"with rank={min(d_in, d_out)} (exact). Received: combination='cat'"
        )
    return a, b
