"""`disable_lora`: the base model's outputs, inside a `with` block."""

import contextlib
import warnings

import keras

from keras_lora.model_paths import layers_by_path
from keras_lora.transform import check_model, head_weights, lora_layers


@contextlib.contextmanager
def disable_lora(model):
    """Context manager under which the model computes its base outputs exactly.

    Every B factor is set to zero on entry, and the weights of `train_layers`
    (a task head, say) are set to the values they had when LoRA was applied;
    all are restored bit for bit on exit (B is small: rank × d_out). PiSSA/
    OLoRA layers, whose kernel holds W - s·A0·B0, run with their starting
    factors A0, B0 instead (the original W, up to float32 rounding). Using
    the variables, rather than a Python flag, keeps this right inside already
    compiled `predict`/`fit` functions.

    A model reloaded with `keras.saving.load_model` no longer knows its
    trained layers' base values: there they keep their trained values, with a
    warning naming them.

    Example:

    >>> with keras_lora.disable_lora(model):
    ...     base_logits = model.predict(x)
    """
    check_model(model)
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"Model '{model.name}' has no LoRA layer to disable.")
    # B at zero; DoRA: m = ‖W‖ too; PiSSA/OLoRA: the starting factors (the
    # kernel holds W_res). Each layer's variants say which (`variant.py`).
    swaps = [pair for layer in layers for pair in layer.lora_base_swaps()]
    heads = getattr(model, "_keras_lora_heads", {"owner": {}})["owner"]
    owned = [path for path, owner in heads.items() if owner is not None]
    if owned:
        base_values = model._keras_lora_base_values
        if base_values is None:
            warnings.warn(
                f"disable_lora: model '{model.name}' was reloaded, so the base "
                f"values of its trained layers {owned} are not "
                "known; they keep their trained values inside the context.",
                stacklevel=3,
            )
        else:
            by_path = layers_by_path(model)
            swaps += [
                (variable, base_values[variable.path])
                for path in owned
                for variable in head_weights(by_path[path])
            ]
    saved = [keras.ops.convert_to_numpy(variable) for variable, _ in swaps]
    for variable, value in swaps:
        variable.assign(value)
    try:
        yield model
    finally:
        for (variable, _), value in zip(swaps, saved):
            variable.assign(value)
