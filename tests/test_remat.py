"""Gradient checkpointing: LoRA under `keras.RematScope` (issue 11).

The layers must be created inside the scope (Keras reads it when a layer is
made), so these models are built inside it and adapted afterwards. The modes
are those Keras 3.15 itself trains a plain `Dense` model under on each backend:
TensorFlow's `tf.recompute_grad` refuses keyword arguments in graph mode
(every mode but "activations"), and "larger_than" fails in Keras on PyTorch.
"""

import keras
import numpy as np
import pytest

import keras_lora
from helpers import SEQ, tiny_gpt2_backbone, to_numpy, token_batch

MODES = {
    "jax": ["full", "list_of_layers", "larger_than", "activations"],
    "torch": ["full", "list_of_layers", "activations"],
    "tensorflow": ["activations"],
}[keras.backend.backend()]

X = np.random.default_rng(0).random((8, 16)).astype("float32")
Y = np.random.default_rng(1).random((8, 4)).astype("float32")


def scope(mode):
    if mode is None:
        return keras.RematScope(mode=None)
    return keras.RematScope(
        mode=mode, layer_names=["hidden", "direct"], output_size_threshold=10
    )


def small_model(mode, dropout):
    """A Dense adapted by `enable_lora`, and a `LoRADense` made in the scope."""
    keras.utils.set_random_seed(3)
    with scope(mode):
        inputs = keras.Input((16,))
        x = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
        x = keras_lora.LoRADense(16, rank=4, dropout=dropout, name="direct")(x)
        outputs = keras.layers.Dense(4, name="head")(x)
        model = keras.Model(inputs, outputs)
    keras_lora.enable_lora(model, rank=4, targets=["hidden"], dropout=dropout)
    return model


def one_step(model, x, y, loss="mse"):
    """Predictions, then the weights after one SGD step (so: the gradients)."""
    for layer in keras_lora.lora_layers(model):  # B = 0 would hide dA
        layer.lora_b.assign(np.full(layer.lora_b.shape, 0.1, "float32"))
    model.compile(keras.optimizers.SGD(0.1), loss)
    predictions = to_numpy(model.predict_on_batch(x))
    model.train_on_batch(x, y)
    return predictions, [to_numpy(v) for v in model.trainable_weights]


def assert_same_step(got, expected):
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-6)
    assert len(got[1]) == len(expected[1])
    for a, b in zip(got[1], expected[1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_remat_keeps_outputs_and_gradients(mode):
    expected = one_step(small_model(None, 0.0), X, Y)
    assert_same_step(one_step(small_model(mode, 0.0), X, Y), expected)


@pytest.mark.parametrize("mode", MODES)
def test_remat_with_lora_dropout(mode):
    if keras.backend.backend() == "jax" and mode != "activations":
        # `jax.checkpoint` cannot carry the dropout seed's state update.
        with pytest.raises(ValueError, match="RematScope"):
            one_step(small_model(mode, 0.2), X, Y)
        return
    expected = one_step(small_model(None, 0.2), X, Y)
    assert_same_step(one_step(small_model(mode, 0.2), X, Y), expected)


def test_remat_on_a_kerashub_backbone():
    """The recipe for KerasHub: build (or `from_preset`) inside the scope.

    On JAX, "full" fails in Keras's own `Dropout` layer (its `training` flag
    is traced), so the adapted projections are named instead.
    """
    mode = "activations" if keras.backend.backend() == "tensorflow" else None
    x = token_batch(2)
    y = np.random.default_rng(2).random((2, SEQ, 32)).astype("float32")

    def backbone(mode):
        keras.utils.set_random_seed(5)
        names = ["query", "value"]
        with keras.RematScope(mode=mode, layer_names=names if mode else None):
            model = tiny_gpt2_backbone(num_layers=1)
        keras_lora.enable_lora(model, rank=4)
        return model

    expected = one_step(backbone(None), x, y)
    assert_same_step(one_step(backbone(mode or "list_of_layers"), x, y), expected)
