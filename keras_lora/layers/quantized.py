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
    if mode == "int4" and layer.quantization_mode == "int4":
        block = _block_size(layer)  # an int4 base keeps its block size
        return quantizers.Int4QuantizationConfig(block_size=block if block else -1)
    if mode == "int4":  # what `model.quantize("int4")` uses (block size 128)
        return quantizers.Int4QuantizationConfig()
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
