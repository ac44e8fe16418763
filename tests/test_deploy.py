"""Deployment (issue 22): LoRA models in the serving formats Keras exports.

Each artifact is loaded with its format's own runtime (`deploy_helpers`) and
compared with the live LoRA model. One tiny model per module (Embedding,
Conv2D, a multi-axis EinsumDense and a Dense, all adapted), so the cost is the
exporters' own. Where Keras or a runtime cannot take a case, the test skips
with the reason, as listed in docs/deploy.md. KerasHub tasks:
test_deploy_keras_hub.py.
"""

import os

import keras
import numpy as np
import pytest

import keras_lora
from deploy_helpers import (
    BACKEND,
    FORMATS,
    SUFFIX,
    export_kwargs,
    run_artifact,
    skip_on_this_backend,
)
from helpers import randomize_factors

pytestmark = pytest.mark.usefixtures("no_openvino_telemetry")

# (format, backend) -> why the live (unmerged) model does not export.
LIVE_NOT = {
    ("openvino", "torch"): (
        "torch.jit.trace's check, run by Keras's OpenVINO export, fails on the "
        "live model: 'Graphs differed across invocations'"
    ),
}
# (format, backend) -> why a re-quantized int8 artifact does not run.
INT8_NOT = {
    ("onnx", "jax"): (
        "jax2onnx writes the int8 EinsumDense as an int8 Einsum node, which "
        "onnxruntime does not implement"
    ),
    ("onnx", "torch"): (
        "torch.onnx cannot export the `aten::ravel` of Keras's int8 quantized call"
    ),
    ("litert", "tensorflow"): (
        "the TFLite converter refuses Keras's int8 matmul ('tfl.fully_connected' "
        "op operand #0 must be ... float or QI8 ..., but got i8)"
    ),
    ("openvino", "tensorflow"): (
        "OpenVINO converts Keras's int8 graph but runs it to wrong outputs "
        "(about 1e-6 where the model gives 0.05)"
    ),
    ("openvino", "torch"): (
        "torch.jit.trace's check, run by Keras's OpenVINO export, fails on the "
        "plain int8 model: 'Graphs differed across invocations'"
    ),
}


def _skip_unless_supported(fmt, quantize=None, live=False):
    skip_on_this_backend(fmt)
    reason = None
    if quantize == "int8":
        reason = INT8_NOT.get((fmt, BACKEND))
    if reason is None and live:
        reason = LIVE_NOT.get((fmt, BACKEND))
    if reason is not None:
        pytest.skip(reason)


def _lora_model():
    """Embedding -> Conv2D -> EinsumDense (3 axes in, 2 out) -> Dense."""
    layers = keras.layers
    tokens = keras.Input((5,), dtype="int32", name="tokens")
    h = layers.Embedding(20, 8, name="emb")(tokens)
    h = layers.Reshape((5, 8, 1))(h)
    h = layers.Conv2D(3, 3, name="conv")(h)  # (3, 6, 3)
    h = layers.Reshape((3, 18))(h)
    h = layers.EinsumDense("abc,cde->abde", (None, 2, 4), name="qkv")(h)
    h = layers.Reshape((3, 8))(h)
    outputs = layers.Dense(2, name="out")(h)
    model = keras.Model(tokens, outputs)
    keras_lora.enable_lora(model, rank=2, targets=["emb", "conv", "qkv", "out"])
    randomize_factors(model)
    return model


@pytest.fixture(scope="module")
def model():
    return _lora_model()


def _tokens(batch=3, seed=0):
    return np.random.default_rng(seed).integers(0, 20, (batch, 5)).astype("int32")


def _expected(model, x):
    return keras.ops.convert_to_numpy(model(x))


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_live_model_exports_with_its_outputs(model, fmt, tmp_path):
    """The factors stay separate in the artifact (adapter swappable later).
    On jax, ONNX failed before issue 22 with "reshape with symbolic dimensions
    requires mapping to input axes" (the multi-axis EinsumDense's path)."""
    _skip_unless_supported(fmt, live=True)
    path = str(tmp_path / f"live{SUFFIX[fmt]}")
    # `model.export` with the signature Keras reads (the model never called).
    keras_lora.export_serving(
        model, path, format=fmt, merge=False, **export_kwargs(fmt)
    )
    x = _tokens(batch=3)
    np.testing.assert_allclose(
        run_artifact(fmt, path, x), _expected(model, x), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_export_serving_writes_the_merged_model(model, fmt, quantize, tmp_path):
    """`export_serving` merges, reloads and exports without a first call
    (Keras's ONNX exporter refuses a reloaded model: "has never called")."""
    _skip_unless_supported(fmt, quantize)
    path = str(tmp_path / f"merged{SUFFIX[fmt]}")
    written = keras_lora.export_serving(
        model, path, format=fmt, quantize=quantize, **export_kwargs(fmt)
    )
    assert written == path
    x = _tokens(batch=2, seed=1)
    served = run_artifact(fmt, path, x)
    expected = _expected(model, x)
    if quantize is None:
        np.testing.assert_allclose(served, expected, atol=1e-5, rtol=1e-5)
    else:
        # Keras's int8 rounding (weights and activations) on top of the merge.
        np.testing.assert_allclose(served, expected, atol=0.02)
        assert np.abs(served - expected).max() > 0  # it is the int8 model
    written = {os.path.basename(path)} | (
        {"merged.bin"} if fmt == "openvino" else set()
    )
    assert set(os.listdir(tmp_path)) == written  # nothing else left


def test_export_serving_rejects_bad_arguments(model, tmp_path):
    with pytest.raises(ValueError, match="format='savedmodel'"):
        keras_lora.export_serving(model, str(tmp_path / "m"), format="savedmodel")
    with pytest.raises(ValueError, match="merge=False, quantize='int8'"):
        keras_lora.export_serving(
            model, str(tmp_path / "m"), merge=False, quantize="int8"
        )
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def multi_adapter_model():
    """Three named adapters of ranks 1, 2, 3 on Embedding, EinsumDense, Dense."""
    layers = keras.layers
    tokens = keras.Input((5,), dtype="int32", name="tokens")
    h = layers.Embedding(20, 8, name="emb")(tokens)
    h = layers.EinsumDense("abc,cde->abde", (None, 2, 4), name="qkv")(h)
    h = layers.Reshape((5, 8))(h)
    model = keras.Model(tokens, layers.Dense(3, name="out")(h))
    for rank, name in enumerate(["a", "b", "c"], 1):
        keras_lora.add_adapter(model, name, rank=rank, targets=["emb", "qkv", "out"])
    rng = np.random.default_rng(0)
    for layer in keras_lora.lora_layers(model):
        for name in layer.lora_adapter_names:  # fresh B is zero: random factors
            for factor in (layer.lora_adapter(name).a, layer.lora_adapter(name).b):
                factor.assign(rng.normal(0, 0.2, factor.shape).astype("float32"))
    keras_lora.set_adapter(model, "b")
    return model


@pytest.mark.parametrize("fmt", ["onnx", "tf_saved_model"])
def test_one_artifact_serves_each_example_with_its_adapter(
    multi_adapter_model, fmt, tmp_path
):
    _skip_unless_supported(fmt)
    model = multi_adapter_model
    path = str(tmp_path / f"adapters{SUFFIX[fmt]}")
    keras_lora.export_multi_adapter(model, path, format=fmt)
    x = _tokens(batch=5, seed=2)
    ids = np.array([2, 0, 3, 1, 0], "int32")  # 3: no adapter (the base)
    alone = []
    for name in ["a", "b", "c", None]:
        keras_lora.set_adapter(model, name)
        alone.append(_expected(model, x))
    keras_lora.set_adapter(model, "b")
    expected = np.stack([alone[i][k] for k, i in enumerate(ids)])
    gaps = [np.abs(a - b).max() for i, a in enumerate(alone) for b in alone[i + 1 :]]
    assert min(gaps) > 1e-3, gaps  # the ids matter: four different models
    np.testing.assert_allclose(run_artifact(fmt, path, x, ids), expected, atol=1e-5)
    # The live model is as it was: adapter "b" alone.
    np.testing.assert_allclose(_expected(model, x), alone[1], atol=1e-6)


def test_a_failed_export_leaves_the_old_artifact_and_nothing_else(model, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"the old artifact")
    wrong = [keras.InputSpec(shape=(None, 7, 3), dtype="float32", name="tokens")]
    with pytest.raises(Exception):  # noqa: B017 (each backend's tracer its own)
        keras_lora.export_serving(
            model, str(path), format="onnx", merge=False, input_signature=wrong
        )
    assert path.read_bytes() == b"the old artifact"
    assert os.listdir(tmp_path) == ["model.onnx"]
