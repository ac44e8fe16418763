"""An adapter's variables as adapter files key them, and assigning file values.

Factors are keyed `<layer path>/lora_a|b` (DoRA's magnitude `lora_magnitude`),
trained heads `train/<variable path>`, whatever adapter (named or not) they
belong to; `adapters.py` writes and reads files through these two functions.
"""

import numpy as np

from keras_lora import model_paths, transform
from keras_lora.named_adapters import adapter_spec


def adapter_variables(model, name):
    """{file key: (variable, value or None)} of one adapter, as files store it.

    Factors are keyed `<layer path>/lora_a|b` (whatever the variables' own
    names), heads `train/<variable path>`. For an inactive adapter's head the
    value is its stored copy (or the base value it never moved from).
    """
    name, spec = adapter_spec(model, name)
    by_path = model_paths.layers_by_path(model)
    entries = {}
    for path in spec["layers"]:
        stored = by_path[path].lora_adapter_file_variables(name)
        for key, variable in stored.items():  # A, B (and DoRA's magnitude)
            entries[f"{path}/{key}"] = (variable, None)
    heads = model._keras_lora_heads
    stored = heads["stored"].get(name, {})
    base = model._keras_lora_base_values or {}
    for path in spec["train_layers"]:
        owned = heads["owner"].get(path) == name
        # All of the layer's weights: a trained BatchNormalization's moving
        # statistics belong to the adapter too.
        for variable in transform.head_weights(by_path[path]):
            key = f"train/{model_paths.relative_path(model, variable.path)}"
            if key in entries:
                raise ValueError(
                    f"Two trainable weights share the path '{variable.path}'; "
                    "give the layers of `train_layers` distinct names."
                )
            value = None if owned else stored.get(variable.path)
            if value is None and not owned:
                value = base.get(variable.path)
            entries[key] = (variable, value)
    return entries


def assign_adapter_values(model, name, entries, arrays):
    """Assigns file arrays to an adapter: live variables, or its head store."""
    owners = model._keras_lora_heads["owner"]
    spec = model._keras_lora_adapters[name]
    by_path = model_paths.layers_by_path(model)
    live_heads = {
        id(v)
        for path in spec["train_layers"]
        if owners.get(path) == name
        for v in transform.head_weights(by_path[path])
    }
    stored = model._keras_lora_heads["stored"].setdefault(name, {})
    for key, (variable, _) in entries.items():
        if key.startswith("train/") and id(variable) not in live_heads:
            stored[variable.path] = np.asarray(arrays[key])
        else:
            variable.assign(arrays[key])
