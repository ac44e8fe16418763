"""LoRA on int8/int4 bases from `model.quantize` (QLoRA-style, issue 11).

For each mode and layer kind: outputs at step 0 equal the quantized base's;
`fit` lowers the loss and changes only the factors (the quantized kernels
keep their bytes); an adapter file round-trips exactly onto a freshly
quantized base; the merged export (float, and re-quantized) loads with plain
Keras and matches within the quantizer's own error; `model.save` /
`load_model` resumes with the same factors and optimizer state.
"""

import os

import keras
import numpy as np
import pytest

import keras_lora
from helpers import (
    SEQ,
    VOCAB,
    randomize_factors,
    tiny_gpt2_backbone,
    to_numpy,
    token_batch,
)

MODES = ["int8", "int4"]
KINDS = ["dense", "einsum", "embedding"]


def make(kind):
    """A small "pretrained" model (same weights every call) and its targets."""
    keras.utils.set_random_seed(11)
    if kind == "dense":
        inputs = keras.Input((16,))
        x = keras.layers.Dense(32, activation="relu", name="hidden")(inputs)
        model = keras.Model(inputs, keras.layers.Dense(4, name="head")(x))
        return model, ["hidden", "head"]
    if kind == "einsum":  # q/v EinsumDense of a KerasHub backbone
        return tiny_gpt2_backbone(num_layers=1), None
    inputs = keras.Input((SEQ,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, 16, name="tokens")(inputs)
    x = keras.layers.GlobalAveragePooling1D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(x))
    return model, ["tokens"]


def data(kind):
    rng = np.random.default_rng(3)
    if kind == "dense":
        return rng.random((8, 16)).astype("float32"), rng.random((8, 4))
    if kind == "einsum":
        return token_batch(4), rng.random((4, SEQ, 32)).astype("float32")
    return token_batch(8)["token_ids"], rng.random((8, 4)).astype("float32")


def quantized_base(kind, mode):
    model, targets = make(kind)
    model.quantize(mode)
    return model, targets


def frozen_values(model):
    return {v.path: to_numpy(v) for v in model.weights if not v.trainable}


def compile_(model):
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")


def quantizer_error(float_model, mode, x):
    """How far Keras's own `quantize(mode)` moves a float model's outputs."""
    reference = to_numpy(float_model(x))
    float_model.quantize(mode)
    return np.abs(to_numpy(float_model(x)) - reference).max()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_qlora_workflow(mode, kind, tmp_path):
    x, y = data(kind)
    model, targets = quantized_base(kind, mode)
    base = to_numpy(model(x))
    keras_lora.enable_lora(model, rank=4, targets=targets)
    adapted = keras_lora.lora_layers(model)
    assert adapted and all(layer.quantization_mode == mode for layer in adapted)
    assert all(layer.lora_a.dtype == "float32" for layer in adapted)
    # Step 0: exactly the quantized base.
    np.testing.assert_array_equal(to_numpy(model(x)), base)

    # fit lowers the loss and changes only the factors.
    frozen = frozen_values(model)
    kernels = [layer.lora_base_kernel for layer in adapted]
    assert all(k.dtype == "int8" for k in kernels)
    compile_(model)
    losses = model.fit(x, y, epochs=3, batch_size=len(y), verbose=0).history["loss"]
    assert losses[-1] < losses[0]
    for path, value in frozen_values(model).items():
        np.testing.assert_array_equal(value, frozen[path], err_msg=path)
    assert {v.path for v in model.trainable_weights} == {
        v.path for layer in adapted for v in (layer.lora_a, layer.lora_b)
    }
    live = to_numpy(model(x))

    # The adapter file onto a freshly quantized base: the same outputs.
    adapter = str(tmp_path / "adapter.keras")
    keras_lora.save_adapter(model, adapter)
    fresh, _ = quantized_base(kind, mode)
    keras_lora.load_adapter(fresh, adapter)
    np.testing.assert_allclose(to_numpy(fresh(x)), live, rtol=1e-6, atol=1e-6)

    # Merged export, float: plain Keras, within the quantizer's error.
    merged = str(tmp_path / "merged.keras")
    keras_lora.export_merged(model, merged)
    plain = keras.saving.load_model(merged)
    assert all(layer.quantization_mode is None for layer in plain._flatten_layers())
    assert not any("LoRA" in type(layer).__name__ for layer in plain._flatten_layers())
    merged_outputs = to_numpy(plain(x))
    error = quantizer_error(plain, mode, x)
    assert np.abs(merged_outputs - live).max() <= 3 * error + 1e-5

    # Re-quantized export: loads quantized, within the quantizer's own error.
    requantized = str(tmp_path / "merged-q.keras")
    keras_lora.export_merged(model, requantized, quantize="same")
    plain_q = keras.saving.load_model(requantized)
    modes = {layer.quantization_mode for layer in plain_q._flatten_layers()}
    assert mode in modes
    assert np.abs(to_numpy(plain_q(x)) - merged_outputs).max() <= error + 1e-5
    assert os.path.getsize(requantized) < os.path.getsize(merged) or kind != "einsum"

    # model.save / load_model: same factors and optimizer state, then resume.
    saved = str(tmp_path / "model.keras")
    model.save(saved)
    reloaded = keras.saving.load_model(saved)
    np.testing.assert_array_equal(to_numpy(reloaded(x)), live)
    assert [to_numpy(v) for v in reloaded.optimizer.variables] != []
    for a, b in zip(reloaded.optimizer.variables, model.optimizer.variables):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=a.path)
    if kind == "dense":  # one more compile: once is enough
        resumed = reloaded.fit(x, y, epochs=1, batch_size=len(y), verbose=0)
        assert resumed.history["loss"][0] < losses[0]


@pytest.mark.parametrize("mode", MODES)
def test_quantize_after_enable_lora(mode):
    """`model.quantize` on an adapted model quantizes the frozen base only."""
    x, _ = data("dense")
    first, targets = quantized_base("dense", mode)
    keras_lora.enable_lora(first, rank=4, targets=targets)
    randomize_factors(first)
    second, _ = make("dense")
    keras_lora.enable_lora(second, rank=4, targets=targets)
    for a, b in zip(keras_lora.lora_layers(first), keras_lora.lora_layers(second)):
        b.lora_a.assign(a.lora_a)
        b.lora_b.assign(a.lora_b)
    second.quantize(mode)
    for layer in keras_lora.lora_layers(second):
        assert layer.quantization_mode == mode
        assert layer.lora_base_kernel.dtype == "int8"
        assert layer.lora_a.dtype == "float32" and layer.lora_a.trainable
    # Both orders give the same model.
    np.testing.assert_allclose(
        to_numpy(second(x)), to_numpy(first(x)), rtol=1e-6, atol=1e-6
    )


def test_unsupported_modes_are_clear_errors():
    model, targets = quantized_base("dense", "float8")
    with pytest.raises(ValueError, match="float8"):
        keras_lora.enable_lora(model, rank=4, targets=targets)
    model, targets = make("dense")
    keras_lora.enable_lora(model, rank=4, targets=targets)
    with pytest.raises(ValueError, match="float8"):
        model.quantize("float8")


@pytest.mark.parametrize("mode", MODES)
def test_merge_lora_requantizes_in_place(mode, tmp_path):
    x, _ = data("dense")
    model, targets = quantized_base("dense", mode)
    keras_lora.enable_lora(model, rank=4, targets=targets)
    randomize_factors(model)
    with keras_lora.disable_lora(model):
        base = to_numpy(model(x))
    model.compile(keras.optimizers.Adam(), "mse")
    path = str(tmp_path / "same.keras")
    keras_lora.export_merged(model, path, quantize="same")
    expected = to_numpy(keras.saving.load_model(path)(x))
    keras_lora.merge_lora(model)
    assert not keras_lora.lora_layers(model)
    layer = model.get_layer("hidden")
    assert type(layer) is keras.layers.Dense and layer.quantization_mode == mode
    assert layer._kernel.dtype == "int8"
    np.testing.assert_allclose(to_numpy(model(x)), expected, rtol=1e-6, atol=1e-6)
    assert np.abs(to_numpy(model(x)) - base).max() > 1e-3  # the update is in


def test_disable_lora_and_eager_fit_on_int8():
    x, y = data("dense")
    model, targets = quantized_base("dense", "int8")
    base = to_numpy(model(x))
    keras_lora.enable_lora(model, rank=4, targets=targets)
    model.compile(keras.optimizers.Adam(1e-2), "mse", run_eagerly=True)
    losses = model.fit(x, y, epochs=3, batch_size=8, verbose=0).history["loss"]
    assert losses[-1] < losses[0]
    with keras_lora.disable_lora(model):
        np.testing.assert_array_equal(to_numpy(model(x)), base)


def test_merge_callback_on_int4(tmp_path):
    x, y = data("dense")
    model, targets = quantized_base("dense", "int4")
    keras_lora.enable_lora(model, rank=4, targets=targets)
    compile_(model)
    path, small = str(tmp_path / "merged.keras"), str(tmp_path / "merged-q.keras")
    callbacks = [
        keras_lora.MergeLoRA(path),
        keras_lora.MergeLoRA(small, quantize="same"),
    ]
    model.fit(x, y, epochs=1, verbose=0, callbacks=callbacks)
    assert keras.saving.load_model(small).get_layer("head").quantization_mode == "int4"
    # int4 is weight-only: the float export equals the live model.
    np.testing.assert_allclose(
        to_numpy(keras.saving.load_model(path)(x)),
        to_numpy(model(x)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_adapter_file_does_not_grow_on_a_quantized_base(tmp_path):
    sizes = {}
    for mode in (None, "int8"):
        model, targets = (
            make("dense") if mode is None else quantized_base("dense", mode)
        )
        keras_lora.enable_lora(model, rank=4, targets=targets)
        path = str(tmp_path / f"{mode}.keras")
        keras_lora.save_adapter(model, path)
        sizes[mode] = os.path.getsize(path)
    assert abs(sizes["int8"] - sizes[None]) < 512, sizes


def test_tied_int8_logits_learn_in_the_recipe_order():
    """`quantize("int8")` then `enable_lora` on a causal LM with tied logits.

    Keras quantizes the input of the tied logits projection with no gradient;
    keras-lora gives it the gradient through the dequantized table (same
    forward values), so LoRA below it learns.
    """
    import keras_hub

    keras.utils.set_random_seed(0)
    lm = keras_hub.models.GPT2CausalLM(backbone=tiny_gpt2_backbone(), preprocessor=None)
    lm.quantize("int8")
    x = token_batch(4)
    y = np.roll(x["token_ids"], -1, axis=1)
    base = to_numpy(lm(x))
    keras_lora.enable_lora(lm, rank=4)
    np.testing.assert_array_equal(to_numpy(lm(x)), base)
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    losses = lm.fit(x, y, epochs=6, batch_size=4, verbose=0).history["loss"]
    assert losses[-1] < losses[0] - 0.02, losses


@pytest.mark.parametrize(
    "config",
    [
        keras.quantizers.Int8QuantizationConfig(activation_quantizer=None),
        keras.quantizers.Int4QuantizationConfig(block_size=-1),
        keras.quantizers.Int4QuantizationConfig(block_size=8),
    ],
    ids=["int8", "int4-per-channel", "int4-block8"],
)
def test_dequantized_kernel_is_what_keras_computes(config):
    """x·dequant(W) equals Keras's own weight-only quantized output."""
    from keras_lora.layers import quantized

    x = np.random.default_rng(0).random((3, 5, 16)).astype("float32")
    for layer in (
        keras.layers.Dense(6),
        keras.layers.EinsumDense("abc,cde->abde", output_shape=(5, 2, 3)),
    ):
        layer.build(x.shape)
        layer.quantize(config=config)
        kernel = to_numpy(quantized.dequantized_kernel(layer))
        equation = "abc,cd->abd" if kernel.ndim == 2 else layer.equation
        np.testing.assert_allclose(
            np.einsum(equation, x, kernel), to_numpy(layer(x)), rtol=1e-5, atol=1e-5
        )
    ids = np.array([[1, 2, 3]])
    table = keras.layers.Embedding(10, 16)
    table.build()
    table.quantize(config=config)
    kernel = to_numpy(quantized.dequantized_kernel(table))
    np.testing.assert_allclose(kernel[ids], to_numpy(table(ids)), rtol=1e-6)


def test_a_model_loaded_from_a_quantized_file(tmp_path):
    """What an int8 KerasHub preset loads as: layers share a `DTypePolicyMap`.

    Keras 3.15 cannot re-save such a model by itself (its layers read the
    map's quantization mode, None, while saving); after `enable_lora` it saves,
    reloads and exports.
    """
    x, _ = data("einsum")
    model, _ = quantized_base("einsum", "int8")
    model.save(tmp_path / "int8.keras")
    model = keras.saving.load_model(tmp_path / "int8.keras")
    assert isinstance(model.dtype_policy, keras.dtype_policies.DTypePolicyMap)
    base = to_numpy(model(x))
    keras_lora.enable_lora(model, rank=4)
    np.testing.assert_array_equal(to_numpy(model(x)), base)
    randomize_factors(model)
    live = to_numpy(model(x))
    model.save(tmp_path / "adapted.keras")
    reloaded = keras.saving.load_model(tmp_path / "adapted.keras")
    np.testing.assert_array_equal(to_numpy(reloaded(x)), live)
    keras_lora.export_merged(model, tmp_path / "merged.keras", quantize="same")
    plain = keras.saving.load_model(tmp_path / "merged.keras")
    assert plain.get_layer("token_embedding").quantization_mode == "int8"
    assert np.abs(to_numpy(plain(x)) - live).max() < 0.05


def test_peft_adapter_onto_an_int4_backbone(tmp_path, monkeypatch):
    """A Hugging Face PEFT adapter loads onto a quantized KerasHub backbone."""
    pytest.importorskip("peft")
    import keras_hub

    from keras_lora.interop import safetensors_io

    # The PEFT tests' tiny Hugging Face models and adapters.
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "interop"))
    import test_peft as peft_tests

    hf = peft_tests.make_hf_model("gpt2")
    base_folder = peft_tests.save_base(hf, tmp_path / "base")
    peft_tests.peft_adapter("gpt2", hf, tmp_path / "adapter")
    x = {"token_ids": np.array([[1, 2, 3, 4]]), "padding_mask": np.ones((1, 4))}
    float_model = keras_hub.models.Backbone.from_preset(base_folder)
    keras_lora.load_peft_adapter(float_model, tmp_path / "adapter")
    backbone = keras_hub.models.Backbone.from_preset(base_folder)
    backbone.quantize("int4")
    keras_lora.load_peft_adapter(backbone, tmp_path / "adapter")
    assert all(
        lyr.quantization_mode == "int4" for lyr in keras_lora.lora_layers(backbone)
    )
    # Within int4's error of the float model with the same adapter.
    expected = to_numpy(float_model(x))
    assert np.abs(to_numpy(backbone(x)) - expected).max() < 0.1 * np.abs(expected).max()
    keras_lora.save_peft_adapter(
        backbone, tmp_path / "out", module_prefix="transformer."
    )
    original, _ = safetensors_io.read(
        tmp_path / "adapter" / "adapter_model.safetensors"
    )
    written, _ = safetensors_io.read(tmp_path / "out" / "adapter_model.safetensors")
    assert sorted(original) == sorted(written)
    for key in original:
        np.testing.assert_array_equal(original[key], written[key])


def test_export_float32_keeps_a_small_update_on_a_bf16_base(tmp_path):
    """Rounding W + s·A·B to bf16 loses a small update; dtype="float32" keeps it."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    head = keras.layers.Dense(64, dtype="bfloat16", use_bias=False, name="head")
    model = keras.Model(inputs, head(inputs))
    keras_lora.enable_lora(model, rank=4, targets=["head"])
    layer = model.get_layer("head")
    layer.lora_b.assign(np.full(layer.lora_b.shape, 1e-3, "float32"))
    x = np.random.default_rng(0).random((4, 64)).astype("float32")
    kernel = to_numpy(layer.merged_kernel("float32"))  # bf16 W + ΔW, in float32
    exact = x @ kernel
    errors = {}
    for dtype in (None, "float32"):
        path = str(tmp_path / f"{dtype}.keras")
        keras_lora.export_merged(model, path, dtype=dtype)
        plain = keras.saving.load_model(path)
        if dtype:
            assert plain.get_layer("head").dtype_policy.name == "float32"
        outputs = to_numpy(plain(x)).astype("float32")
        errors[dtype] = np.abs(outputs - exact).max()
    assert errors["float32"] < 1e-4 < errors[None], errors
