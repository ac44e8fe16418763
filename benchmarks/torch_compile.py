"""Does keras-lora add graph breaks or recompiles under `torch.compile`?

Keras's PyTorch backend compiles a train step with `torch.compile` when the
model is compiled with `jit_compile=True`. Keras itself breaks the graph
(e.g. reading `ndarray.dtype` while converting data), so the figure to read
is the difference: the same small model trained for 3 steps, plain and with
every linear layer adapted, and dynamo's counters for each.

    KERAS_BACKEND=torch python benchmarks/torch_compile.py
"""

import json

import keras
import numpy as np


def build():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16,))
    h = keras.layers.Dense(16, activation="relu", name="a")(inputs)
    h = keras.layers.EinsumDense("bd,dnh->bnh", (2, 8), activation="relu", name="q")(h)
    return keras.Model(inputs, keras.layers.Flatten()(h))


def dynamo_counts(adapt, steps=3):
    """(unique graphs, graph breaks) of `steps` compiled training steps."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    import keras_lora

    x = np.random.default_rng(0).random((8, 16), dtype="float32")
    model = build()
    if adapt:
        keras_lora.enable_lora(model, rank=2, targets="all-linear")
    model.compile(optimizer="adam", loss="mse", jit_compile=True)
    dynamo.reset()
    counters.clear()
    for _ in range(steps):
        model.train_on_batch(x, x)
    return {
        "unique_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def main():
    if keras.backend.backend() != "torch":
        raise SystemExit("Run with KERAS_BACKEND=torch.")
    result = {"plain": dynamo_counts(False), "keras-lora": dynamo_counts(True)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
