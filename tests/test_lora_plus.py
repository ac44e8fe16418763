"""LoRA+ (`keras_lora.LoRAPlus`): B's step is `ratio` times the optimizer's."""

import os

import keras
import numpy as np
import pytest

import keras_lora
from helpers import randomize_factors, to_numpy


def _model():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, activation="tanh", name="hidden")(inputs)
    outputs = keras.layers.Dense(1, name="out")(hidden)
    model = keras.Model(inputs, outputs, name="plus")
    keras_lora.enable_lora(model, rank=2, targets=["hidden"], train_layers=["out"])
    randomize_factors(model)  # B != 0, so A gets a gradient too
    return model


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(8, 6)).astype("float32"), rng.normal(size=(8, 1))


def _one_step(optimizer):
    """Each trainable variable's change after one full-batch `fit` step."""
    keras.utils.set_random_seed(7)
    model = _model()
    x, y = _data()
    before = {v.path: to_numpy(v) for v in model.trainable_weights}
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    return {v.path: to_numpy(v) - before[v.path] for v in model.trainable_weights}


@pytest.mark.parametrize(
    "make",
    [
        lambda: keras.optimizers.SGD(0.05),
        lambda: keras.optimizers.SGD(0.05, momentum=0.9),
        lambda: keras.optimizers.Adam(1e-3),
        lambda: keras.optimizers.AdamW(1e-3, weight_decay=0.1),
    ],
    ids=["sgd", "sgd_momentum", "adam", "adamw"],
)
def test_first_step_moves_b_ratio_times_and_everything_else_the_same(make):
    plain = _one_step(make())
    plus = _one_step(keras_lora.LoRAPlus(make(), ratio=16))
    assert sorted(plain) == sorted(plus)
    for path, step in plain.items():
        assert np.abs(step).max() > 0, path
        expected = 16 * step if path.endswith("lora_b") else step
        np.testing.assert_allclose(plus[path], expected, rtol=1e-4, atol=1e-7)


def test_save_and_load_model_keep_the_wrapper(tmp_path):
    model = _model()
    x, y = _data()
    model.compile(
        optimizer=keras_lora.LoRAPlus(keras.optimizers.Adam(1e-3), ratio=4),
        loss="mse",
    )
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    path = os.path.join(tmp_path, "plus.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    optimizer = loaded.optimizer
    assert isinstance(optimizer, keras_lora.LoRAPlus) and optimizer.ratio == 4.0
    assert isinstance(optimizer.inner_optimizer, keras.optimizers.Adam)
    assert int(to_numpy(optimizer.iterations)) == 2
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), atol=1e-6)
    loaded.fit(x, y, batch_size=4, epochs=1, verbose=0)  # training resumes
    assert int(to_numpy(optimizer.iterations)) == 4


def test_config_round_trip_and_learning_rate():
    optimizer = keras_lora.LoRAPlus(keras.optimizers.SGD(0.1), ratio=8)
    clone = keras_lora.LoRAPlus.from_config(optimizer.get_config())
    assert clone.ratio == 8.0 and isinstance(
        clone.inner_optimizer, keras.optimizers.SGD
    )
    assert float(to_numpy(clone.learning_rate)) == pytest.approx(0.1)
    clone.learning_rate = 0.01  # callbacks such as ReduceLROnPlateau do this
    assert float(to_numpy(clone.inner_optimizer.learning_rate)) == pytest.approx(0.01)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"optimizer": "adam"}, "`optimizer` must be a Keras optimizer"),
        ({"ratio": 0}, "`ratio` must be a positive number"),
        ({"ratio": True}, "`ratio` must be a positive number"),
        ({"clipnorm": 1.0}, "set other options on the wrapped optimizer"),
    ],
)
def test_invalid_arguments(kwargs, match):
    kwargs.setdefault("optimizer", keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match=match):
        keras_lora.LoRAPlus(**kwargs)


def test_enable_lora_after_training_with_the_wrapper_keeps_it():
    # `enable_lora` on a compiled, trained model gives it an unbuilt copy of
    # its optimizer for the new trainable set (from get_config/from_config).
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(inputs))
    x, y = _data()
    model.compile(optimizer=keras_lora.LoRAPlus(keras.optimizers.SGD(0.1)), loss="mse")
    model.fit(x, y, epochs=1, verbose=0)
    keras_lora.enable_lora(model, rank=1, targets="all-linear")
    assert isinstance(model.optimizer, keras_lora.LoRAPlus)
    assert model.optimizer.ratio == 16.0 and not model.optimizer.built
    model.fit(x, y, epochs=1, verbose=0)
    assert np.abs(to_numpy(model.get_layer("out").lora_b)).max() > 0
