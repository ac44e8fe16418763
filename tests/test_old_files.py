"""Files written by keras-lora before the restructuring still load (issue 20).

`tests/data/old_*` were written on JAX by keras-lora at commit 8007b5d (the
main branch before issues 20, 21, 24 and 25 changed the layers and the
saving code) from a two-layer MLP with two named adapters: a whole adapted
model (`model.save`), an adapter file and a merged export, with the outputs
they gave then.
"""

import json
import os

import keras
import numpy as np

import keras_lora
from helpers import to_numpy

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
with open(os.path.join(DATA, "old_outputs.json")) as f:
    OLD = json.load(f)
X = np.asarray(OLD["x"], "float32")


def test_an_old_adapted_model_file_loads_with_its_adapters():
    model = keras.saving.load_model(os.path.join(DATA, "old_model.keras"))
    assert keras_lora.list_adapters(model) == ["default", "two"]
    np.testing.assert_allclose(to_numpy(model(X)), OLD["default"], atol=1e-5)
    keras_lora.set_adapter(model, "two")
    np.testing.assert_allclose(to_numpy(model(X)), OLD["two"], atol=1e-5)


def test_an_old_merged_export_loads_as_a_plain_model():
    model = keras.saving.load_model(os.path.join(DATA, "old_merged.keras"))
    assert not keras_lora.lora_layers(model)
    np.testing.assert_allclose(to_numpy(model(X)), OLD["default"], atol=1e-5)


def test_an_old_adapter_file_loads_onto_its_base():
    adapted = keras.saving.load_model(os.path.join(DATA, "old_model.keras"))
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu", name="a")(inputs)
    base = keras.Model(inputs, keras.layers.Dense(3, name="b")(h), name="old_mlp")
    for name in ("a", "b"):  # the base weights the adapter was trained on
        layer = adapted.get_layer(name)
        base.get_layer(name).set_weights([to_numpy(layer.kernel), to_numpy(layer.bias)])
    keras_lora.load_adapter(base, os.path.join(DATA, "old_adapter.keras"))
    np.testing.assert_allclose(to_numpy(base(X)), OLD["default"], atol=1e-5)
