"""DoRA (Liu et al. 2024): weight-decomposed low-rank adaptation, for any layer.

DoRA writes the adapted weight as a magnitude times a direction,

    W' = m · (W + s·ΔW) / ‖W + s·ΔW‖,

with one trainable magnitude per output unit (the norm runs over the kernel's
input axes) and ΔW = A·B the usual low-rank update. `m` starts at ‖W‖, so a
fresh layer computes exactly its base. As PEFT does (and the paper recommends
to save memory, section 4.3), the norm is a constant in the backward pass, and
the forward pass never builds W' for the inputs:

    y = x·W + b + (m/‖·‖ - 1)·(x·W) + (m/‖·‖)·s·(x·A)·B,

where `x·W` is the base layer's own output less its bias (with LoRA dropout in
training, the base runs again on the dropped input, as in PEFT). The norm itself
needs the kernel-shaped ΔW once per step, like PEFT's.

The layer types differ only in which kernel axes meet the input
(`_lora_kernel_input_axes`) and how a per-output vector broadcasts against the
outputs (`_lora_output_view`); everything else is here, once.
"""

import keras
from keras import ops

from keras_lora import keras_private
from keras_lora.layers import lora_math, quantized
from keras_lora.layers.variant import LoRAVariant


def check_use_dora(use_dora, layer=None):
    """Returns `use_dora` if it is a bool (that `layer`'s type supports)."""
    if not isinstance(use_dora, bool):
        raise ValueError(f"`use_dora` must be a bool. Received: use_dora={use_dora!r}")
    if use_dora and isinstance(layer, keras.layers.Embedding):
        raise ValueError(
            f"DoRA adapts Dense, EinsumDense and convolution layers; layer "
            f"'{layer.name}' is an {type(layer).__name__}: leave it out of "
            f"`targets` or use `use_dora=False`. Received: use_dora={use_dora}"
        )
    return use_dora


def magnitude_shape(layer):
    """The kernel's shape without its input axes: one entry per output unit."""
    shape = quantized.kernel_shape(layer)
    drop = set(layer._lora_kernel_input_axes())
    return tuple(size for axis, size in enumerate(shape) if axis not in drop)


def column_norm(layer, weight, keepdims=False):
    """‖weight‖ over the kernel's input axes: one value per output unit."""
    axes = tuple(layer._lora_kernel_input_axes())
    return ops.sqrt(ops.sum(ops.square(weight), axis=axes, keepdims=keepdims))


def adapted_weight(layer, kernel=None):
    """W + s·A·B in float32 (`kernel`: W, default the layer's float kernel).

    Read from the variables as stored (float32), also inside a `call` under a
    mixed-precision policy, where Keras would read them as bf16.
    """
    with keras_private.AutocastScope(None):
        if kernel is None:
            kernel = layer._lora_float_kernel()
        return lora_math.layer_merged_kernel(layer, kernel, "float32")


def weight_norm(layer):
    """‖W + s·ΔW‖ over the kernel's input axes, float32, magnitude-shaped."""
    return column_norm(layer, adapted_weight(layer))


def base_norm(layer):
    """‖W‖ over the kernel's input axes (numpy float32): m of a zero update."""
    kernel = ops.cast(layer._lora_float_kernel(), "float32")
    return ops.convert_to_numpy(column_norm(layer, kernel))


def reset_magnitude(layer):
    """Sets m = ‖W + s·ΔW‖, so that the layer computes W + s·ΔW exactly."""
    layer.lora_magnitude.assign(weight_norm(layer))


def outputs(layer, base_call, base_outputs, inputs, training):
    """The DoRA layer's output (before the activation).

    Args:
        layer: a LoRA layer with `use_dora=True`.
        base_call: the base class's `call` (or `quantized_call`).
        base_outputs: its output on `inputs`, before the activation.
        inputs, training: as the layer received them.
    """
    x = layer._lora_input(inputs, training)
    lora = layer._lora_delta(x, False)  # dropout already applied to x
    # The norm is a constant in backward (PEFT's `weight_norm.detach()`).
    norm = ops.stop_gradient(weight_norm(layer))
    with keras_private.AutocastScope(None):  # m in float32, as stored
        scale = ops.divide(layer.lora_magnitude, norm)
    scale = ops.cast(layer._lora_output_view(scale), base_outputs.dtype)
    plain = (
        base_outputs
        if x is inputs
        else layer._lora_base_outputs(base_call, x, training)
    )
    bias = layer._lora_output_bias()
    if bias is not None:
        plain = ops.subtract(plain, ops.cast(bias, plain.dtype))
    update = ops.add(
        ops.multiply(ops.subtract(scale, 1), plain), ops.multiply(scale, lora)
    )
    return ops.add(base_outputs, update)


def merged_kernel(layer, kernel, dtype):
    """m · (W + s·ΔW) / ‖W + s·ΔW‖ in float32, cast to `dtype`."""
    merged = adapted_weight(layer, kernel)
    norm = column_norm(layer, merged, keepdims=True)
    magnitude = ops.reshape(layer.lora_magnitude, norm.shape)
    return ops.cast(ops.multiply(merged, ops.divide(magnitude, norm)), dtype)


class DoRA(LoRAVariant):
    """DoRA as a variant: a magnitude per output unit, the update above."""

    additive = False
    shares_layer = False

    def check(self, layer):
        check_use_dora(True, layer)

    def build(self, layer):
        with layer._lora_unlocked():
            layer.lora_magnitude = layer._lora_add_float32(
                "lora_magnitude", magnitude_shape(layer), "zeros"
            )
        reset_magnitude(layer)

    def state_variables(self, layer):
        return {"lora_magnitude": layer.lora_magnitude}

    def trained_variables(self, layer):
        return [layer.lora_magnitude]

    def adapter_file_variables(self, layer):
        return self.state_variables(layer)

    def base_swaps(self, layer):
        # With B = 0 the layer computes m·W/‖W‖, which is W when m = ‖W‖.
        zero_b = super().base_swaps(layer)
        return [*zero_b, (layer.lora_magnitude, base_norm(layer))]

    def outputs(self, layer, base_call, base_outputs, inputs, training):
        return outputs(layer, base_call, base_outputs, inputs, training)

    def merged_kernel(self, layer, kernel, dtype):
        return merged_kernel(layer, kernel, dtype or kernel.dtype)
