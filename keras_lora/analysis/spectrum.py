"""`spectrum`: the singular values of each ΔW = s·A·B, and its effective rank."""

import numpy as np

from keras_lora.analysis import sources


def update_svd(factors):
    """The thin SVD of ΔW = s·A·B from its factors, without forming ΔW.

    Args:
        factors: a `sources.Factors`.

    Returns:
        `(u, s, v)`: `u` `(d_in, r)` and `v` `(d_out, r)` orthonormal, `s` the
        r singular values, largest first, with ΔW = u · diag(s) · vᵀ.
    """
    # A = Qa·Ra and Bᵀ = Qb·Rb, so ΔW = Qa·(s·Ra·Rbᵀ)·Qbᵀ: one r x r SVD.
    qa, ra = np.linalg.qr(factors.a)
    qb, rb = np.linalg.qr(factors.b.T)
    u, s, vt = np.linalg.svd(factors.scale * ra @ rb.T)
    return qa @ u, s, qb @ vt.T


def spectrum(source, layers=None):
    """Singular values of ΔW for each adapted layer.

    Args:
        source: an adapted model, an adapter file, a LoRA layer, or a pair
            `(model or adapter file, layer path)`.
        layers: layer paths to keep (default: every adapted layer).

    Returns:
        `{layer_path: singular values}`, each a NumPy array of length r,
        largest first, in model order.

    Example:

    >>> values = keras_lora.analysis.spectrum("task.adapter.keras")
    >>> {p: keras_lora.analysis.effective_rank(s) for p, s in values.items()}
    """
    if hasattr(source, "lora_a") or isinstance(source, tuple):
        found = sources.factors_of(source, "source")
        return {found.path: update_svd(found)[1]}
    found = sources.all_factors(source)
    if not found:
        raise ValueError(f"`source` has no LoRA layer. Received: source={source!r}")
    if layers is not None:
        unknown = [p for p in layers if p not in found]
        if unknown:
            raise ValueError(
                f"`layers` names layers that are not adapted: {unknown[:8]}. "
                f"Adapted layers: {list(found)[:8]}"
            )
    return {
        path: update_svd(f)[1]
        for path, f in found.items()
        if layers is None or path in layers
    }


def effective_rank(values):
    """exp(entropy) of the normalised singular values (Roy & Vetterli, 2007).

    Equals k for k equal non-zero values and 1 for a single one; 0 for ΔW = 0.

    Args:
        values: singular values, e.g. one entry of `spectrum(...)`.

    Returns:
        A float between 0 and `len(values)`.
    """
    values = np.abs(np.asarray(values, dtype="float64"))
    total = values.sum()
    if total == 0:
        return 0.0
    p = values[values > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))
