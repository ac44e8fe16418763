"""LoRA on quantized bases: which modes, and the frozen kernel in float.

A LoRA layer leaves its quantized base exactly as Keras built it: the base
output is the Keras class's own `quantized_call` (int8 or int4 kernel, Keras's
custom input gradient through the dequantized kernel), and the layer adds the
float32 low-rank term. What LoRA needs beyond that lives here:

- `check_mode`: the quantization modes that can carry a trainable side path;
- `kernel_shape` and `dequantized_kernel`: the logical kernel, for the
  factors' shapes and for `W' = dequant(W) + s·A·B` at merge and export;
- `twin`: a fresh base-class layer holding a given float kernel, optionally
  quantized by Keras's own `quantize`, whose variables replace the live
  layer's on merge (in place) or on export (in the file);
- `reverse_input_gradient`: the fix for tied quantized `ReversibleEmbedding`s,
  whose logits path quantizes its input with no gradient.

Only Keras's own variable layouts are read (`_kernel`, `kernel_scale`,
`kernel_zero`, `g_idx`, ...), the way Keras's `_get_kernel_with_merged_lora`
reads them.
"""

import contextlib

import keras
from keras import ops, quantizers

from keras_lora.keras_private import dequantize_with_sz_map

# Modes whose base call is a fixed function of frozen variables, with an input
# gradient: a LoRA path can be added after it. float8 trains its scales through
# the gradient (`overwrite_with_gradient`), and GPTQ/AWQ replace the kernel by
# a calibrated one; Keras's own LoRA refuses those too.
SUPPORTED_MODES = ("int8", "int4")


def check_mode(mode, layer_name):
    """Raises a `ValueError` unless LoRA can adapt a layer in this mode."""
    if mode is not None and mode not in SUPPORTED_MODES:
        raise ValueError(
            f"LoRA cannot adapt layer '{layer_name}' quantized with "
            f"mode={mode!r}: it supports float layers and the modes "
            f"{SUPPORTED_MODES} (quantize with `model.quantize('int8')` or "
            f"`'int4'`). Received: quantization_mode={mode!r}"
        )


def kernel_shape(layer):
    """The logical (unpacked) shape of a Dense/EinsumDense/Embedding/conv kernel."""
    if isinstance(layer, keras.layers.Embedding):
        return (layer.input_dim, layer.output_dim)
    if isinstance(layer, keras.layers.EinsumDense):
        if layer.quantization_mode == "int4":
            return tuple(layer.original_kernel_shape)
        return tuple(layer._kernel.shape)
    if not isinstance(layer, keras.layers.Dense):  # a convolution: never packed
        return tuple(layer._kernel.shape)
    # Dense: int4 packs the output axis, the input axis stays whole.
    return (layer._kernel.shape[0], layer.units)


def kernel_variable(layer):
    """The variable that holds the (possibly quantized) kernel."""
    if isinstance(layer, keras.layers.Embedding):
        return layer._embeddings
    return layer._kernel


def dequantized_kernel(layer):
    """The kernel as a float32 tensor of `kernel_shape(layer)`.

    For a float layer, the kernel itself (cast); for int8/int4, the
    dequantized kernel, computed as Keras's own quantized call computes it.
    """
    mode = layer.quantization_mode
    kernel = kernel_variable(layer)
    if mode is None:
        return ops.cast(kernel, "float32")
    check_mode(mode, layer.name)
    if isinstance(layer, keras.layers.Embedding):
        return _dequantized_embeddings(layer, mode, kernel)
    grouped = _block_size(layer) is not None
    if isinstance(layer, keras.layers.EinsumDense):
        if mode == "int8":
            scale = layer._adjust_scale_for_dequant(layer.kernel_scale)
            return ops.divide(ops.cast(kernel, "float32"), scale)
        values = quantizers.unpack_int4(
            kernel, layer._int4_unpacked_column_size, axis=-1, dtype="int8"
        )
    else:  # Dense
        if mode == "int8":
            return ops.divide(ops.cast(kernel, "float32"), layer.kernel_scale)
        values = quantizers.unpack_int4(kernel, layer._orig_output_dim, axis=-1)
    values = ops.cast(values, "float32")
    if grouped:
        values = dequantize_with_sz_map(
            values, layer.kernel_scale, layer.kernel_zero, layer.g_idx, group_axis=0
        )
    else:
        values = ops.divide(values, layer.kernel_scale)
    return ops.reshape(ops.cast(values, "float32"), kernel_shape(layer))


def _dequantized_embeddings(layer, mode, values):
    if mode == "int4":
        values = quantizers.unpack_int4(values, layer._orig_output_dim, axis=-1)
    values = ops.cast(values, "float32")
    if mode == "int4" and _block_size(layer) is not None:
        return ops.cast(
            dequantize_with_sz_map(
                values,
                layer.embeddings_scale,
                layer.embeddings_zero,
                layer.g_idx,
                group_axis=-1,
            ),
            "float32",
        )
    return ops.divide(values, ops.expand_dims(layer.embeddings_scale, -1))


def _block_size(layer):
    """The int4 sub-channel block size, or None for per-channel / int8."""
    block = getattr(layer, "_int4_block_size", None)
    return None if block is None or block == -1 else block


def source_policy(layer):
    """The float dtype policy the layer's quantized policy was made from.

    Always a named policy: one loaded from a KerasHub policy map may carry no
    name ("use the global dtype"), which a saved config cannot hold.
    """
    policy = layer.dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        policy = policy[layer.path]
    name = policy.name if policy.quantization_mode is None else policy._source_name
    if not name:
        compute, variable = policy.compute_dtype, policy.variable_dtype
        name = compute if compute == variable else f"mixed_{compute}"
    return keras.dtype_policies.get(name)


def quantization_config(layer, mode):
    """The config that re-quantizes like `layer` (mode `mode`), or None."""
    if mode == layer.quantization_mode and layer.quantization_config is not None:
        return layer.quantization_config
    if mode == "int4":
        block = _block_size(layer) if layer.quantization_mode == "int4" else None
        return quantizers.Int4QuantizationConfig(block_size=block if block else -1)
    return None


def twin(layer, base_class, kernel, mode=None, policy=None):
    """A fresh `base_class` layer like `layer`, holding `kernel`.

    Args:
        layer: the live layer (a LoRA layer or a plain quantized layer).
        base_class: its plain Keras class.
        kernel: float kernel of `kernel_shape(layer)`.
        mode: None for a float twin, or `"int8"`/`"int4"`: the twin is then
            quantized by Keras's own `quantize` (the quantizer Keras uses).
        policy: the twin's float dtype policy (default: the layer's source
            policy, e.g. `"float32"` for `"int8_from_float32"`).

    Returns:
        The built twin. Its other variables (bias, an untied reverse table)
        are copied from `layer`.

    Raises:
        ValueError: if another variable has no float counterpart (the int8
            reverse table of an untied quantized `ReversibleEmbedding`).
    """
    config = base_class.get_config(layer)
    config["dtype"] = policy or source_policy(layer)
    config.pop("quantization_config", None)
    config.pop("lora_rank", None)
    copy = base_class.from_config(config)
    shapes = getattr(layer, "_build_shapes_dict", None) or {}
    copy.build(**shapes)
    kernel_variable(copy).assign(ops.cast(kernel, kernel_variable(copy).dtype))
    own = {v.name: v for v in layer.weights}
    for variable in copy.weights:
        if variable.name in quantized_names(copy):
            continue
        match = own.get(variable.name)
        if (
            match is None
            or tuple(match.shape) != tuple(variable.shape)
            or not _is_float(match.dtype)
        ):
            raise ValueError(
                f"Cannot write layer '{layer.path}' in another form: its "
                f"variable '{variable.name}' has no float counterpart "
                f"(found {match!r}). Export it with `quantize='same'`."
            )
        variable.assign(ops.cast(match, variable.dtype))
    if mode is not None:
        copy.quantize(mode, config=quantization_config(layer, mode))
    return copy


def _is_float(dtype):
    return "float" in keras.backend.standardize_dtype(dtype)


def quantized_names(layer):
    """Names of the variables that hold the kernel (quantized or not)."""
    stem = kernel_variable(layer).name
    return {stem, f"{stem}_scale", f"{stem}_zero", "g_idx"}


def assign_from(layer, source):
    """Assigns `source`'s kernel variables to `layer`'s (same mode and shapes)."""
    names = quantized_names(layer)
    own = {v.name: v for v in layer.weights if v.name in names}
    for variable in source.weights:
        if variable.name in own:
            own[variable.name].assign(variable)


def after(tensor, upstream):
    """`tensor`, made to depend on `upstream` (values unchanged).

    A frozen kernel's dequantization depends on variables only, so XLA may
    schedule it anywhere, e.g. at the start of the step, and keep every
    layer's float kernel alive until its use. Adding a zero taken from
    `upstream` (the layer's input, or its upstream gradient) ties it to the
    layer's own forward or backward pass. XLA folds an integer `x * 0`, so
    the zero is a float one (not folded: it is NaN for an infinite x), cast.
    """
    first = ops.reshape(upstream, (-1,))[:1]
    zero = ops.multiply(ops.cast(ops.stop_gradient(first), "float32"), 0.0)
    return ops.add(tensor, ops.cast(zero, tensor.dtype))


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
    stem = kernel_variable(layer).name
    names = ("_embeddings" if stem == "embeddings" else "_kernel",)
    names += (f"{stem}_scale", f"{stem}_zero", "g_idx")
    saved = {n: layer.__dict__[n] for n in names if layer.__dict__.get(n) is not None}
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
        inputs, output = layer.equation.split("->")
        input_spec, kernel_spec = inputs.split(",")
        equation = f"{output},{kernel_spec}->{input_spec}"
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
        bias, activation = layer.bias, layer.activation
        # Keras adds these inside its quantized call; the custom gradient
        # below is the input's only, so a trainable bias must stay outside.
        layer.__dict__["bias"], layer.__dict__["activation"] = None, None
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
            layer.__dict__["bias"], layer.__dict__["activation"] = bias, activation
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


def prepare_model(model):
    """What `enable_lora` (and a reload) does for quantized bases: see below."""
    give_tied_logits_a_gradient(model)
    lean_frozen_layers(model)
    save_with_own_policy(model)


def save_with_own_policy(model):
    """Lets each layer of a policy-map model save its quantized variables.

    A KerasHub model loaded from a quantized file (an int8 preset) gives its
    layers one shared `DTypePolicyMap`. Keras 3.15's `Dense`/`EinsumDense`/
    `Embedding.save_own_variables` read `self.dtype_policy.quantization_mode`,
    which is the map's (None), so `model.save` fails ("Invalid dtype:
    object") even without LoRA. While a layer saves, it sees its own entry.
    """
    for layer in model._flatten_layers(include_self=False):
        owner = layer.__dict__.get("_dtype_policy")
        if (
            isinstance(owner, keras.dtype_policies.DTypePolicyMap)
            and layer.path in owner
            and "save_own_variables" not in layer.__dict__
        ):
            layer.__dict__["save_own_variables"] = _own_policy_save(layer)


def _own_policy_save(layer):
    def save_own_variables(store):
        owner = layer.__dict__["_dtype_policy"]
        layer.__dict__["_dtype_policy"] = owner[layer.path]
        try:
            type(layer).save_own_variables(layer, store)
        finally:
            layer.__dict__["_dtype_policy"] = owner

    return save_own_variables


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
