"""`enable_lora(..., init=...)`: PEFT's gaussian start (A ~ N(0, 1/r), B zero) and
PiSSA/OLoRA (factors from W, residual in the kernel, adapters for the original base)."""

import keras
import numpy as np
import pytest

import keras_lora
from helpers import to_numpy
from keras_lora import adapters, transform


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


# PiSSA / OLoRA: the factors start from W, the kernel keeps W - s·A·B.


def _residual_model():
    """A conv, a Dense and an EinsumDense (no group axes): every layer type
    PiSSA/OLoRA start."""
    inputs = keras.Input((5, 5, 2))
    x = keras.layers.Conv2D(6, 3, name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(10, activation="tanh", name="dense")(x)
    x = keras.layers.EinsumDense("ab,bcd->acd", (2, 4), bias_axes="cd", name="ein")(x)
    return keras.Model(inputs, x, name="residual_model")


_X = np.random.default_rng(0).normal(size=(6, 5, 5, 2)).astype("float32")
_Y = np.random.default_rng(1).normal(size=(6, 2, 4)).astype("float32")
_TARGETS = ["conv", "dense", "ein"]


def _assert_close(actual, expected, tol=1e-5):
    """≤ tol relative to the largest entry of `expected`."""
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)


def _adapted(init, **kwargs):
    """(model adapted with `init`, its original weights, base outputs)."""
    model = _residual_model()
    weights = model.get_weights()
    base = to_numpy(model(_X))
    keras_lora.enable_lora(model, rank=3, targets=_TARGETS, init=init, **kwargs)
    return model, weights, base


def _trained(model):
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    model.fit(_X, _Y, epochs=3, batch_size=6, verbose=0)
    return to_numpy(model(_X))


def _original_base(weights):
    fresh = _residual_model()
    fresh.set_weights(weights)
    return fresh


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_starts_at_the_base_with_w_in_the_factors(init):
    model, weights, base = _adapted(init, alpha=6)
    _assert_close(to_numpy(model(_X)), base)
    for path, original in zip(_TARGETS, (weights[0], weights[2], weights[4])):
        layer = model.get_layer(path)
        assert layer.get_config()["init"] == init
        assert to_numpy(layer.lora_b).any()  # not a zero start
        np.testing.assert_array_equal(
            to_numpy(layer.lora_a_initial), to_numpy(layer.lora_a)
        )
        kernel = to_numpy(layer.kernel)
        update = layer.lora_scale * np.einsum(
            layer.lora_merge_equation, to_numpy(layer.lora_a), to_numpy(layer.lora_b)
        )
        assert np.abs(kernel - original).max() > 0.1  # the kernel is W_res
        _assert_close(kernel + update, original)
    assert model._keras_lora_spec["layers"]["dense"]["init"] == init


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_saved_adapter_applies_to_the_original_base(init, use_rslora, tmp_path):
    model, weights, base = _adapted(init, alpha=6, use_rslora=use_rslora)
    trained = _trained(model)
    assert np.abs(trained - base).max() > 1e-2
    filepath = str(tmp_path / "task.adapter.keras")
    with pytest.warns(UserWarning, match=r"original base .* \(rank 3 -> 6\)"):
        keras_lora.save_adapter(model, filepath)
    spec = adapters.read_adapter_config(filepath)["spec"]
    assert spec["layers"]["dense"]["rank"] == 6
    assert "init" not in spec["layers"]["dense"]
    fresh = _original_base(weights)
    keras_lora.load_adapter(fresh, filepath)
    dense = fresh.get_layer("dense")
    assert dense.rank == 6 and dense.lora_init is None
    assert dense.lora_scale == pytest.approx(model.get_layer("dense").lora_scale)
    _assert_close(to_numpy(fresh(_X)), trained)
    np.testing.assert_array_equal(to_numpy(dense.kernel), weights[2])


def _peft_factors(weight, init, rank, alpha):
    """PEFT's own PiSSA/OLoRA on a torch Linear holding `weight` (d_in, d_out):
    (W_res, s·A·B), both in our (d_in, d_out) layout."""
    import peft
    import torch

    linear = torch.nn.Linear(*weight.shape, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(weight.T.copy()))
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=["0"], init_lora_weights=init
    )
    wrapped = peft.get_peft_model(torch.nn.Sequential(linear), config)
    layer = wrapped.base_model.model[0]
    a = layer.lora_A["default"].weight.detach().numpy()  # (r, d_in)
    b = layer.lora_B["default"].weight.detach().numpy()  # (d_out, r)
    residual = layer.base_layer.weight.detach().numpy().T
    return residual, layer.scaling["default"] * (b @ a).T


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_factors_match_peft(init):
    inputs = keras.Input((12,))
    model = keras.Model(inputs, keras.layers.Dense(10, name="dense")(inputs))
    weight = to_numpy(model.get_layer("dense").kernel).copy()
    keras_lora.enable_lora(model, rank=4, alpha=8, targets=["dense"], init=init)
    dense = model.get_layer("dense")
    update = dense.lora_scale * to_numpy(dense.lora_a) @ to_numpy(dense.lora_b)
    residual, peft_update = _peft_factors(weight, init, rank=4, alpha=8)
    _assert_close(update, peft_update)
    _assert_close(to_numpy(dense.kernel), residual)


@pytest.mark.parametrize(
    "init,kwargs", [("pissa", {}), ("olora", {}), ("pissa", {"use_dora": True})]
)
def test_disable_lora_gives_the_original_base(init, kwargs):
    model, _, base = _adapted(init, **kwargs)
    if kwargs:  # DoRA's magnitude ‖W_res + s·A·B‖ = ‖W‖: still the base
        _assert_close(to_numpy(model(_X)), base)
    trained = _trained(model)
    with keras_lora.disable_lora(model):
        _assert_close(to_numpy(model(_X)), base)
    np.testing.assert_array_equal(to_numpy(model(_X)), trained)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_merge_gives_the_trained_model_and_revert_the_base(init, tmp_path):
    model, _, base = _adapted(init)
    trained = _trained(model)
    # export_merged and merge_lora write W_res + s·A·B.
    filepath = str(tmp_path / "merged.keras")
    keras_lora.export_merged(model, filepath)
    _assert_close(to_numpy(keras.saving.load_model(filepath)(_X)), trained)
    merged_model, _, _ = _adapted(init)
    merged_model.set_weights(model.get_weights())
    keras_lora.merge_lora(merged_model)
    assert not keras_lora.lora_layers(merged_model)
    _assert_close(to_numpy(merged_model(_X)), trained)
    # Reverting without merging drops the update: W_res + s·A0·B0 = W.
    transform.revert(model, merge=False)
    assert not keras_lora.lora_layers(model)
    _assert_close(to_numpy(model(_X)), base)


def test_model_save_round_trip_keeps_residual_and_starting_factors(tmp_path):
    model, weights, _ = _adapted("pissa", alpha=6)
    trained = _trained(model)
    filepath = str(tmp_path / "pissa.keras")
    model.save(filepath)
    loaded = keras.saving.load_model(filepath)
    np.testing.assert_array_equal(to_numpy(loaded(_X)), trained)
    for path in _TARGETS:
        ours, theirs = model.get_layer(path), loaded.get_layer(path)
        assert theirs.lora_init == "pissa"
        for name in ("kernel", "lora_a", "lora_a_initial", "lora_b_initial"):
            np.testing.assert_array_equal(
                to_numpy(getattr(theirs, name)), to_numpy(getattr(ours, name))
            )
    adapter = str(tmp_path / "after_reload.adapter.keras")
    with pytest.warns(UserWarning, match="rank 3 -> 6"):
        keras_lora.save_adapter(loaded, adapter)
    fresh = _original_base(weights)
    keras_lora.load_adapter(fresh, adapter)
    _assert_close(to_numpy(fresh(_X)), trained)


def test_residual_init_refuses_embeddings_and_changes_nothing():
    # The Dense is adapted (and its kernel changed) before the embedding
    # fails: the rollback must put W back.
    numbers = keras.Input((4,), name="numbers")
    tokens = keras.Input((3,), dtype="int32", name="tokens")
    x = keras.layers.Dense(6, name="dense")(numbers)
    y = keras.layers.Flatten()(keras.layers.Embedding(20, 2, name="embed")(tokens))
    model = keras.Model([numbers, tokens], keras.layers.Concatenate()([x, y]))
    kernel = to_numpy(model.get_layer("dense").kernel).copy()
    with pytest.raises(ValueError, match="'embed' is an Embedding .*init='pissa'"):
        keras_lora.enable_lora(model, rank=2, targets=["dense", "embed"], init="pissa")
    assert not keras_lora.lora_layers(model)
    _assert_close(to_numpy(model.get_layer("dense").kernel), kernel)


def test_residual_init_refuses_group_axes():
    inputs = keras.Input((3, 8))
    layer = keras.layers.EinsumDense("abc,bcd->abd", (3, 5), name="grouped")
    model = keras.Model(inputs, layer(inputs))
    with pytest.raises(ValueError, match="'grouped' has group axes.*abc,bcd->abd"):
        keras_lora.enable_lora(model, rank=2, targets=["grouped"], init="olora")
    assert not keras_lora.lora_layers(model)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_residual_init_refuses_a_quantized_base(mode):
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(8, name="dense")(inputs))
    model.quantize(mode)
    with pytest.raises(ValueError, match=f"quantized \\({mode}\\).*quantize after"):
        keras_lora.enable_lora(model, rank=2, targets=["dense"], init="pissa")
    assert not keras_lora.lora_layers(model)


def test_quantize_after_pissa_saves_and_reloads(tmp_path):
    # QLoRA-style PiSSA: the residual is quantized, the factors stay float.
    inputs = keras.Input((16,))
    model = keras.Model(inputs, keras.layers.Dense(16, name="dense")(inputs))
    x = _X.reshape(6, -1)[:, :16]
    base = to_numpy(model(x))
    keras_lora.enable_lora(model, rank=2, targets=["dense"], init="pissa")
    model.quantize("int8")
    outputs = to_numpy(model(x))
    filepath = str(tmp_path / "pissa_int8.keras")
    model.save(filepath)
    loaded = keras.saving.load_model(filepath)
    assert loaded.get_layer("dense").quantization_mode == "int8"
    np.testing.assert_array_equal(to_numpy(loaded(x)), outputs)
    with keras_lora.disable_lora(loaded):  # int8(W_res) + s·A0·B0 ≈ W
        assert np.abs(to_numpy(loaded(x)) - base).max() < 0.05 * np.abs(base).max()


def test_save_peft_adapter_applies_to_the_original_base(tmp_path):
    """A PEFT folder of a PiSSA model holds s·(A·B - A0·B0) as rank-2r LoRA,
    so it loads onto the original KerasHub backbone (GPT-2's fused c_attn
    with q and v adapted: rank-stacked factors)."""
    from helpers import tiny_gpt2_backbone, token_batch

    batch = token_batch()
    model = tiny_gpt2_backbone()
    original = [to_numpy(v) for v in model.weights]
    keras_lora.enable_lora(model, rank=2, init="pissa")
    rng = np.random.default_rng(0)
    for layer in keras_lora.lora_layers(model):  # stands in for training
        for factor in (layer.lora_a, layer.lora_b):
            moved = to_numpy(factor) + rng.normal(0, 0.1, factor.shape)
            factor.assign(moved.astype("float32"))
    trained = to_numpy(model(batch))
    folder = str(tmp_path / "pissa_peft")
    with pytest.warns(UserWarning, match="PiSSA/OLoRA.*original base"):
        keras_lora.save_peft_adapter(model, folder)
    fresh = tiny_gpt2_backbone()
    for variable, value in zip(fresh.weights, original):
        variable.assign(value)
    base = to_numpy(fresh(batch))
    keras_lora.load_peft_adapter(fresh, folder)
    assert np.abs(trained - base).max() > 1e-3
    np.testing.assert_allclose(to_numpy(fresh(batch)), trained, atol=1e-5)
