"""`export_merged`: write a plain `.keras` model with every update folded in.

The live model is not copied. While Keras's own `save_model` writes the file,
the writing thread sees each LoRA layer as its original class
(`class_view`), with its original config (so the config names only `Dense`,
`EinsumDense`, `GPT2Backbone`, ...), and each LoRA layer writes `W + s·A·B`
in place of `W`, computed when that layer is written: at most one merged
kernel exists at a time. Other threads calling the model meanwhile compute
with the LoRA layers as they are. Everything is put back afterwards, even on
failure.

A layer whose stored form changes (a quantized base written in float, a merged
kernel written in float32 or re-quantized) is written through a `twin`: a fresh
base-class layer built, filled and quantized by Keras's own code when that
layer is written, whose config and variables stand in for the live layer's.
"""

import contextlib

import keras

from keras_lora import adapted_model, transform
from keras_lora.class_view import class_view
from keras_lora.io_utils import atomic_write, check_keras_path
from keras_lora.layers import expert_bank, quantized
from keras_lora.layers.expert_einsum import LoRAExpertEinsum

_QUANTIZE_CHOICES = (None, "same", *quantized.SUPPORTED_MODES)


def export_merged(model, filepath, dtype=None, quantize=None):
    """Writes `model` with every LoRA update merged as a standard `.keras` file.

    The file has the layer classes and weight shapes of the model before
    `enable_lora`, no LoRA class, config key or factor, no compile settings
    and no optimizer state (only a fresh copy of the optimizer, see below): it
    loads with `keras.saving.load_model` without keras-lora installed. The
    live model is untouched and can keep training.

    Each merged kernel is `W' = dequant(W) + s·A·B`, computed in float32.

    Args:
        model: a model with LoRA layers.
        filepath: destination ending in `.keras`, written atomically.
        dtype: None, or a float dtype (`"float32"`) for the merged layers
            (and the layers `quantize=None` dequantizes). By default a merged
            kernel takes its base's dtype: on a bfloat16 base, rounding
            `W + s·A·B` to bfloat16 (8 mantissa bits, a relative step of
            2⁻⁸ ≈ 0.4% of each weight) loses the part of a small update
            below that step, measured at about 3% of the update's effect on
            a tiny Gemma. `dtype="float32"` writes those layers in float32
            (their compute dtype too), and nothing is lost.
        quantize: what happens to quantization in the file.
            None: a float model: quantized layers (int8/int4 bases, and any
            other quantized layer) are written dequantized, in their source
            dtype (or `dtype`).
            `"same"`: each layer keeps its mode; a merged int8/int4 kernel is
            re-quantized by Keras's own quantizer (same mode, block size and
            config), so the file stays small.
            `"int8"` or `"int4"`: the file is the merged model after
            `model.quantize(quantize)`: every Dense, EinsumDense and
            Embedding layer is written in that mode (Keras's default config
            for it; an int4 base keeps its block size).
            Re-quantizing adds the quantizer's own rounding error to each
            merged kernel (at most half a quantization step per weight, as
            quantizing any float model would); the LoRA update itself is
            added in float32 before rounding.

    Returns:
        `filepath`.

    Example:

    >>> keras_lora.export_merged(model, "merged.keras")
    >>> plain = keras.saving.load_model("merged.keras")
    >>> keras_lora.export_merged(qlora_model, "merged-int8.keras", quantize="same")
    """
    filepath = check_keras_path(filepath)
    adapted_model.check_outside_adapter_ids(model, "`export_merged`")
    if dtype is not None:
        policy = keras.dtype_policies.get(dtype) if isinstance(dtype, str) else None
        if policy is None or policy.quantization_mode is not None:
            raise ValueError(
                "`dtype` must be None or a float dtype name such as 'float32'. "
                f"Received: dtype={dtype!r}"
            )
    if quantize not in _QUANTIZE_CHOICES:
        raise ValueError(
            f"`quantize` must be one of {_QUANTIZE_CHOICES}. "
            f"Received: quantize={quantize!r}"
        )
    layers = transform.lora_layers(model)
    if not layers:
        raise ValueError(
            f"Model '{getattr(model, 'name', model)}' has no LoRA layer to merge "
            "and export: call `keras_lora.enable_lora(model)` first, or "
            "`model.save` for a plain model."
        )
    with (
        atomic_write(filepath) as temporary,
        _plain_view(model, layers, dtype, quantize),
    ):
        model.save(temporary)
    return filepath


@contextlib.contextmanager
def _plain_view(model, layers, dtype=None, quantize=None):
    """Makes `model` serialize as its merged, pre-LoRA self, then restores it."""
    overrides = []  # (object, attribute name, previous value or _MISSING)
    classes = []  # (object, class) to restore
    views = []  # (LoRA layer, the base class this thread sees it as)
    policies = []  # (layer, previous policy) to restore
    try:
        for bank in _adapted_banks(model):
            # Its LoRA layers are not visited by the saver: the bank writes
            # each adapted weight merged, as its original class lays it out.
            overrides.append((bank, "save_own_variables", _MISSING))
            bank.__dict__["save_own_variables"] = _merged_bank_writer(bank)
            views.append((bank, expert_bank.original_class(bank)))
        for layer in layers:
            if isinstance(layer, LoRAExpertEinsum):
                continue
            base_class = layer.lora_base_class
            plan = _plan(layer, base_class, dtype, quantize)
            if plan is None:
                _write_merged_kernel(layer, overrides)
                previous = layer.__dict__.get("get_config", _MISSING)
                overrides.append((layer, "get_config", previous))
                layer.__dict__["get_config"] = _base_config(layer, base_class)
            else:
                _write_twin(layer, *plan, overrides, policies)
            views.append((layer, base_class))
        adapted = {id(layer) for layer in layers}
        for layer in model._flatten_layers(include_self=False):
            if id(layer) not in adapted and type(layer) in _quantizable():
                plan = _plan(layer, type(layer), dtype, quantize, merged=False)
                if plan is not None:
                    _write_twin(layer, *plan, overrides, policies)
        classes.append((model, type(model)))
        model.__class__ = adapted_model.original_class(model)
        # No optimizer state or compile settings: they belong to the LoRA
        # variables. A KerasHub task compiles itself when it is loaded, and
        # Keras warns "Skipping variable loading for optimizer" unless the
        # file holds the variables of a fresh optimizer: write an unbuilt copy.
        fresh = _unbuilt_copy(getattr(model, "optimizer", None))
        for name, value in (("optimizer", fresh), ("get_compile_config", _none)):
            overrides.append((model, name, model.__dict__.get(name, _MISSING)))
            model.__dict__[name] = value
        with class_view(views):
            yield
    finally:
        for layer, policy in reversed(policies):
            _set_policy(layer, policy)
        for obj, cls in reversed(classes):
            obj.__class__ = cls
        for obj, name, previous in reversed(overrides):
            if previous is _MISSING:
                del obj.__dict__[name]
            else:
                obj.__dict__[name] = previous


_MISSING = object()


def _adapted_banks(model):
    """The layers (expert banks) with LoRA on their raw weights."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if expert_bank.expert_layers(layer)
    ]


def _merged_bank_writer(bank):
    return lambda store: expert_bank.save_merged(bank, store)


def _unbuilt_copy(optimizer):
    """The optimizer's settings without its state (`iterations` is 0)."""
    if optimizer is None:
        return None
    return optimizer.__class__.from_config(optimizer.get_config())


def _none():
    return None


def _base_config(layer, base_class):
    """`layer.get_config` as its base class writes it (no LoRA keys)."""
    return lambda: base_class.get_config(layer)


def _write_merged_kernel(layer, overrides):
    """Overrides `layer.save_own_variables` to write the merged kernel."""
    base_save = layer.lora_base_class.save_own_variables
    kernel = layer.lora_base_kernel

    def save_own_variables(store):
        entries = {}
        base_save(layer, entries)  # the base class's own layout
        found = False
        for key, value in entries.items():
            if value is kernel:
                # W + s·A·B of the active adapter(s), in the kernel's dtype.
                value = layer.merged_kernel()
                found = True
            store[key] = value
        if not found:
            raise RuntimeError(
                f"Could not find the kernel of layer '{layer.path}' among the "
                "variables its base class saves; nothing was exported."
            )

    overrides.append((layer, "save_own_variables", _MISSING))
    layer.__dict__["save_own_variables"] = save_own_variables


def _quantizable():
    """The layer classes `model.quantize` quantizes (exact types)."""
    classes = [keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding]
    if hasattr(keras.layers, "ReversibleEmbedding"):
        classes.append(keras.layers.ReversibleEmbedding)
    return tuple(classes)


def _plan(layer, base_class, dtype, quantize, merged=True):
    """(base class, mode, float policy) for a twin, or None to write as is."""
    mode = layer.quantization_mode
    target = {None: None, "same": mode}.get(quantize, quantize)
    if quantize in quantized.SUPPORTED_MODES and base_class not in _quantizable():
        # As `model.quantize` does: a layer Keras cannot quantize (a
        # convolution) stays as it is.
        target = mode
    if mode is not None and mode not in quantized.SUPPORTED_MODES:
        if target == mode and not merged:
            return None  # e.g. a float8 layer that LoRA did not touch
        raise ValueError(
            f"Layer '{layer.path}' is quantized with mode={mode!r}, which "
            "`export_merged` cannot dequantize. Received: "
            f"quantize={quantize!r}"
        )
    float_policy = keras.dtype_policies.get(dtype) if dtype else None
    if target == mode and (float_policy is None or not merged):
        # Unchanged layout: a float merged kernel is written in place; a
        # quantized one must be re-quantized (a twin) only if it was merged.
        if not merged or mode is None:
            return None
    return base_class, target, float_policy


def _write_twin(layer, base_class, mode, float_policy, overrides, policies):
    """Writes `layer` as a twin: config now, variables when it is saved."""
    float_policy = float_policy or quantized.source_policy(layer)
    config_of = quantized.quantization_config(layer, mode) if mode else None
    policy = _target_policy(float_policy, mode, config_of)
    config = base_class.get_config(layer)
    config["dtype"] = keras.dtype_policies.serialize(policy)
    config["quantization_config"] = keras.saving.serialize_keras_object(config_of)
    config.pop("lora_rank", None)
    config.pop("lora_alpha", None)
    live_policy = _current_policy(layer)

    def save_own_variables(store):
        # Built here, one layer at a time: at most one float kernel exists.
        # The kernel is read under the live policy (its real quantization).
        written = _set_policy(layer, live_policy)
        try:
            kernel = (
                layer.merged_kernel("float32")
                if hasattr(layer, "lora_a")
                else quantized.dequantized_kernel(layer)
            )
            twin = quantized.twin(layer, base_class, kernel, mode, float_policy)
        finally:
            _set_policy(layer, written)
        twin.save_own_variables(store)

    for name, value in (
        ("save_own_variables", save_own_variables),
        ("get_config", lambda: dict(config)),
    ):
        overrides.append((layer, name, layer.__dict__.get(name, _MISSING)))
        layer.__dict__[name] = value
    # What the model's own config reads (a KerasHub backbone's policy map).
    policies.append((layer, _set_policy(layer, policy)))


def _target_policy(float_policy, mode, config):
    """The dtype policy of a layer written in `mode` from `float_policy`."""
    if mode is None:
        return float_policy
    name = mode
    if mode == "int4":
        block = getattr(config, "block_size", 128) if config is not None else 128
        name = f"int4/{-1 if block is None else block}"
    return keras.dtype_policies.get(f"{name}_from_{float_policy.name}")


def _current_policy(layer):
    """The layer's own policy (its entry when a `DTypePolicyMap` holds it)."""
    owner = layer._dtype_policy
    if isinstance(owner, keras.dtype_policies.DTypePolicyMap):
        return owner[layer.path]
    return owner


def _set_policy(layer, policy):
    """Sets the policy the layer reads (not quantizing it); returns the old one.

    A KerasHub backbone loaded from a quantized file shares one
    `DTypePolicyMap` with its layers: the layer's entry is set there (and
    removed again when `policy` is `_MISSING`), which is also what the
    backbone's config writes.
    """
    owner = layer._dtype_policy
    if isinstance(owner, keras.dtype_policies.DTypePolicyMap):
        previous = _MISSING
        if layer.path in owner:
            previous = owner[layer.path]
            del owner[layer.path]
        if policy is not _MISSING:
            owner[layer.path] = policy
        return previous
    layer.__dict__["_dtype_policy"] = policy
    return owner
