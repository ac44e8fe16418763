"""The backward pass of frozen quantized layers: nothing kernel-sized kept.

Keras's int8/int4 `Dense`/`EinsumDense` compute their input gradient through
the dequantized kernel, from values their forward pass made (int4: the
unpacked kernel) and from variables only, so XLA may compute every layer's
float kernel at the start of the step and keep them all alive until their
use (issue 25: an int4 LoRA step then took more memory than a float one).
Here a frozen quantized layer keeps Keras's forward values, and its input
gradient is made from the packed kernel and scales inside the layer's own
backward pass (`lean_call`, `tied_to`); the tied `ReversibleEmbedding` logits
get theirs the same way, the table dequantized a part at a time
(`reverse_input_gradient`). `prepare_model` installs both on a model, and the
lean backward of frozen float einsums (`frozen_backward.py`).
"""

import contextlib
import threading

import keras
from keras import ops

from keras_lora.layers.frozen_backward import (
    SCHEDULED,
    after,
    input_gradient_equation,
    lean_frozen_einsums,
)
from keras_lora.layers.quantized import (
    dequantized_kernel,
    kernel_variable,
    save_with_own_policy,
)

# The helpers below hide a layer's attributes from Keras's quantized call by
# swapping them in the instance `__dict__` (Keras reads `self._kernel`,
# `self.bias`, ...; a plain Keras layer has no per-thread view of them). The
# swaps are held under one lock, so threads calling a model never see each
# other's (issue 21: a call must not change what another thread computes).
_SWAP_LOCK = threading.RLock()


def prepare_model(model):
    """What `enable_lora` (and a reload) does for frozen bases: see below."""
    give_tied_logits_a_gradient(model)
    lean_frozen_layers(model)
    lean_frozen_einsums(model)  # float bases (frozen_backward.py)
    save_with_own_policy(model)


@contextlib.contextmanager
def tied_to(layer, tensor, rows=None):
    """Within: the layer's quantized variables read as copies tied to `tensor`.

    Keras's quantized calls and `dequantized_kernel` read the attributes
    (`_kernel`, `kernel_scale`, ...); each is swapped for `after(value,
    tensor)` and put back on exit, so every kernel-sized value made from
    them (unpacked, dequantized, a scale gathered per element) is made where
    `tensor` exists, not at the start of the step.

    Args:
        layer: a quantized layer.
        tensor: what the values wait for.
        rows: for an embedding table, `(start, stop)`: its rows (and their
            scales) in that range only, to dequantize the table in parts.
    """
    if not SCHEDULED and rows is None:
        yield  # eager PyTorch: see `SCHEDULED`
        return
    stem = kernel_variable(layer).name
    names = ("_embeddings" if stem == "embeddings" else "_kernel",)
    names += (f"{stem}_scale", f"{stem}_zero", "g_idx")
    with _SWAP_LOCK:
        saved = {
            n: layer.__dict__[n] for n in names if layer.__dict__.get(n) is not None
        }
        try:
            for name, variable in saved.items():
                value = ops.convert_to_tensor(variable)
                if rows is not None and name != "g_idx":  # g_idx: per column
                    value = value[rows[0] : rows[1]]
                layer.__dict__[name] = after(value, tensor)
            yield
        finally:
            layer.__dict__.update(saved)


def in_parts(layer, tensor, part, rows_per_part=4096):
    """`part()` on each part of an embedding table's rows, one after another.

    `part` runs inside `tied_to(layer, ..., rows)`; each part waits for the
    previous part's result, so at most one part of the float (or unpacked)
    table exists at a time. Returns the list of results.
    """
    if not SCHEDULED:  # eager PyTorch: one part, the table as it is
        return [part((0, layer.input_dim))]
    results = []
    for start in range(0, layer.input_dim, rows_per_part):
        rows = (start, min(start + rows_per_part, layer.input_dim))
        with tied_to(layer, results[-1] if results else tensor, rows):
            results.append(part(rows))
    return results


def table_input_gradient(layer, upstream):
    """`upstream @ dequant(table)`, the table dequantized in parts."""

    def part(rows):
        table = ops.cast(dequantized_kernel(layer), upstream.dtype)
        return ops.matmul(upstream[..., rows[0] : rows[1]], table)

    parts = in_parts(layer, upstream, part)
    gradient = parts[0]
    for other in parts[1:]:
        gradient = ops.add(gradient, other)
    return gradient


def input_gradient(layer, upstream):
    """The input gradient of a frozen Dense/EinsumDense's linear map.

    Computed from the packed kernel and its scales, dequantized here, in the
    backward pass (the float kernel lives only inside this function).
    """
    with tied_to(layer, upstream):
        kernel = ops.cast(dequantized_kernel(layer), upstream.dtype)
    if isinstance(layer, keras.layers.EinsumDense):
        equation = input_gradient_equation(layer.equation)
        return ops.einsum(equation, upstream, kernel)
    return ops.matmul(upstream, ops.transpose(kernel))


def lean_call(keras_call, layer):
    """Keras's quantized call of a frozen Dense/EinsumDense, lean in backward.

    The forward values are Keras's own (`keras_call`, e.g. the int8 matmul of
    the quantized input); the bias and activation are applied after it, as
    Keras applies them. Keras's own input gradient keeps what its forward
    made for the backward pass (int4: the unpacked kernel) and lets XLA
    compute every layer's float kernel early, at the start of the step; here
    the input gradient is computed from the packed kernel and scales in the
    layer's own backward pass (`input_gradient`): nothing kernel-sized is
    kept between the forward and the backward pass.

    Args:
        keras_call: `(layer, inputs, training=None) -> outputs`, the unbound
            `quantized_call` of the layer's Keras class.
        layer: the layer it will run on.

    Returns:
        A function like `keras_call`; `keras_call` itself for a layer other
        than `Dense`/`EinsumDense` (an embedding's input has no gradient).
    """
    if not isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
        return keras_call

    def call(layer, inputs, training=None):
        with _SWAP_LOCK:
            return _lean_linear(layer, inputs, training)

    def _lean_linear(layer, inputs, training):
        # Inside a LoRA layer's base call its `activation` property already
        # reads None (`base_call.py`): only a plain layer's is hidden here.
        bias, activation = layer.bias, layer.activation
        hidden = {"bias": None, **({"activation": None} if activation else {})}
        saved = {name: layer.__dict__[name] for name in hidden}
        # Keras adds these inside its quantized call; the custom gradient
        # below is the input's only, so a trainable bias must stay outside.
        layer.__dict__.update(hidden)
        try:

            @ops.custom_gradient
            def linear(x):
                def grad_fn(*args, upstream=None):
                    if upstream is None:
                        (upstream,) = args
                    return (input_gradient(layer, upstream),)

                with tied_to(layer, x):
                    outputs = keras_call(layer, x, training=training)
                return outputs, grad_fn

            outputs = linear(inputs)
        finally:
            layer.__dict__.update(saved)
        if bias is not None:
            outputs = ops.add(outputs, bias)
        return outputs if activation is None else activation(outputs)

    return call


def reverse_input_gradient(layer, base_call, soft_cap=None):
    """Wraps a tied quantized reverse (logits) call with an input gradient.

    Keras's int8/int4 `ReversibleEmbedding` quantizes its input on the logits
    path (`inputs_quantizer`), and an integer matmul has no gradient: every
    layer before the logits gets none, so LoRA below it cannot learn (Keras's
    own LoRA stays at its first loss). This keeps Keras's forward values and
    gives the input the gradient through the dequantized table, as Keras's
    quantized `Dense` does (a straight-through estimate of the activation
    quantizer). The float table exists only inside the backward pass, made
    there from the packed table (`dequantized_kernel_after`).

    Args:
        layer: a `ReversibleEmbedding` with `tie_weights=True`.
        base_call: `x -> logits`, Keras's quantized reverse call.
        soft_cap: the `logit_soft_cap` that `base_call` applies, if any.
    """

    def call(inputs):
        @ops.custom_gradient
        def logits_with_input_gradient(x):
            # Keras's values, a part of the vocabulary at a time: its int4
            # call dequantizes the whole table at once otherwise.
            parts = in_parts(layer, x, lambda rows: base_call(x))
            logits = ops.concatenate(parts, axis=-1) if parts[1:] else parts[0]

            def grad_fn(*args, upstream=None):
                if upstream is None:
                    (upstream,) = args
                if soft_cap is not None:
                    # d(cap·tanh(z/cap))/dz = 1 - tanh(z/cap)².
                    capped = ops.divide(logits, soft_cap)
                    upstream = ops.multiply(
                        upstream, ops.subtract(1.0, ops.square(capped))
                    )
                return (table_input_gradient(layer, upstream),)

            return logits, grad_fn

        return logits_with_input_gradient(inputs)

    return call


def give_tied_logits_a_gradient(model):
    """Installs `reverse_input_gradient` on each plain tied `ReversibleEmbedding`.

    Called by `enable_lora` (and on reload). The instance's `quantized_call`
    is only used once the layer is quantized, so this also covers
    `model.quantize` after `enable_lora`. Float layers are unaffected, and a
    quantized layer's outputs are unchanged: only its input gets a gradient.
    """
    reversible = getattr(keras.layers, "ReversibleEmbedding", None)
    if reversible is None:
        return
    for layer in model._flatten_layers(include_self=False):
        if (
            type(layer) is reversible
            and layer.tie_weights
            and "quantized_call" not in layer.__dict__
        ):
            layer.__dict__["quantized_call"] = _tied_quantized_call(layer)


def lean_frozen_layers(model):
    """Installs `lean_call` on each plain `Dense`/`EinsumDense` of `model`.

    The frozen layers around the adapted ones hold most of the kernels: their
    quantized call gets the lean input gradient (the LoRA layers use it in
    their own `quantized_call`). Like `give_tied_logits_a_gradient`, it is
    used only once the layer is quantized; outputs are unchanged.
    """
    for layer in model._flatten_layers(include_self=False):
        plain = type(layer)
        if (
            plain in (keras.layers.Dense, keras.layers.EinsumDense)
            and "quantized_call" not in layer.__dict__
        ):
            layer.__dict__["quantized_call"] = _lean_instance_call(layer, plain)


def _lean_instance_call(layer, plain):
    lean = lean_call(plain.quantized_call, layer)

    def quantized_call(inputs, training=None):
        if type(layer) is not plain:  # adapted since (a LoRA layer): its own
            return type(layer).quantized_call(layer, inputs, training=training)
        if layer.lora_enabled:  # Keras's own LoRA trains inside Keras's call
            return plain.quantized_call(layer, inputs, training=training)
        return lean(layer, inputs, training=training)

    return quantized_call


def _tied_quantized_call(layer):
    keras_call = layer.quantized_call

    def quantized_call(inputs, reverse=False, **kwargs):
        if not reverse:
            return keras_call(inputs, **kwargs)
        base = lambda x: keras_call(x, reverse=True)  # noqa: E731
        return reverse_input_gradient(layer, base, layer.logit_soft_cap)(inputs)

    return quantized_call
