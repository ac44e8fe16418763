"""`amplification_factor`: how ΔW relates to W (the paper's §7.3, Table 7).

The paper projects W onto ΔW's own r-dimensional subspaces, UᵀWV (U, V the
top-r left and right singular directions of ΔW), and compares norms: ΔW
amplifies directions W has but does not emphasise, by ‖ΔW‖_F / ‖UᵀWV‖_F
(21.5 for GPT-3's W_q at r=4). As there, the same projection with W's own top
directions and with random directions gives the two reference points.
"""

import os

import keras
import numpy as np

from keras_lora.analysis import sources
from keras_lora.analysis.spectrum import update_svd

RANDOM_DRAWS = 8


def amplification_factor(model, layer, base=None, seed=0):
    """The amplification factor of one adapted layer, with the paper's controls.

    Args:
        model: a model adapted with LoRA, or an adapter file (then `base` is
            required).
        layer: the layer's path (`layer.path`, as in adapter files), e.g.
            `"bert_backbone/transformer_layer_0/self_attention/query"`.
        base: the model whose kernel is W: a Keras model or a `.keras` file.
            Default: the adapted layer's own frozen kernel.
        seed: seed of the random directions of the control.

    Returns:
        A dict of floats (and the layer path):
        - `"amplification"`: ‖ΔW‖_F / ‖UᵀWV‖_F;
        - `"delta_norm"`: ‖ΔW‖_F, with ΔW = s·A·B as the model adds it;
        - `"projection_norm"`: ‖UᵀWV‖_F, U and V the top-r singular directions
          of ΔW;
        - `"kernel_norm"`: ‖W‖_F;
        - `"kernel_top_projection_norm"`: ‖UᵀWV‖_F with W's own top-r
          directions (Table 7's "W_q" column);
        - `"random_projection_norm"`: the mean of ‖UᵀWV‖_F over random
          orthonormal U and V (Table 7's "Random" column);
        - `"rank"` and `"layer"`.

    Example:

    >>> result = keras_lora.analysis.amplification_factor(
    ...     model, "bert_backbone/transformer_layer_0/self_attention/query"
    ... )
    >>> result["amplification"]
    12.4
    """
    if isinstance(model, (str, os.PathLike)):
        if base is None:
            raise ValueError(
                "`base` is required with an adapter file: the base model whose "
                f"kernel W the adapter updates. Received: model={model!r}, base=None"
            )
        factors = sources.factors_of((model, layer), "model")
    elif isinstance(model, keras.layers.Layer):
        factors = sources.factors_of((model, layer), "model")
        if base is None:
            base = model
    else:
        raise ValueError(
            "`model` must be an adapted Keras model or an adapter file. "
            f"Received: model={model!r}"
        )
    if isinstance(base, (str, os.PathLike)):
        base = keras.saving.load_model(base, compile=False)
    if not isinstance(base, keras.layers.Layer):
        raise ValueError(
            f"`base` must be a Keras model or a .keras file. Received: base={base!r}"
        )
    kernel = sources.kernel_matrix(sources.find_layer(base, layer))
    expected = (factors.a.shape[0], factors.b.shape[1])
    if kernel.shape != expected:
        raise ValueError(
            f"Layer '{layer}' of `base` has a kernel of {kernel.shape[0]} x "
            f"{kernel.shape[1]} features, the adapter's update {expected[0]} x "
            f"{expected[1]}: is `base` the model the adapter was trained on?"
        )
    return _measures(kernel, factors, seed)


def _measures(kernel, factors, seed):
    rank = factors.a.shape[1]
    u, s, v = update_svd(factors)
    delta_norm = float(np.sqrt(np.sum(s**2)))
    projection = _projected_norm(kernel, u, v)
    kernel_values = np.linalg.svd(kernel, compute_uv=False)
    rng = np.random.default_rng(seed)
    random_norms = [
        _projected_norm(
            kernel,
            np.linalg.qr(rng.standard_normal((kernel.shape[0], rank)))[0],
            np.linalg.qr(rng.standard_normal((kernel.shape[1], rank)))[0],
        )
        for _ in range(RANDOM_DRAWS)
    ]
    return {
        "layer": factors.path,
        "rank": rank,
        "amplification": delta_norm / projection if projection > 0 else float("inf"),
        "delta_norm": delta_norm,
        "projection_norm": projection,
        "kernel_norm": float(np.linalg.norm(kernel)),
        "kernel_top_projection_norm": float(np.sqrt(np.sum(kernel_values[:rank] ** 2))),
        "random_projection_norm": float(np.mean(random_norms)),
    }


def _projected_norm(kernel, u, v):
    """‖UᵀWV‖_F for orthonormal U `(d_in, r)`, V `(d_out, r)`."""
    return float(np.linalg.norm(u.T @ kernel @ v))
