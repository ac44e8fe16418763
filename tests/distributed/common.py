"""Small real models, data and weights shared by the distributed test scripts.

Every script builds the same model with the same weights (drawn from a NumPy
generator, so they do not depend on the backend's random numbers or on how a
variable is sharded), trains it, and prints one JSON line of facts that
`tests/test_distributed.py` asserts.
"""

import json
import sys

import numpy as np

VOCAB = 64
SEQ = 8
GLOBAL_BATCH = 8
STEPS = 2


def set_seeded_weights(model, seed=0):
    """Gives every variable of `model` values from a seeded NumPy generator.

    Non-zero everywhere (LoRA's B too), so both factors get gradients in the
    first step. Scale and offset keep a tiny transformer well conditioned.
    """
    import keras

    rng = np.random.default_rng(seed)
    for variable in model.variables:
        if not keras.backend.is_float_dtype(variable.dtype):
            continue
        values = rng.normal(0.0, 0.1, variable.shape)
        if variable.name == "gamma":  # LayerNorm scales around 1
            values += 1.0
        variable.assign(values.astype(variable.dtype))


def token_data(seed=1, batch=GLOBAL_BATCH):
    """A causal-LM batch: ({token_ids, padding_mask}, next-token labels)."""
    rng = np.random.default_rng(seed)
    x = {
        "token_ids": rng.integers(1, VOCAB, (batch, SEQ)).astype("int32"),
        "padding_mask": np.ones((batch, SEQ), "int32"),
    }
    y = rng.integers(1, VOCAB, (batch, SEQ)).astype("int32")
    return x, y


def mlp_data(seed=1, batch=GLOBAL_BATCH, features=16, classes=4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, features)).astype("float32")
    y = rng.integers(0, classes, (batch,)).astype("int32")
    return x, y


def tiny_mlp(features=16, classes=4):
    """A Functional model with two Dense layers (both adapted by default)."""
    import keras

    inputs = keras.Input((features,))
    hidden = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(classes, name="head")(hidden)
    return keras.Model(inputs, outputs, name="mlp")


def adapted_mlp(seed=0):
    """`tiny_mlp` with LoRA on both layers, seeded weights, compiled for SGD."""
    import keras

    import keras_lora

    model = tiny_mlp()
    keras_lora.enable_lora(model, rank=2)
    set_seeded_weights(model, seed)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def fit(model, data):
    """`model.fit` on `data` = (x, y), one global batch per step; the factors."""
    x, y = data
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=STEPS, shuffle=False, verbose=0)
    return factors(model)


def factors(model):
    """{variable path: NumPy value} of every LoRA factor."""
    import keras

    import keras_lora

    values = {}
    for layer in keras_lora.lora_layers(model):
        for variable in (layer.lora_a, layer.lora_b):
            values[variable.path] = keras.ops.convert_to_numpy(variable.value)
    return values


def max_difference(left, right):
    """Largest absolute difference between two {path: array} dicts (same keys)."""
    if sorted(left) != sorted(right):
        raise ValueError(f"Different factors: {sorted(left)} vs {sorted(right)}")
    return float(max(np.max(np.abs(left[k] - right[k])) for k in left))


def largest_change(before, after):
    """How far training moved the factors (to show that it did)."""
    return max_difference(before, after)


def report(facts):
    """Prints the facts as the last line of stdout, for the test to read."""
    sys.stdout.flush()
    print("FACTS " + json.dumps(facts), flush=True)
