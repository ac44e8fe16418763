"""`enable_lora(..., init=...)`: how the factors start.

- `"default"`: the paper's (and PEFT's `init_lora_weights=True`): A He-uniform
  (Kaiming), B zero; embeddings: A zero, B normal.
- `"gaussian"`: PEFT's `init_lora_weights="gaussian"`: A ~ N(0, σ = 1/r), B
  zero; embeddings keep their default (PEFT does the same).

B (or an embedding's A) starts at zero either way, so the adapted model equals
the base model exactly before the first step.

- `"pissa"` (Meng et al. 2024) and `"olora"` (Büyükakyüz 2024): the factors
  start from W itself and the frozen kernel keeps the rest, as PEFT's
  `pissa_init` / `olora_init` do. With W viewed as a (d_in, d_out) matrix
  (PEFT's torch weight is its transpose, (d_out, d_in)):

  * PiSSA: W = U·S·Vᵀ; A = U_r·sqrt(S_r/s), B = sqrt(S_r/s)·V_rᵀ, so s·A·B is
    W's rank-r principal part;
  * OLoRA: Wᵀ = Q·R; A = R_rᵀ, B = Q_rᵀ (no division by s: PEFT's formula);

  and the kernel becomes W_res = W - s·A·B: the model still computes W. The
  starting factors A0, B0 stay in the layer (frozen `lora_a_initial` /
  `lora_b_initial`, saved with the model), because the trained update
  relative to the original W is s·A·B - s·A0·B0. `save_adapter` writes that
  as a plain LoRA adapter of rank 2r, A' = [A, A0], B' = [B; -B0], with alpha
  raised so s is unchanged: the file applies to the original base (PEFT's
  `path_initial_model_for_weight_conversion`). `disable_lora` runs the layer
  with A0, B0 (the original W); `merge_lora` writes W_res + s·A·B; reverting
  without merging puts W_res + s·A0·B0 (W up to float32 rounding) back.

  Dense, EinsumDense without group axes and convolutions (the kernel viewed as
  (prod(kernel_size)·in, filters)); not embeddings (PEFT leaves them at their
  default start for these inits) nor quantized kernels (W_res cannot be
  written into int8/int4 exactly).
"""

import math

import keras
import numpy as np
from keras import ops

INITS = ("default", "gaussian", "pissa", "olora")
# Inits that move part of W into the factors (the layer's `init` argument):
# the layer keeps its starting factors, frozen, as `lora_a_initial` /
# `lora_b_initial`.
RESIDUAL_INITS = ("pissa", "olora")


def check_layer_init(init, layer=None):
    """Returns a LoRA layer's `init` (None or a residual init), else raises.

    Args:
        init: the layer's `init` argument.
        layer: the layer (an Embedding is refused before any variable is
            added; quantized kernels: `model_inits.check_residual_targets`).
    """
    if init is not None and init not in RESIDUAL_INITS:
        raise ValueError(
            f"A LoRA layer's `init` must be None or one of {list(RESIDUAL_INITS)}. "
            f"Received: init={init!r}"
        )
    if init is not None and isinstance(layer, keras.layers.Embedding):
        raise ValueError(
            f"PiSSA/OLoRA start Dense, EinsumDense and convolution layers; layer "
            f"'{layer.name}' is an {_base_name(layer)} (PEFT leaves "
            "embeddings at their default start for these inits): leave it out "
            f"of `targets` or use init='default'. Received: init={init!r}"
        )
    return init


def _base_name(layer):
    """'Embedding' for a LoRAEmbedding (its class once `adapt` started)."""
    return (getattr(type(layer), "_lora_base", None) or type(layer)).__name__


def check_float_kernel(layer, init):
    """Refuses PiSSA/OLoRA on a quantized kernel (W_res cannot be stored)."""
    mode = layer.quantization_mode
    if mode is not None:
        raise ValueError(
            f"PiSSA/OLoRA write W - s·A·B into the kernel of layer "
            f"'{layer.name}', which is quantized ({mode}): the residual cannot "
            "be stored exactly. Start the factors on the float model and "
            f"quantize after `enable_lora`. Received: init={init!r}, "
            f"quantization_mode={mode!r}"
        )


def _matrix_axes(layer):
    """(kernel letters, A's input letters, B's output letters) of the layer's
    merge equation `"A,B->kernel"`; refuses group axes."""
    factors, kernel = layer.lora_merge_equation.split("->")
    a_axes, b_axes = factors.split(",")
    groups = [c for c in a_axes[:-1] if c in b_axes]
    if groups:
        raise ValueError(
            f"PiSSA/OLoRA need one matrix per kernel; layer '{layer.name}' has "
            "group axes (a separate update per group) in its equation. Leave "
            "it out of `targets` or use init='default'. Received: "
            f"equation={getattr(layer, 'equation', None)!r}, init={layer.lora_init!r}"
        )
    return kernel, a_axes[:-1], b_axes[1:]


def _as_matrix(layer, kernel):
    """The kernel (numpy, kernel layout) as the (d_in, d_out) matrix that A
    (d_in, r) and B (r, d_out) factor."""
    letters, inputs, outputs = _matrix_axes(layer)
    _, _, d_in, d_out = layer.lora_layout()
    return np.einsum(f"{letters}->{inputs}{outputs}", kernel).reshape(d_in, d_out)


def pissa_factors(matrix, rank, scale):
    """PEFT's `pissa_init` on a (d_in, d_out) matrix: (A, B) with s·A·B = the
    rank-r principal part (float64)."""
    u, singular, vh = np.linalg.svd(matrix, full_matrices=False)
    root = np.sqrt(singular[:rank] / scale)
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def olora_factors(matrix, rank):
    """PEFT's `olora_init` on a (d_in, d_out) matrix: QR of the torch-layout
    weight Wᵀ = Q·R, A = R_rᵀ, B = Q_rᵀ (float64)."""
    q, r = np.linalg.qr(matrix.T)
    return r[:rank].T, q[:, :rank].T


def initialize_layer(layer):
    """Moves W's principal part into the factors (`layer.lora_init`).

    Sets A and B (and their frozen copies `lora_a_initial`/`lora_b_initial`)
    to PEFT's PiSSA or OLoRA factors of the kernel W, and the kernel to
    W - s·A·B, so the layer computes what it computed before.

    Args:
        layer: a LoRA layer built with `init="pissa"` or `"olora"`.

    Example:

    >>> layer = keras_lora.LoRADense(8, rank=2, init="pissa")
    >>> layer.build((None, 16))  # the kernel now holds W - s·A·B
    """
    _matrix_axes(layer)  # refuses group axes
    if layer.quantization_mode is not None:
        # Only a model being reloaded (quantized after `enable_lora`) gets
        # here (`check_residual_targets`): its values come from the file.
        return
    kernel = layer.lora_base_kernel
    weight = np.asarray(ops.convert_to_numpy(ops.cast(kernel, "float32")), "float64")
    matrix = _as_matrix(layer, weight)
    if layer.lora_init == "pissa":
        a, b = pissa_factors(matrix, layer.rank, layer.lora_scale)
    else:
        a, b = olora_factors(matrix, layer.rank)
    a = a.reshape(layer.lora_a.shape).astype("float32")
    b = b.reshape(layer.lora_b.shape).astype("float32")
    for variable, value in (
        (layer.lora_a, a),
        (layer.lora_b, b),
        (layer.lora_a_initial, a),
        (layer.lora_b_initial, b),
    ):
        variable.assign(value)
    # The residual from the float32 factors the layer will use, in float64:
    # W_res + s·A·B then rounds to W in float32.
    kernel.assign(
        (weight - _update(layer, a, b)).astype(
            keras.backend.standardize_dtype(kernel.dtype)
        )
    )


def _update(layer, a, b):
    """s·A·B laid out like the kernel, float64 numpy."""
    return layer.lora_scale * np.einsum(
        layer.lora_merge_equation, np.asarray(a, "float64"), np.asarray(b, "float64")
    )


def _numpy(variable):
    return np.asarray(ops.convert_to_numpy(variable))


def original_kernel(layer):
    """W = W_res + s·A0·B0, the kernel before PiSSA/OLoRA (float32 rounding),
    in the kernel's dtype: what reverting without merging puts back."""
    kernel = layer.lora_float_kernel()  # dequantized if quantized since
    weight = np.asarray(ops.convert_to_numpy(ops.cast(kernel, "float32")), "float64")
    original = weight + _update(
        layer, _numpy(layer.lora_a_initial), _numpy(layer.lora_b_initial)
    )
    return original.astype(keras.backend.standardize_dtype(kernel.dtype))


def original_base_swaps(layer):
    """[(variable, value)] under which the layer computes its original W:
    the starting factors in place of A, B (and DoRA's magnitude = ‖W‖)."""
    swaps = [
        (layer.lora_a, _numpy(layer.lora_a_initial)),
        (layer.lora_b, _numpy(layer.lora_b_initial)),
    ]
    if layer.use_dora:
        weight = original_kernel(layer).astype("float64")
        axes = tuple(layer.lora_kernel_input_axes())
        norm = np.sqrt(np.sum(np.square(weight), axis=axes)).astype("float32")
        swaps.append((layer.lora_magnitude, norm))
    return swaps


def original_base_factors(layer):
    """(A', B') of rank 2r with s·A'·B' = s·A·B - s·A0·B0: the trained update
    relative to the original W (PEFT's `subtract_mutated_init`)."""
    a = np.concatenate([_numpy(layer.lora_a), _numpy(layer.lora_a_initial)], -1)
    b = np.concatenate([_numpy(layer.lora_b), -_numpy(layer.lora_b_initial)], 0)
    return a, b


def original_base_settings(config):
    """A spec layer entry for the rank-2r adapter: alpha raised so that the
    scale s stays (alpha/r, or alpha/sqrt(r) with rsLoRA), no `init`."""
    rank, alpha = config["rank"], config["alpha"]
    if config["use_rslora"]:
        alpha = (rank if alpha is None else alpha) * math.sqrt(2)
    elif alpha is not None:
        alpha = 2 * alpha  # None means alpha = rank: s = 1 at any rank
    settings = {key: value for key, value in config.items() if key != "init"}
    return {**settings, "rank": 2 * rank, "alpha": alpha}
