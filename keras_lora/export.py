"""`export_merged`: write a plain `.keras` model with every update folded in.

The live model is not copied. While Keras's own `save_model` writes the file,
the model and its LoRA layers briefly wear their original classes (so the
config names only `Dense`, `EinsumDense`, `GPT2Backbone`, ...), and each LoRA
layer writes `W + s·A·B` in place of `W`, computed when that layer is written:
at most one merged kernel exists at a time. Everything is put back afterwards,
even on failure.
"""

import contextlib

from keras_lora import adapted_model, transform
from keras_lora.io_utils import atomic_write, check_keras_path
from keras_lora.layers import lora_math


def export_merged(model, filepath):
    """Writes `model` with every LoRA update merged as a standard `.keras` file.

    The file has the layer classes and weight shapes of the model before
    `enable_lora`, no LoRA class, config key or factor, no compile settings
    and no optimizer state (only a fresh copy of the optimizer, see below): it
    loads with `keras.saving.load_model` without keras-lora installed. The
    live model is untouched and can keep training.

    Args:
        model: a model with LoRA layers.
        filepath: destination ending in `.keras`, written atomically.

    Example:

    >>> keras_lora.export_merged(model, "merged.keras")
    >>> plain = keras.saving.load_model("merged.keras")
    """
    filepath = check_keras_path(filepath)
    layers = transform.lora_layers(model)
    if not layers:
        raise ValueError(
            f"Model '{getattr(model, 'name', model)}' has no LoRA layer to merge "
            "and export: call `keras_lora.enable_lora(model)` first, or "
            "`model.save` for a plain model."
        )
    with atomic_write(filepath) as temporary, _plain_view(model, layers):
        model.save(temporary)
    return filepath


@contextlib.contextmanager
def _plain_view(model, layers):
    """Makes `model` serialize as its merged, pre-LoRA self, then restores it."""
    overrides = []  # (object, attribute name, previous value or _MISSING)
    classes = []  # (object, class) to restore
    try:
        for layer in layers:
            _write_merged_kernel(layer, overrides)
            classes.append((layer, type(layer)))
            layer.__class__ = layer._lora_base_class_of()
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
        yield
    finally:
        for obj, cls in reversed(classes):
            obj.__class__ = cls
        for obj, name, previous in reversed(overrides):
            if previous is _MISSING:
                del obj.__dict__[name]
            else:
                obj.__dict__[name] = previous


_MISSING = object()


def _unbuilt_copy(optimizer):
    """The optimizer's settings without its state (`iterations` is 0)."""
    if optimizer is None:
        return None
    return optimizer.__class__.from_config(optimizer.get_config())


def _none():
    return None


def _write_merged_kernel(layer, overrides):
    """Overrides `layer.save_own_variables` to write the merged kernel."""
    base_save = layer._lora_base_class_of().save_own_variables
    kernel = layer.lora_base_kernel
    factors = (layer.lora_a, layer.lora_b, layer.lora_merge_equation, layer.lora_scale)

    def save_own_variables(store):
        entries = {}
        base_save(layer, entries)  # the base class's own layout
        found = False
        for key, value in entries.items():
            if value is kernel:
                value = lora_math.merged_kernel(kernel, *factors)
                found = True
            store[key] = value
        if not found:
            raise RuntimeError(
                f"Could not find the kernel of layer '{layer.path}' among the "
                "variables its base class saves; nothing was exported."
            )

    overrides.append((layer, "save_own_variables", _MISSING))
    layer.__dict__["save_own_variables"] = save_own_variables
