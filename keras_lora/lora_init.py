"""`enable_lora(..., init=...)`: how the factors start.

- `"default"`: the paper's (and PEFT's `init_lora_weights=True`): A He-uniform
  (Kaiming), B zero; embeddings: A zero, B normal.
- `"gaussian"`: PEFT's `init_lora_weights="gaussian"`: A ~ N(0, σ = 1/r), B
  zero; embeddings keep their default (PEFT does the same).

B (or an embedding's A) starts at zero either way, so the adapted model equals
the base model exactly before the first step.
"""

import keras

INITS = ("default", "gaussian")
# Inits that move part of W into the factors (the layer's `init` argument):
# the layer keeps its starting factors, frozen, as `lora_a_initial` /
# `lora_b_initial`.
RESIDUAL_INITS = ("pissa", "olora")


def check_layer_init(init):
    """Returns a LoRA layer's `init` (None or a residual init), else raises."""
    if init is not None and init not in RESIDUAL_INITS:
        raise ValueError(
            f"A LoRA layer's `init` must be None or one of {list(RESIDUAL_INITS)}. "
            f"Received: init={init!r}"
        )
    return init


def initialize_layer(layer):
    """Moves W's principal part into the factors (`layer.lora_init`)."""
    raise NotImplementedError("PiSSA/OLoRA: being written")


def check_init(init):
    """Returns `init` if `enable_lora` supports it, else raises a `ValueError`."""
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(
            f"`init` must be one of {list(INITS)}. Received: init={init!r}"
        )
    return init


def initialize(layers, init):
    """Re-initializes the primary A factor of each LoRA layer for `init`.

    Args:
        layers: LoRA layers just adapted (their B is zero).
        init: a value `check_init` accepts.
    """
    if init == "default":
        return
    for layer in layers:
        if isinstance(layer, keras.layers.Embedding):
            continue  # PEFT's gaussian leaves embeddings at their default
        initializer = keras.initializers.RandomNormal(stddev=1.0 / layer.rank)
        layer.lora_a.assign(initializer(layer.lora_a.shape, dtype="float32"))
        # What `get_config` records, so a rebuilt layer says how it started.
        layer._lora_set("a_initializer", initializer)
