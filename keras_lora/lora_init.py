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
