"""The lean backward of frozen int8/int4 layers: Keras's gradients, no kernel kept."""

import keras
import numpy as np
import pytest

import keras_lora
from helpers import randomize_factors, to_numpy


def _model(mode):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6, 16))
    x = keras.layers.Dense(16, name="adapted")(inputs)
    x = keras.layers.EinsumDense(
        "btd,de->bte", (None, 12), bias_axes="e", name="frozen_einsum"
    )(x)
    outputs = keras.layers.Dense(8, activation="gelu", name="frozen_dense")(x)
    model = keras.Model(inputs, outputs)
    model.quantize(mode)
    keras_lora.enable_lora(model, rank=2, targets=["adapted"])
    randomize_factors(model)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    return model


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_frozen_layers_give_kernels_gradients(mode):
    """The factors below two frozen quantized layers get Keras's own gradients."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6, 16)).astype("float32")
    y = rng.normal(size=(4, 6, 8)).astype("float32")
    lean, keras_own = _model(mode), _model(mode)
    for name in ("frozen_einsum", "frozen_dense"):
        assert "quantized_call" in lean.get_layer(name).__dict__
        del keras_own.get_layer(name).__dict__["quantized_call"]  # Keras's path
    np.testing.assert_array_equal(to_numpy(lean(x)), to_numpy(keras_own(x)))
    before = {v.path: to_numpy(v) for v in lean.trainable_weights}
    lean.train_on_batch(x, y)
    keras_own.train_on_batch(x, y)
    for variable, reference in zip(lean.trainable_weights, keras_own.trainable_weights):
        step = before[variable.path] - to_numpy(variable)
        assert np.abs(step).max() > 0, variable.path
        np.testing.assert_allclose(
            step, before[variable.path] - to_numpy(reference), atol=1e-5
        )
