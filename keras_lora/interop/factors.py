"""PEFT factors <-> keras-lora factors, for one Keras layer.

PEFT stores `lora_A` as `(r, in_features)` and `lora_B` as `(out_features, r)`
(embeddings: `lora_embedding_A` `(r, num_embeddings)`, `lora_embedding_B`
`(embedding_dim, r)`), with ΔW = s·B·A. keras-lora stores A as
`(input axes..., r)` and B as `(r, output axes...)`, axes in kernel order, with
ΔW = s·A·B. KerasHub's converters flatten the kernel's input axes and output
axes in kernel order (C order) onto `in_features` / `out_features`, so:

    A_keras = reshape(A_peft.T, input_shape + (r,))
    B_keras = reshape(B_peft.T, (r,) + output_shape)

Convolutions (`nn.Conv1d/2d/3d`): PEFT's `lora_A` is a convolution with the
base's kernel size, strides, padding and dilation and `r` output channels,
weight `(r, in_channels, *kernel_size)`, and `lora_B` a 1×1 convolution,
weight `(filters, r, 1, ...)`. keras-lora's conv layers store A as
`(*kernel_size, in_channels, r)` and B as `(r, filters)` (the kernel's
`(*kernel_size, in, out)` layout, as KerasHub's converters port conv kernels).

DoRA's magnitude (PEFT's `lora_magnitude_vector`) has one entry per output
unit: `(out_features,)` for a linear module, `(1, filters, 1, ...)` for a
convolution; keras-lora's is the kernel's shape without its input axes.
"""

import math

import keras
import numpy as np

from keras_lora.layers import quantized
from keras_lora.layers.einsum_dense import split_einsum_equation

_CONV_TYPES = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


def layout(layer):
    """Returns `(input_shape, output_shape, kind)` of a layer's LoRA update.

    Works on the plain Keras layer (before `enable_lora`) and on its LoRA
    form. `kind` is `"linear"`, `"conv"` or `"embedding"`.

    Raises:
        ValueError: for a layer type LoRA cannot adapt, or an EinsumDense
            kernel with group axes (PEFT has no such update).
    """
    if isinstance(layer, keras.layers.Embedding):
        vocabulary, dim = layer.embeddings.shape
        return (vocabulary,), (dim,), "embedding"
    if isinstance(layer, _CONV_TYPES):
        if max(layer.dilation_rate) > 1:
            # PEFT builds `lora_A` without the base's dilation: its output
            # would not even have the base's shape.
            raise ValueError(
                f"Layer '{layer.path}' is a dilated convolution, which PEFT's "
                "conv LoRA (peft 0.21) cannot adapt. Received: "
                f"dilation_rate={layer.dilation_rate}"
            )
        *spatial_and_in, filters = layer.kernel.shape
        return tuple(spatial_and_in), (filters,), "conv"
    if isinstance(layer, keras.layers.Dense):
        d_in, d_out = layer.kernel.shape
        return (d_in,), (d_out,), "linear"
    if isinstance(layer, keras.layers.EinsumDense):
        split = split_einsum_equation(layer.equation)
        if split["group_axes"]:
            raise ValueError(
                f"Layer '{layer.path}' has an EinsumDense kernel with group axes "
                f"{split['group_axes']}, which a PEFT LoRA module cannot hold. "
                f"Received: equation={layer.equation!r}"
            )
        size = dict(zip(split["kernel"], layer.kernel.shape))
        return (
            tuple(size[c] for c in split["input_axes"]),
            tuple(size[c] for c in split["output_axes"]),
            "linear",
        )
    raise ValueError(
        f"Layer '{layer.path}' of type {type(layer).__name__} has no PEFT LoRA "
        "equivalent: only Dense, EinsumDense, Conv1D/2D/3D and Embedding "
        "layers map."
    )


def peft_shapes(layout_, rank, d_out):
    """The shapes of PEFT's `(lora_A, lora_B, lora_magnitude_vector)` for a
    module whose first Keras layer has `layout_` and whose outputs number
    `d_out` (all its layers together)."""
    input_shape, _, kind = layout_
    if kind == "conv":
        spatial, channels = tuple(input_shape[:-1]), input_shape[-1]
        ones = (1,) * len(spatial)
        return (rank, channels, *spatial), (d_out, rank, *ones), (1, d_out, *ones)
    return (rank, math.prod(input_shape)), (d_out, rank), (d_out,)


def to_keras(a_peft, b_rows, input_shape, output_shape):
    """PEFT `A` and the rows of `B` -> keras-lora A, B.

    Linear: `A (r, d_in)`, `B (d_out, r)`; conv: `A (r, in, *kernel_size)`,
    `B (filters, r, 1, ...)` (a conv layer's `input_shape` is
    `(*kernel_size, in)`).
    """
    rank = a_peft.shape[0]
    if a_peft.ndim > 2:  # conv: (r, in, *k) -> (*k, in, r)
        a_peft = np.transpose(a_peft, (*range(2, a_peft.ndim), 1, 0))
        a = np.reshape(a_peft, tuple(input_shape) + (rank,))
        b_rows = np.reshape(b_rows, b_rows.shape[:2])
    else:
        a = np.reshape(np.transpose(a_peft), tuple(input_shape) + (rank,))
    b = np.reshape(np.transpose(b_rows), (rank,) + tuple(output_shape))
    return a.astype("float32"), b.astype("float32")


def to_peft(a, b, kind="linear"):
    """keras-lora `A (input axes..., r)`, `B (r, output axes...)` -> PEFT A, B
    (`kind` from `layout`: a conv's are PEFT's conv weights)."""
    rank = a.shape[-1]
    if kind == "conv":  # A (*k, in, r) -> (r, in, *k); B (r, f) -> (f, r, 1...)
        spatial = a.ndim - 2
        a_peft = np.transpose(a, (a.ndim - 1, a.ndim - 2, *range(spatial)))
        b_peft = np.reshape(np.transpose(b), b.shape[::-1] + (1,) * spatial)
        return np.ascontiguousarray(a_peft), np.ascontiguousarray(b_peft)
    a_peft = np.transpose(np.reshape(a, (math.prod(a.shape[:-1]), rank)))
    b_peft = np.transpose(np.reshape(b, (rank, math.prod(b.shape[1:]))))
    return np.ascontiguousarray(a_peft), np.ascontiguousarray(b_peft)


def row_norms(layer):
    """‖W‖ of each output unit (flattened, float32) of a plain Dense,
    EinsumDense or conv layer (dequantized, if int8/int4): the DoRA
    magnitude of a zero update."""
    kernel = keras.ops.convert_to_numpy(quantized.dequantized_kernel(layer))
    if layout(layer)[2] == "conv":
        return np.sqrt(np.sum(np.square(kernel), axis=tuple(range(kernel.ndim - 1))))
    return np.sqrt(np.sum(np.square(kernel_to_weight(layer, kernel)), axis=1))


def _kernel_axes(layer):
    """(kernel letters, input letters, output letters) of a Dense/EinsumDense."""
    if isinstance(layer, keras.layers.EinsumDense):
        split = split_einsum_equation(layer.equation)
        return split["kernel"], split["input_axes"], split["output_axes"]
    return "io", ["i"], ["o"]


def weight_to_kernel(layer, weight):
    """A transformers `Linear` weight `(out_features, in_features)` -> kernel.

    The same rule as the factors: the kernel's output axes and input axes,
    each flattened in kernel order, are `out_features` and `in_features`.
    A conv weight `(filters, in, *kernel_size)` -> `(*kernel_size, in,
    filters)`.
    """
    input_shape, output_shape, kind = layout(layer)
    if kind == "conv":
        return np.transpose(weight, (*range(2, weight.ndim), 1, 0))
    kernel, inputs, outputs = _kernel_axes(layer)
    full = np.reshape(weight, tuple(output_shape) + tuple(input_shape))
    order = [(list(outputs) + list(inputs)).index(c) for c in kernel]
    return np.transpose(full, order)


def kernel_to_weight(layer, kernel_value):
    """The inverse of `weight_to_kernel`."""
    input_shape, output_shape, kind = layout(layer)
    if kind == "conv":
        k = kernel_value.ndim - 2
        return np.transpose(kernel_value, (k + 1, k, *range(k)))
    kernel, inputs, outputs = _kernel_axes(layer)
    order = [kernel.index(c) for c in list(outputs) + list(inputs)]
    full = np.transpose(kernel_value, order)
    return np.reshape(full, (math.prod(output_shape), math.prod(input_shape)))
