"""`enable_lora(..., init="gaussian")`: PEFT's gaussian start (A ~ N(0, 1/r), B zero)."""

import keras
import numpy as np
import pytest

import keras_lora
from helpers import to_numpy


def _model():
    inputs = keras.Input((4,), dtype="int32")
    x = keras.layers.Embedding(50, 128, name="embed")(inputs)
    x = keras.layers.Dense(96, name="dense")(x)
    return keras.Model(inputs, x, name="init_model")


def test_gaussian_init_starts_at_the_base_with_normal_a():
    model = _model()
    x = np.arange(8, dtype="int32").reshape(2, 4)
    base = to_numpy(model(x))
    keras_lora.enable_lora(model, rank=4, targets=["embed", "dense"], init="gaussian")
    np.testing.assert_array_equal(to_numpy(model(x)), base)
    dense = model.get_layer("dense")
    a = to_numpy(dense.lora_a)
    assert not to_numpy(dense.lora_b).any()
    # 512 draws: the sample std is within ~10% of σ = 1/r (He-uniform's would
    # be sqrt(6 / 128) / sqrt(3) = 0.125 here, half of it).
    assert abs(a.std() - 0.25) < 0.03 and abs(a.mean()) < 0.03
    assert dense.get_config()["a_initializer"]["class_name"] == "RandomNormal"
    # Embeddings keep their default start (PEFT's gaussian does the same).
    assert not to_numpy(model.get_layer("embed").lora_a).any()


def test_default_init_is_he_uniform():
    model = _model()
    keras_lora.enable_lora(model, rank=4, targets=["dense"])
    a = to_numpy(model.get_layer("dense").lora_a)
    assert np.abs(a).max() <= np.sqrt(6 / 128) + 1e-6


@pytest.mark.parametrize("init", ["svd", "Gaussian", None])
def test_unknown_init_is_an_error_and_changes_nothing(init):
    model = _model()
    with pytest.raises(ValueError, match="`init` must be one of"):
        keras_lora.enable_lora(model, rank=4, targets=["dense"], init=init)
    assert not keras_lora.lora_layers(model)
