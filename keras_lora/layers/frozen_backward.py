"""The backward pass of frozen float `EinsumDense` layers, made in it.

The input gradient of `einsum(x, W)` contracts the upstream gradient with
W's output axes. For an `EinsumDense` kernel with several axes (KerasHub's
attention: `(hidden, heads, head_dim)`), XLA's dot then reads W through a
transposed copy, and that copy depends on a parameter only: XLA makes every
layer's at the start of the step and keeps them all until the backward pass
reaches the layer (issue 25: the four attention kernels of each block were
96 MB of a 918 MB GPT-2 LoRA step at 6 x 1024). A frozen layer's einsum here
gets its input gradient from W tied to the upstream gradient (`after`), so
the copy is made in the layer's own backward pass and freed after it.

`Dense` needs no copy (a matmul reads W transposed as it is) and is left to
Keras; so is eager PyTorch, where nothing is scheduled ahead (its LoRA hot
path stays as tuned in `low_rank.py`). The quantized layers' lean backward
(`quantized_backward.py`) builds on the same two helpers.
"""

import types

import keras
from keras import ops

# Tying values to a tensor steers XLA's schedule (JAX, and TensorFlow, whose
# `fit` compiles with XLA by default). PyTorch runs eagerly: nothing to steer.
SCHEDULED = keras.backend.backend() != "torch"


def after(tensor, upstream):
    """`tensor`, made to depend on `upstream` (values unchanged).

    A frozen kernel (or its dequantization) depends on variables only, so XLA
    may schedule what is made from it anywhere, e.g. at the start of the
    step, and keep every layer's until its use. Adding a zero taken from
    `upstream` (the layer's input, or its upstream gradient) ties it to the
    layer's own forward or backward pass. XLA folds an integer `x * 0`, so
    the zero is a float one (XLA does not fold it: NaN for an infinite x),
    cast; a non-finite first value counts as 0, so the zero is always 0.
    """
    first = ops.cast(ops.stop_gradient(ops.reshape(upstream, (-1,))[:1]), "float32")
    first = ops.where(ops.isfinite(first), first, 0.0)
    zero = ops.multiply(first, 0.0)
    return ops.add(tensor, ops.cast(zero, tensor.dtype))


def input_gradient_equation(equation):
    """The einsum of an `EinsumDense`'s input gradient: `"out,kernel->in"`.

    Returns None where one einsum cannot make it: an input axis (or `...`)
    that neither the kernel nor the output has is summed away, and its
    gradient is a broadcast, not an einsum.
    """
    inputs, output = equation.split("->")
    input_spec, kernel_spec = inputs.split(",")
    if "..." in input_spec and "..." not in output:
        return None
    kept = set(output.replace("...", "") + kernel_spec)
    if any(c not in kept for c in input_spec.replace("...", "")):
        return None
    return f"{output},{kernel_spec}->{input_spec}"


def frozen_einsum(equation, inputs, kernel):
    """`einsum(equation, inputs, kernel)` for a frozen `kernel` (no gradient).

    The input gradient is made in the backward pass, from `kernel` tied to
    the upstream gradient (see the module docstring).

    Args:
        equation: an `EinsumDense` equation that `input_gradient_equation`
            accepts.
        inputs: the layer's inputs.
        kernel: a tensor (the kernel in the compute dtype).
    """
    backward = input_gradient_equation(equation)

    @ops.custom_gradient
    def einsum(x):
        def grad_fn(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            return (ops.einsum(backward, upstream, after(kernel, upstream)),)

        return ops.einsum(equation, x, kernel), grad_fn

    return einsum(inputs)


def is_lean(layer):
    """True where a float `EinsumDense`'s call uses `frozen_einsum`."""
    return (
        SCHEDULED
        and isinstance(layer, keras.layers.EinsumDense)
        and layer.quantization_mode is None
        and not layer.lora_enabled  # Keras's own LoRA trains through W
        and not (layer.trainable and layer._kernel.trainable)
        and input_gradient_equation(layer.equation) is not None
    )


def lean_call(keras_call):
    """The float `call` of a frozen `EinsumDense`, its backward made in it.

    Args:
        keras_call: `(layer, inputs, training=None) -> outputs`, the unbound
            `call` of the layer's Keras class.

    Returns:
        A function like `keras_call`, which computes Keras's outputs with
        `frozen_einsum` where `is_lean(layer)` in training (`training=True`,
        as `fit` and a stateless training step pass it) and is `keras_call`
        elsewhere; `keras_call` itself on eager PyTorch.
    """
    if not SCHEDULED:
        return keras_call

    def call(layer, inputs, training=None):
        # Only in training: an inference or exported graph needs no backward
        # pass, and a custom gradient that closes over the kernel cannot be
        # exported (a SavedModel traces the gradients of custom gradients,
        # which jax2tf then fails to convert).
        if training is not True or not is_lean(layer):
            return keras_call(layer, inputs, training=training)
        # `EinsumDense.call`, with the einsum's input gradient made in
        # backward; the bias keeps its own gradient (it may train).
        # A tensor read here, autocast as Keras's call reads it (inside the
        # custom gradient TensorFlow would watch a variable read).
        kernel = ops.stop_gradient(layer.kernel)
        outputs = frozen_einsum(layer.equation, inputs, kernel)
        if layer.bias is not None:
            outputs = ops.add(outputs, layer.bias)
        activation = layer.activation
        return outputs if activation is None else activation(outputs)

    return call


def lean_frozen_einsums(model):
    """Installs `lean_call` as the `call` of each plain `EinsumDense`.

    Called by `enable_lora` (through `quantized_backward.prepare_model`): the
    frozen layers around the adapted ones (KerasHub's key and output
    projections) hold half of the attention kernels. The LoRA layers use
    `lean_call` in their own `call`. A layer that trains (or is adapted
    since) runs Keras's own call; outputs are unchanged either way.
    """
    if not SCHEDULED:
        return
    for layer in model._flatten_layers(include_self=False):
        if type(layer) is keras.layers.EinsumDense and "call" not in layer.__dict__:
            # A bound method: `copy.deepcopy` of the layer binds it to the copy.
            layer.__dict__["call"] = types.MethodType(_plain_lean_call, layer)


_LEAN_EINSUM = lean_call(keras.layers.EinsumDense.call)


def _plain_lean_call(layer, inputs, training=None):
    if type(layer) is not keras.layers.EinsumDense:  # a LoRA layer since
        return type(layer).call(layer, inputs, training=training)
    return _LEAN_EINSUM(layer, inputs, training=training)
