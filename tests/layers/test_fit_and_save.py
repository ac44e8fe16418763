"""LoRA layers inside real models: `fit`, mixed precision, config and `.keras`."""

import keras
import numpy as np
import pytest

import keras_lora
from helpers import randomize_factors, to_numpy


def lora_model(dropout=0.0):
    """Embedding -> EinsumDense -> Dense, every one a LoRA layer."""
    ids = keras.Input((6,), dtype="int32")
    x = keras_lora.LoRAEmbedding(20, 8, rank=2, dropout=dropout, name="emb")(ids)
    x = keras_lora.LoRAEinsumDense(
        "abc,cde->abde", (None, 2, 4), rank=2, alpha=4, bias_axes="de", name="proj"
    )(x)
    x = keras.layers.Reshape((6, 8))(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    out = keras_lora.LoRADense(3, rank=2, dropout=dropout, name="head")(x)
    return keras.Model(ids, out)


def data(n=32):
    rng = np.random.default_rng(0)
    return rng.integers(0, 20, (n, 6)).astype("int32"), rng.integers(0, 3, (n,))


def snapshot(model):
    return {v.path: to_numpy(v).copy() for v in model.weights}


@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_changes_only_the_factors(jit_compile):
    model = lora_model(dropout=0.1)
    x, y = data()
    names = sorted(v.name for v in model.trainable_weights)
    assert names == ["lora_a"] * 3 + ["lora_b"] * 3
    before = snapshot(model)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    after = snapshot(model)
    for path, value in before.items():
        if path.endswith(("lora_a", "lora_b")):
            assert not np.array_equal(value, after[path]), path
        elif "seed" not in path:
            np.testing.assert_array_equal(value, after[path], err_msg=path)


def test_gradients_reach_only_the_factors():
    model = lora_model()
    randomize_factors(model)
    x, y = data(8)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    grads = gradients(model, x, y, loss_fn)
    assert set(grads) == {v.path for v in model.trainable_weights}
    assert all(np.abs(g).sum() > 0 for g in grads.values())


def gradients(model, x, y, loss_fn):
    backend = keras.backend.backend()
    variables = model.trainable_weights
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, variables)
    elif backend == "torch":
        loss = loss_fn(keras.ops.convert_to_tensor(y), model(x, training=True))
        model.zero_grad() if hasattr(model, "zero_grad") else None
        loss.backward()
        grads = [v.value.grad for v in variables]
    else:
        import jax

        def compute(trainable):
            out, _ = model.stateless_call(
                trainable, [v.value for v in model.non_trainable_weights], x
            )
            return loss_fn(y, out)

        grads = jax.grad(compute)([v.value for v in variables])
    return {v.path: to_numpy(g) for v, g in zip(variables, grads)}


def test_mixed_bfloat16_factors_stay_float32_and_learn():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = lora_model()
        x, y = data()
        for layer in keras_lora.lora_layers(model):
            assert layer.compute_dtype == "bfloat16"
            assert layer.lora_a.dtype == "float32" and layer.lora_b.dtype == "float32"
        before = snapshot(model)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x, y, epochs=2, batch_size=8, verbose=0)
        after = snapshot(model)
        for path in before:
            if path.endswith("lora_b"):
                assert not np.array_equal(before[path], after[path]), path
        assert keras.backend.standardize_dtype(model(x[:2]).dtype) == "bfloat16"
    finally:
        keras.config.set_dtype_policy("float32")


def test_bfloat16_layer_keeps_float32_factors():
    layer = keras_lora.LoRADense(8, rank=2, dtype="bfloat16")
    out = layer(np.ones((2, 4), "float32"))
    assert layer.kernel.dtype == "bfloat16"
    assert layer.lora_a.dtype == "float32"
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"


@pytest.mark.parametrize(
    "layer",
    [
        lambda: keras_lora.LoRADense(
            8, rank=2, alpha=3.0, dropout=0.2, use_rslora=True, activation="relu"
        ),
        lambda: keras_lora.LoRAEinsumDense(
            "abc,cde->abde", (None, 2, 4), rank=3, b_initializer="ones"
        ),
        lambda: keras_lora.LoRAEmbedding(10, 4, rank=2, alpha=1, mask_zero=True),
    ],
)
def test_config_round_trip(layer):
    layer = layer()
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    assert config["rank"] == layer.rank and config["alpha"] == layer._alpha_arg


def test_keras_file_round_trip_keeps_factors(tmp_path):
    model = lora_model(dropout=0.1)
    randomize_factors(model)
    x, _ = data(4)
    expected = to_numpy(model(x))
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(to_numpy(loaded(x)), expected, rtol=1e-6, atol=1e-6)
    for original, reloaded in zip(
        keras_lora.lora_layers(model), keras_lora.lora_layers(loaded)
    ):
        assert type(original) is type(reloaded)
        np.testing.assert_array_equal(
            to_numpy(original.lora_b), to_numpy(reloaded.lora_b)
        )
        assert np.abs(to_numpy(reloaded.lora_b)).sum() > 0  # not zeros, unlike Keras
        assert [v.name for v in reloaded.trainable_weights] == ["lora_a", "lora_b"]
