"""DoRA (`use_dora=True`): the paper's maths, PEFT's gradients, the workflow."""

import os

import keras
import numpy as np
import pytest

import keras_lora
from helpers import tiny_gpt2_backbone, to_numpy, token_batch
from keras_lora import adapters
from keras_lora.layers.lora_settings import LoRASettings

_LORA_KEYS = LoRASettings.NAMES


def _layers():
    """(LoRA layer, input) pairs covering every layout DoRA handles."""
    rng = np.random.default_rng(0)
    x = lambda *shape: rng.normal(size=shape).astype("float32")  # noqa: E731
    bias = {"bias_initializer": "random_normal"}
    return {
        "dense": (keras_lora.LoRADense(5, rank=2, use_dora=True, **bias), x(3, 7)),
        "einsum_query": (
            keras_lora.LoRAEinsumDense(
                "btd,dnh->btnh",
                (None, 2, 3),
                bias_axes="nh",
                rank=2,
                use_dora=True,
                **bias,
            ),
            x(2, 4, 7),
        ),
        "einsum_output": (
            keras_lora.LoRAEinsumDense(
                "btnh,nhd->btd",
                (None, 5),
                bias_axes="d",
                rank=2,
                use_dora=True,
                **bias,
            ),
            x(2, 4, 2, 3),
        ),
        # The output lists the kernel's output axes in another order.
        "einsum_permuted": (
            keras_lora.LoRAEinsumDense(
                "abc,cde->abed",
                (None, 3, 2),
                bias_axes="ed",
                rank=2,
                use_dora=True,
                **bias,
            ),
            x(2, 4, 7),
        ),
        "conv2d": (
            keras_lora.LoRAConv2D(
                4, 3, strides=2, padding="same", rank=2, use_dora=True, **bias
            ),
            x(2, 7, 7, 3),
        ),
        # Keras 3.15's TensorFlow Conv2D adds a channels_first bias on the wrong
        # axis when the output's channels, height and width are all equal.
        "conv2d_channels_first": (
            keras_lora.LoRAConv2D(
                4, 3, data_format="channels_first", rank=2, use_dora=True, **bias
            ),
            x(2, 3, 8, 7),  # not square: see the note below
        ),
        "conv1d_causal": (
            keras_lora.LoRAConv1D(
                4, 3, padding="causal", rank=2, use_dora=True, **bias
            ),
            x(2, 8, 3),
        ),
    }


def _plain_twin(layer, kernel):
    """The base Keras class with the same config, `kernel` and bias."""
    config = {k: v for k, v in layer.get_config().items() if k not in _LORA_KEYS}
    plain = layer._lora_base.from_config(config)
    plain.build(layer._build_shapes_dict["input_shape"])
    plain.kernel.assign(kernel)
    plain.bias.assign(layer.bias)
    return plain


def _input_axes(layer):
    return tuple(layer._lora_kernel_input_axes())


@pytest.mark.parametrize("kind", list(_layers()))
def test_dora_equals_the_papers_weight_decomposition(kind):
    """y = x·W' + b with W' = m·(W + s·A·B)/‖W + s·A·B‖ (norm per output unit),
    computed here in NumPy and applied by the plain Keras layer."""
    layer, x = _layers()[kind]
    layer.build(x.shape)
    kernel = to_numpy(layer.kernel)
    # Fresh: m = ‖W‖ and B = 0, so the layer is its base.
    np.testing.assert_allclose(
        to_numpy(layer(x)), to_numpy(_plain_twin(layer, kernel)(x)), atol=1e-5
    )
    rng = np.random.default_rng(1)
    layer.lora_b.assign(rng.normal(0, 0.3, layer.lora_b.shape).astype("float32"))
    magnitude = rng.uniform(0.5, 1.5, layer.lora_magnitude.shape).astype("float32")
    layer.lora_magnitude.assign(magnitude)
    delta = np.einsum(
        layer.lora_merge_equation, to_numpy(layer.lora_a), to_numpy(layer.lora_b)
    )
    weight = kernel + layer.lora_scale * delta
    norm = np.sqrt(np.sum(weight**2, axis=_input_axes(layer), keepdims=True))
    expected_kernel = weight * magnitude.reshape(norm.shape) / norm
    np.testing.assert_allclose(
        to_numpy(layer.merged_kernel()), expected_kernel, atol=1e-5
    )
    expected = to_numpy(_plain_twin(layer, expected_kernel)(x))
    assert np.abs(expected - to_numpy(_plain_twin(layer, kernel)(x))).max() > 1e-2
    np.testing.assert_allclose(to_numpy(layer(x)), expected, atol=1e-5)


def _peft_dense_gradients(kernel, bias, a, b, magnitude, x, upstream, alpha):
    """PEFT's DoRA Linear: outputs and the gradients of Σ upstream·y."""
    import peft
    import torch

    linear = torch.nn.Linear(*kernel.shape)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(kernel.T))
        linear.bias.copy_(torch.tensor(bias))
    config = peft.LoraConfig(
        r=a.shape[1], lora_alpha=alpha, target_modules=["0"], use_dora=True
    )
    model = peft.get_peft_model(torch.nn.Sequential(linear), config)
    module = model.base_model.model[0]
    with torch.no_grad():
        module.lora_A["default"].weight.copy_(torch.tensor(a.T))
        module.lora_B["default"].weight.copy_(torch.tensor(b.T))
        module.lora_magnitude_vector["default"].weight.copy_(torch.tensor(magnitude))
    y = model(torch.tensor(x))
    (y * torch.tensor(upstream)).sum().backward()
    grads = (
        module.lora_A["default"].weight.grad.numpy().T,
        module.lora_B["default"].weight.grad.numpy().T,
        module.lora_magnitude_vector["default"].weight.grad.numpy(),
    )
    return y.detach().numpy(), grads


def test_dora_gradients_match_peft():
    """One SGD step (lr 1) moves A, B and m by minus PEFT's gradients: the
    norm is a constant in backward, as in PEFT and the paper's section 4.3."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 7)).astype("float32")
    upstream = rng.normal(size=(6, 5)).astype("float32")
    model = keras.Sequential([keras.Input((7,)), keras.layers.Dense(5, name="d")])
    model.get_layer("d").bias.assign(rng.normal(size=5).astype("float32"))
    keras_lora.enable_lora(model, rank=2, alpha=4, targets=["d"], use_dora=True)
    layer = model.get_layer("d")
    layer.lora_b.assign(rng.normal(0, 0.3, (2, 5)).astype("float32"))
    layer.lora_magnitude.assign(rng.uniform(0.5, 1.5, 5).astype("float32"))
    before = [to_numpy(v) for v in (layer.lora_a, layer.lora_b, layer.lora_magnitude)]
    peft_y, peft_grads = _peft_dense_gradients(
        to_numpy(layer.kernel), to_numpy(layer.bias), *before, x, upstream, alpha=4
    )
    np.testing.assert_allclose(to_numpy(model(x)), peft_y, atol=1e-5)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=_Dot(reduction="sum"))
    model.fit(x, upstream, batch_size=6, epochs=1, shuffle=False, verbose=0)
    after = [to_numpy(v) for v in (layer.lora_a, layer.lora_b, layer.lora_magnitude)]
    for name, old, new, grad in zip("ABm", before, after, peft_grads):
        np.testing.assert_allclose(old - new, grad, atol=1e-4, err_msg=name)


class _Dot(keras.losses.Loss):
    """Σ upstream·y: its gradient with respect to y is `upstream`."""

    def call(self, y_true, y_pred):
        return keras.ops.sum(y_true * y_pred, axis=-1)


def _small_model():
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(6, activation="relu", name="hidden")(h)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(h), name="small")


def test_dora_workflow_fit_files_merge_and_export(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 2, (8,))
    model = _small_model()
    base_values = [to_numpy(v) for v in model.weights]
    base_out = to_numpy(model(x))
    keras_lora.enable_lora(
        model,
        rank=2,
        targets=["conv", "hidden"],
        train_layers=["head"],
        use_dora=True,
        dropout=0.2,  # in training the base term runs again on the dropped input
    )
    np.testing.assert_allclose(to_numpy(model(x)), base_out, atol=1e-5)
    trainable = sorted(v.path for v in model.trainable_weights)
    assert trainable == sorted(
        [f"{n}/lora_{w}" for n in ("conv", "hidden") for w in ("a", "b", "magnitude")]
        + ["head/kernel", "head/bias"]
    )
    frozen = {v.path: to_numpy(v) for v in model.weights if "lora" not in v.name}
    magnitude = to_numpy(model.get_layer("hidden").lora_magnitude)
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=3, batch_size=4, verbose=0)
    for variable in model.weights:
        if "lora" not in variable.name and not variable.path.startswith("head"):
            np.testing.assert_array_equal(to_numpy(variable), frozen[variable.path])
    assert (
        np.abs(to_numpy(model.get_layer("hidden").lora_magnitude) - magnitude).max()
        > 1e-3
    )
    trained = to_numpy(model(x))
    assert np.abs(trained - base_out).max() > 1e-3
    with keras_lora.disable_lora(model):
        np.testing.assert_allclose(to_numpy(model(x)), base_out, atol=1e-5)
    np.testing.assert_array_equal(to_numpy(model(x)), trained)

    # The adapter file carries the magnitudes and says use_dora.
    path = os.path.join(tmp_path, "dora.adapter.keras")
    keras_lora.save_adapter(model, path)
    config = adapters.read_adapter_config(path)
    assert "conv/lora_magnitude" in config["weights"]
    assert config["spec"]["layers"]["conv"]["use_dora"] is True
    fresh = _small_model()
    for variable, value in zip(fresh.weights, base_values):
        variable.assign(value)
    keras_lora.load_adapter(fresh, path)
    np.testing.assert_allclose(to_numpy(fresh(x)), trained, atol=1e-5)
    # A model adapted without DoRA cannot take a DoRA adapter's values.
    plain_lora = _small_model()
    keras_lora.enable_lora(
        plain_lora, rank=2, targets=["conv", "hidden"], train_layers=["head"]
    )
    with pytest.raises(ValueError, match="use_dora=False in model .* use_dora=True"):
        keras_lora.load_adapter(plain_lora, path)

    # A saved model resumes with its magnitudes.
    saved = os.path.join(tmp_path, "model.keras")
    model.save(saved)
    reloaded = keras.saving.load_model(saved)
    assert reloaded.get_layer("conv").use_dora
    np.testing.assert_allclose(to_numpy(reloaded(x)), trained, atol=1e-5)

    # Export and merge: plain classes that compute W'.
    exported_path = os.path.join(tmp_path, "merged.keras")
    keras_lora.export_merged(model, exported_path)
    exported = keras.saving.load_model(exported_path)
    assert type(exported.get_layer("conv")) is keras.layers.Conv2D
    assert not any("lora" in v.name for v in exported.weights)
    np.testing.assert_allclose(to_numpy(exported(x)), trained, atol=1e-5)
    keras_lora.merge_lora(model)
    assert type(model.get_layer("hidden")) is keras.layers.Dense
    np.testing.assert_allclose(to_numpy(model(x)), trained, atol=1e-5)


def test_dora_on_a_keras_hub_backbone_and_quantized_bases():
    batch = token_batch()
    for quantize in (None, "int8", "int4"):
        backbone = tiny_gpt2_backbone(num_layers=1)
        if quantize:
            backbone.quantize(quantize)
        base_out = to_numpy(backbone(batch))
        keras_lora.enable_lora(backbone, rank=2, use_dora=True)
        query = backbone.transformer_layers[0]._self_attention_layer._query_dense
        assert query.use_dora and query.lora_magnitude.shape == (2, 16)
        np.testing.assert_allclose(to_numpy(backbone(batch)), base_out, atol=1e-4)
        rng = np.random.default_rng(0)
        for layer in keras_lora.lora_layers(backbone):
            layer.lora_b.assign(
                rng.normal(0, 0.1, layer.lora_b.shape).astype("float32")
            )
            m = to_numpy(layer.lora_magnitude)
            layer.lora_magnitude.assign(
                m * rng.uniform(0.8, 1.2, m.shape).astype("float32")
            )
        adapted = to_numpy(backbone(batch))
        assert np.abs(adapted - base_out).max() > 1e-3
        keras_lora.merge_lora(backbone)
        assert query.quantization_mode == quantize
        # int8/int4: the merged kernel is re-quantized (Keras's own quantizer),
        # within a fraction of the update itself.
        change = np.abs(adapted - base_out).max()
        tolerance = {None: 1e-4, "int8": 5e-2, "int4": 0.5 * change}[quantize]
        np.testing.assert_allclose(to_numpy(backbone(batch)), adapted, atol=tolerance)


def test_dora_refusals():
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="int32"),
            keras.layers.Embedding(10, 6, name="emb"),
            keras.layers.Dense(3, name="d"),
        ]
    )
    with pytest.raises(ValueError, match="DoRA adapts Dense.*'emb'"):
        keras_lora.enable_lora(model, rank=2, targets=["emb", "d"], use_dora=True)
    assert not keras_lora.lora_layers(model)
    with pytest.raises(
        ValueError, match="use_dora` must be a bool. Received: use_dora='yes'"
    ):
        keras_lora.enable_lora(model, rank=2, targets=["d"], use_dora="yes")
    x = np.arange(4, dtype="int32")[None]
    base = to_numpy(model(x))
    keras_lora.enable_lora(model, rank=2, targets=["d"], use_dora=True)
    with pytest.raises(ValueError, match="beside a DoRA"):
        keras_lora.add_adapter(model, "other", rank=2, targets=["d"])
    assert keras_lora.list_adapters(model) == ["default"]
    with pytest.raises(ValueError, match="uses DoRA.*weights=\\[0.5\\]"):
        keras_lora.set_adapter(model, ["default"], weights=[0.5])
    with pytest.raises(ValueError, match="uses DoRA, whose update is not additive"):
        model.get_layer("d").set_lora_active([("default", 0.5)])
    layer = model.get_layer("d")
    layer.lora_b.assign(np.full((2, 3), 0.5, "float32"))
    layer.lora_magnitude.assign(np.full((3,), 2.0, "float32"))
    adapted = to_numpy(model(x))
    keras_lora.set_adapter(model, None)  # the base alone
    np.testing.assert_allclose(to_numpy(model(x)), base, atol=1e-6)
    assert np.abs(adapted - base).max() > 1e-2
    keras_lora.set_adapter(model, "default")
    np.testing.assert_array_equal(to_numpy(model(x)), adapted)
    with pytest.raises(ValueError, match="DoRA or PiSSA.*use_dora=True"):
        with keras_lora.adapter_ids(model, ["default"]):
            pass


def test_dora_under_a_mixed_bfloat16_policy():
    """The norm and m are read as float32 inside the bf16 call (Keras would
    autocast them): a fresh layer is its base exactly, and m trains."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8)).astype("float32")
    y = rng.integers(0, 2, (16,))
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(6, name="d", dtype="mixed_bfloat16"),
            keras.layers.Dense(2, name="head"),
        ]
    )
    base = to_numpy(model(x))
    keras_lora.enable_lora(model, rank=2, targets=["d"], use_dora=True)
    np.testing.assert_array_equal(to_numpy(model(x)), base)
    layer = model.get_layer("d")
    assert layer.lora_magnitude.dtype == "float32"
    before = to_numpy(layer.lora_magnitude)
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert np.abs(to_numpy(layer.lora_magnitude) - before).max() > 1e-3
