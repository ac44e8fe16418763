"""`subspace_similarity`: the normalised subspace overlap φ of the paper's §7.2.

φ(A₁, A₂, i, j) = ‖U₁ⁱᵀ U₂ʲ‖²_F / min(i, j), where U₁ⁱ holds the top-i
singular directions of the space A₁ maps from (the model's input features of
that layer). It is 1 when one subspace contains the other and 0 when they are
orthogonal; two random subspaces of dimensions i and j in d dimensions give
max(i, j) / d on average.

The paper writes ΔW = BA with A of shape (r, d_in) and takes A's *right*
singular vectors; keras-lora stores A as `(d_in, r)`, so they are the *left*
singular vectors of our A. For B (`factor="b"`), the subspace is the one B
maps into, of the output features.
"""

import numbers

import numpy as np

from keras_lora.analysis import sources


def subspace_similarity(a1, a2, i=None, j=None, factor="a"):
    """φ(A₁, A₂, i, j) between the factors of two adapters (paper §7.2).

    Args:
        a1: the first factor: an array in keras-lora's layout (A: `(d_in, r)`
            or `(*input_axes, r)`; B: `(r, d_out)` or `(r, *output_axes)`),
            a LoRA layer, or a pair `(model, layer_path)` or
            `(adapter_file, layer_path)`.
        a2: the second, alike; its rank may differ, its features may not.
        i: how many top directions of `a1`, 1 to its rank; None for all.
        j: how many top directions of `a2`, 1 to its rank; None for all.
        factor: `"a"` (the input-side subspaces, as in the paper's Fig. 3)
            or `"b"` (the output side).

    Returns:
        A float when `i` and `j` are both given; otherwise a 2-D NumPy array
        whose `[p, q]` entry is φ for the `p`-th value of i and the `q`-th of
        j (all of 1..rank for a None), e.g. shape `(8, 64)` for ranks 8 and 64.

    Example:

    >>> phi = keras_lora.analysis.subspace_similarity(
    ...     (model_r8, "encoder/layer_0/query"), (model_r64, "encoder/layer_0/query")
    ... )
    >>> phi.shape, phi[0, 0]   # the top directions of both agree when ~1
    ((8, 64), 0.93)
    """
    if factor not in ("a", "b"):
        raise ValueError(f"`factor` must be 'a' or 'b'. Received: factor={factor!r}")
    u1 = _directions(a1, factor, "a1")
    u2 = _directions(a2, factor, "a2")
    if u1.shape[0] != u2.shape[0]:
        raise ValueError(
            "`a1` and `a2` must act on the same number of features: "
            f"{u1.shape[0]} != {u2.shape[0]}. Received: a1 of rank {u1.shape[1]}, "
            f"a2 of rank {u2.shape[1]}"
        )
    rows = _count(i, u1.shape[1], "i")
    cols = _count(j, u2.shape[1], "j")
    # Cumulative sums give every (i, j) of the grid from one r1 x r2 product.
    overlap = np.cumsum(np.cumsum((u1.T @ u2) ** 2, axis=0), axis=1)
    grid = overlap[np.ix_(rows - 1, cols - 1)] / np.minimum.outer(rows, cols)
    if i is not None and j is not None:
        return float(grid[0, 0])
    return grid


def directions(source, factor="a", argument="a"):
    """The orthonormal singular directions of a factor, strongest first.

    Returns a `(features, rank)` matrix: the left singular vectors of A
    `(d_in, r)`, or of Bᵀ `(d_out, r)`.
    """
    return _directions(source, factor, argument)


def _directions(source, factor, argument):
    if isinstance(source, tuple) or hasattr(source, "lora_a"):
        found = sources.factors_of(source, argument)
        matrix = found.a if factor == "a" else found.b.T
    else:
        try:
            array = sources.to_matrix(source)
        except Exception as error:
            raise ValueError(
                f"`{argument}` must be an array, a LoRA layer, or a pair (model "
                f"or adapter file, layer path). Received: {argument}={source!r}"
            ) from error
        if array.ndim < 2:
            raise ValueError(
                f"`{argument}` must have at least 2 dimensions. Received: "
                f"{argument}.shape={array.shape}"
            )
        if factor == "a":
            matrix = array.reshape(-1, array.shape[-1])
        else:
            matrix = array.reshape(array.shape[0], -1).T
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"`{argument}` has NaN or infinite values.")
    u, _, _ = np.linalg.svd(matrix, full_matrices=False)
    return u


def _count(value, rank, name):
    if value is None:
        return np.arange(1, rank + 1)
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or not 1 <= value <= rank
    ):
        raise ValueError(
            f"`{name}` must be an int from 1 to the rank ({rank}) or None. "
            f"Received: {name}={value!r}"
        )
    return np.array([int(value)])
