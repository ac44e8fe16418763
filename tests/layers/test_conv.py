"""LoRAConv1D/2D/3D: the factored update against ΔW applied by a plain conv,
and the whole workflow (enable, fit, merge, export, adapters) on a small CNN."""

import os

import keras
import numpy as np
import pytest

import keras_lora
from helpers import randomize_factors, to_numpy

# (class, input shape channels_last, kwargs): strides, padding, dilation.
CASES = [
    ("Conv1D", (2, 9, 3), {"strides": 2, "padding": "same"}),
    ("Conv1D", (2, 9, 3), {"padding": "causal", "dilation_rate": 2}),
    ("Conv2D", (2, 7, 6, 3), {"strides": (2, 1), "padding": "valid"}),
    ("Conv2D", (2, 7, 6, 3), {"padding": "same", "dilation_rate": 2}),
    ("Conv3D", (1, 5, 4, 4, 2), {"strides": 2, "padding": "same"}),
]


def _channels_first(shape):
    return (shape[0], shape[-1], *shape[1:-1])


def _pair(kind, input_shape, data_format, **kwargs):
    """A plain conv and its LoRA twin with the same base weights."""
    base = getattr(keras.layers, kind)(4, 3, data_format=data_format, **kwargs)
    lora = getattr(keras_lora, f"LoRA{kind}")(
        4, 3, rank=2, alpha=3.0, data_format=data_format, **kwargs
    )
    base.build(input_shape)
    lora.build(input_shape)
    lora._kernel.assign(base.kernel)
    lora.bias.assign(base.bias)
    return base, lora


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("kind, shape, kwargs", CASES)
def test_update_equals_kernel_shaped_delta_in_a_plain_conv(
    kind, shape, kwargs, data_format
):
    if data_format == "channels_first":
        shape = _channels_first(shape)
    base, lora = _pair(kind, shape, data_format, **kwargs)
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    # Fresh: B is zero, so the layer is its base exactly.
    np.testing.assert_array_equal(to_numpy(lora(x)), to_numpy(base(x)))
    randomize_factors(lora)
    delta = np.einsum(
        lora.lora_merge_equation, to_numpy(lora.lora_a), to_numpy(lora.lora_b)
    )
    assert delta.shape == tuple(base.kernel.shape)
    # The kernel-shaped ΔW, applied by the plain conv (W + s·ΔW).
    base.kernel.assign(to_numpy(base.kernel) + lora.lora_scale * delta)
    np.testing.assert_allclose(to_numpy(lora(x)), to_numpy(base(x)), atol=1e-5)


def test_layer_config_round_trip_and_rank():
    layer = keras_lora.LoRAConv2D(4, 3, rank=2, alpha=4.0, padding="same")
    layer.build((1, 5, 5, 3))
    assert isinstance(layer, keras.layers.Conv2D)
    assert layer.rank == 2 and layer.lora_scale == 2.0
    assert tuple(layer.lora_a.shape) == (3, 3, 3, 2)
    assert tuple(layer.lora_b.shape) == (2, 4)
    assert [v.name for v in layer.trainable_weights] == ["lora_a", "lora_b"]
    clone = keras_lora.LoRAConv2D.from_config(layer.get_config())
    assert clone.rank == 2 and clone.alpha == 4.0 and clone.padding == "same"


def test_grouped_convolution_is_refused():
    with pytest.raises(ValueError, match="grouped convolution.*groups=2"):
        keras_lora.LoRAConv2D(4, 3, rank=2, groups=2)
    model = keras.Sequential(
        [keras.Input((6, 6, 4)), keras.layers.Conv2D(4, 3, groups=2, name="g")]
    )
    with pytest.raises(ValueError, match="groups=2"):
        keras_lora.enable_lora(model, rank=2, targets=["g"])
    # Nothing changed: the layer is still a working plain Conv2D.
    assert type(model.layers[0]) is keras.layers.Conv2D
    assert model.layers[0].rank == 2 and not keras_lora.lora_layers(model)
    model(np.ones((1, 6, 6, 4), "float32"))


def small_cnn():
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, activation="relu", name="conv1"),
            keras.layers.Conv2D(4, 3, strides=2, padding="same", name="conv2"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2, name="head"),
        ],
        name="cnn",
    )


def test_targets_none_on_a_cnn_asks_which_layers():
    model = small_cnn()
    with pytest.raises(ValueError, match="targets='all-conv'.*targets=None"):
        keras_lora.enable_lora(model, rank=2)
    conv_only = keras.Sequential(
        [keras.Input((6, 3)), keras.layers.Conv1D(4, 3, name="c")], name="c1d"
    )
    with pytest.raises(ValueError, match="all-conv"):
        keras_lora.enable_lora(conv_only, rank=2)
    assert not keras_lora.lora_layers(model) and not keras_lora.lora_layers(conv_only)
    # "all-linear" stays linear-only: the head alone, asked for explicitly.
    keras_lora.enable_lora(model, rank=2, targets="all-linear")
    assert [lyr.name for lyr in keras_lora.lora_layers(model)] == ["head"]


def test_all_conv_fit_merge_export_and_adapter_round_trip(tmp_path):
    model = small_cnn()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 2, (8,))
    base_out = to_numpy(model(x))
    keras_lora.enable_lora(
        model, rank=2, targets="all-conv", train_layers=["head"], dropout=0.1
    )
    conv1 = model.get_layer("conv1")
    assert isinstance(conv1, keras_lora.LoRAConv2D)
    assert [lyr.name for lyr in keras_lora.lora_layers(model)] == ["conv1", "conv2"]
    np.testing.assert_array_equal(to_numpy(model(x)), base_out)
    frozen = {v.path: to_numpy(v) for v in model.weights if "lora" not in v.name}
    head = {v.path for v in model.get_layer("head").weights}
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    for variable in model.weights:
        if "lora" not in variable.name and variable.path not in head:
            np.testing.assert_array_equal(to_numpy(variable), frozen[variable.path])
    assert np.abs(to_numpy(conv1.lora_b)).max() > 0
    trained = to_numpy(model(x))
    assert np.abs(trained - base_out).max() > 1e-4
    with keras_lora.disable_lora(model):
        np.testing.assert_allclose(to_numpy(model(x)), base_out, atol=1e-6)

    # Adapter file onto a fresh model with the same base weights.
    adapter = os.path.join(tmp_path, "cnn_adapter.keras")
    keras_lora.save_adapter(model, adapter)
    fresh = small_cnn()
    for variable in fresh.weights:  # the base weights, head included
        variable.assign(frozen[variable.path])
    keras_lora.load_adapter(fresh, adapter)
    np.testing.assert_allclose(to_numpy(fresh(x)), trained, atol=1e-5)

    # Export: plain Conv2D layers, same outputs, live model untouched.
    path = os.path.join(tmp_path, "merged.keras")
    keras_lora.export_merged(model, path)
    exported = keras.saving.load_model(path)
    assert [type(lyr) for lyr in exported.layers[:2]] == [keras.layers.Conv2D] * 2
    np.testing.assert_allclose(to_numpy(exported(x)), trained, atol=1e-5)
    assert isinstance(model.get_layer("conv1"), keras_lora.LoRAConv2D)

    # Merge in place: plain classes with Keras's own `rank`, same outputs.
    keras_lora.merge_lora(model)
    conv1 = model.get_layer("conv1")
    assert type(conv1) is keras.layers.Conv2D and conv1.rank == 2
    np.testing.assert_allclose(to_numpy(model(x)), trained, atol=1e-5)


def test_saved_model_resumes_with_its_factors(tmp_path):
    inputs = keras.Input((6, 2))
    model = keras.Model(inputs, keras.layers.Conv1D(3, 3, name="c")(inputs))
    keras_lora.enable_lora(model, rank=2, targets="all-conv")
    randomize_factors(model)
    x = np.random.default_rng(1).normal(size=(2, 6, 2)).astype("float32")
    path = os.path.join(tmp_path, "lora1d.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.get_layer("c"), keras_lora.LoRAConv1D)
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), atol=1e-6)


def test_named_adapters_on_a_conv():
    model = keras.Sequential(
        [keras.Input((5, 5, 2)), keras.layers.Conv2D(3, 3, name="c")], name="seq2d"
    )
    x = np.random.default_rng(2).normal(size=(2, 5, 5, 2)).astype("float32")
    keras_lora.add_adapter(model, "one", rank=2, targets="all-conv")
    keras_lora.add_adapter(model, "two", rank=1, targets="all-conv")
    layer = model.get_layer("c")
    rng = np.random.default_rng(3)
    for name in ("one", "two"):
        adapter = layer.lora_adapter(name)
        for factor in (adapter.a, adapter.b):
            factor.assign(rng.normal(size=factor.shape).astype("float32"))
    keras_lora.set_adapter(model, "two")
    two = to_numpy(model(x))
    keras_lora.set_adapter(model, "one")
    assert np.abs(to_numpy(model(x)) - two).max() > 1e-3
    keras_lora.set_adapter(model, "two")
    np.testing.assert_allclose(to_numpy(model(x)), two, atol=1e-6)
    # The merged kernel of the active adapter gives the same outputs.
    keras_lora.merge_lora(model)
    np.testing.assert_allclose(to_numpy(model(x)), two, atol=1e-5)


def test_keras_hub_resnet_classifier(tmp_path):
    import keras_hub

    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        use_pre_activation=False,
        image_shape=(32, 32, 3),
    )
    model = keras_hub.models.ResNetImageClassifier(backbone=backbone, num_classes=3)
    x = np.random.default_rng(4).uniform(size=(2, 32, 32, 3)).astype("float32")
    base_out = to_numpy(model(x))
    with pytest.raises(ValueError, match="targets='all-conv'"):
        keras_lora.enable_lora(model, rank=2)
    keras_lora.enable_lora(model, rank=2, targets="all-conv")
    adapted = keras_lora.lora_layers(model)
    assert len(adapted) == 6 and all(
        isinstance(lyr, keras_lora.LoRAConv2D) for lyr in adapted
    )
    np.testing.assert_array_equal(to_numpy(model(x)), base_out)
    randomize_factors(model)
    trained = to_numpy(model(x))
    path = os.path.join(tmp_path, "resnet_merged.keras")
    keras_lora.export_merged(model, path)
    exported = keras.saving.load_model(path)
    np.testing.assert_allclose(to_numpy(exported(x)), trained, atol=1e-4)


def test_bfloat16_policy_keeps_float32_factors():
    layer = keras_lora.LoRAConv2D(4, 3, rank=2, dtype="mixed_bfloat16")
    x = np.random.default_rng(5).normal(size=(1, 6, 6, 3)).astype("float32")
    layer.build(x.shape)
    randomize_factors(layer)
    assert layer.lora_a.dtype == "float32" and layer.lora_b.dtype == "float32"
    y = layer(x)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    merged = to_numpy(keras.ops.conv(x, layer.merged_kernel(dtype="float32")))
    merged = merged + to_numpy(layer.bias)
    np.testing.assert_allclose(to_numpy(y).astype("float32"), merged, atol=0.1)
