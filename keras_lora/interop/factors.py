"""PEFT factors <-> keras-lora factors, for one Keras layer.

PEFT stores `lora_A` as `(r, in_features)` and `lora_B` as `(out_features, r)`
(embeddings: `lora_embedding_A` `(r, num_embeddings)`, `lora_embedding_B`
`(embedding_dim, r)`), with ΔW = s·B·A. keras-lora stores A as
`(input axes..., r)` and B as `(r, output axes...)`, axes in kernel order, with
ΔW = s·A·B. KerasHub's converters flatten the kernel's input axes and output
axes in kernel order (C order) onto `in_features` / `out_features`, so:

    A_keras = reshape(A_peft.T, input_shape + (r,))
    B_keras = reshape(B_peft.T, (r,) + output_shape)
"""

import math

import keras
import numpy as np

from keras_lora.layers.einsum_dense import split_einsum_equation


def layout(layer):
    """Returns `(input_shape, output_shape, kind)` of a layer's LoRA update.

    Works on the plain Keras layer (before `enable_lora`) and on its LoRA
    form. `kind` is `"linear"` or `"embedding"`.

    Raises:
        ValueError: for a layer type LoRA cannot adapt, or an EinsumDense
            kernel with group axes (PEFT has no such update).
    """
    if isinstance(layer, keras.layers.Embedding):
        vocabulary, dim = layer.embeddings.shape
        return (vocabulary,), (dim,), "embedding"
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
        "equivalent: only Dense, EinsumDense and Embedding layers map."
    )


def to_keras(a_peft, b_rows, input_shape, output_shape):
    """PEFT `A (r, d_in)` and the rows of `B (d_out, r)` -> keras-lora A, B."""
    rank = a_peft.shape[0]
    a = np.reshape(np.transpose(a_peft), tuple(input_shape) + (rank,))
    b = np.reshape(np.transpose(b_rows), (rank,) + tuple(output_shape))
    return a.astype("float32"), b.astype("float32")


def to_peft(a, b):
    """keras-lora `A (input axes..., r)`, `B (r, output axes...)` -> PEFT A, B."""
    rank = a.shape[-1]
    a_peft = np.transpose(np.reshape(a, (math.prod(a.shape[:-1]), rank)))
    b_peft = np.transpose(np.reshape(b, (rank, math.prod(b.shape[1:]))))
    return np.ascontiguousarray(a_peft), np.ascontiguousarray(b_peft)


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
    """
    input_shape, output_shape, _ = layout(layer)
    kernel, inputs, outputs = _kernel_axes(layer)
    full = np.reshape(weight, tuple(output_shape) + tuple(input_shape))
    order = [(list(outputs) + list(inputs)).index(c) for c in kernel]
    return np.transpose(full, order)


def kernel_to_weight(layer, kernel_value):
    """The inverse of `weight_to_kernel`."""
    input_shape, output_shape, _ = layout(layer)
    kernel, inputs, outputs = _kernel_axes(layer)
    order = [kernel.index(c) for c in list(outputs) + list(inputs)]
    full = np.transpose(kernel_value, order)
    return np.reshape(full, (math.prod(output_shape), math.prod(input_shape)))
