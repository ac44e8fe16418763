"""What `enable_lora(..., init=...)` does to a model (the maths of one layer's
start is `lora_init.py`): the argument's check, PEFT's gaussian start, the
refusal of PiSSA/OLoRA where a residual cannot be written, and adapter files of
PiSSA/OLoRA layers written for the original base.
"""

import warnings

import keras

from keras_lora import lora_init, model_paths


def check_init(init):
    """Returns `init` if `enable_lora` supports it, else raises a `ValueError`."""
    if not isinstance(init, str) or init not in lora_init.INITS:
        raise ValueError(
            f"`init` must be one of {list(lora_init.INITS)}. Received: init={init!r}"
        )
    return init


def initialize(layers, init):
    """Re-initializes the primary A factor of each LoRA layer for `init`.

    Args:
        layers: LoRA layers just adapted (their B is zero).
        init: a value `check_init` accepts.
    """
    if init != "gaussian":  # PiSSA/OLoRA ran when the layers were built
        return
    for layer in layers:
        if isinstance(layer, keras.layers.Embedding):
            continue  # PEFT's gaussian leaves embeddings at their default
        initializer = keras.initializers.RandomNormal(stddev=1.0 / layer.rank)
        layer.lora_a.assign(initializer(layer.lora_a.shape, dtype="float32"))
        # What `get_config` records, so a rebuilt layer says how it started.
        layer.set_lora_initializer(initializer)


def check_residual_targets(model, spec):
    """Refuses PiSSA/OLoRA on quantized kernels, before `enable_lora` touches
    the model. (A reloaded model quantized after `enable_lora` rebuilds its
    layers quantized, then loads its values: `initialize_layer` skips those.)
    """
    by_path = model_paths.layers_by_path(model)
    for path, config in spec["layers"].items():
        if config.get("init") and path not in by_path:
            raise ValueError(
                f"PiSSA/OLoRA cannot start the factors of the raw weight "
                f"'{path}' (a mixture-of-experts bank's): they write a residual "
                "into a Dense or EinsumDense kernel only. Received: "
                f"init={config['init']!r}"
            )
        if config.get("init"):
            lora_init.check_float_kernel(by_path[path], config["init"])


def for_original_base(model, spec, entries):
    """`save_adapter`'s spec and entries, with PiSSA/OLoRA layers converted to
    plain rank-2r LoRA that applies to the original base (warns, naming them).

    Args:
        model: the adapted model.
        spec: the adapter's spec.
        entries: `{file key: (variable, value or None)}` of the adapter.

    Returns:
        (spec, entries), unchanged if no layer has a residual init.
    """
    residual = [p for p, c in spec["layers"].items() if c.get("init")]
    if not residual:
        return spec, entries
    by_path = model_paths.layers_by_path(model)
    entries = dict(entries)
    layers = dict(spec["layers"])
    for path in residual:
        layer = by_path[path]
        a, b = lora_init.original_base_factors(layer)
        entries[f"{path}/lora_a"] = (layer.lora_a, a)
        entries[f"{path}/lora_b"] = (layer.lora_b, b)
        layers[path] = lora_init.original_base_settings(layers[path])
    ranks = sorted({(spec["layers"][p]["rank"], layers[p]["rank"]) for p in residual})
    warnings.warn(
        f"save_adapter: {len(residual)} layer(s) of model '{model.name}' started "
        f"from PiSSA/OLoRA (e.g. '{residual[0]}'); the adapter is written for "
        "the original base model as plain LoRA of twice the rank "
        f"({', '.join(f'rank {r} -> {r2}' for r, r2 in ranks)}), "
        "A' = [A, A0], B' = [B; -B0], same scale. Load it onto the original "
        "(not the PiSSA-initialised) base.",
        stacklevel=3,
    )
    return {**spec, "layers": layers}, entries
