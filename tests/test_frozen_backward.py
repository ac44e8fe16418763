"""Frozen float einsums: their input gradient is made in the backward pass."""

import keras
import numpy as np

import keras_lora
from helpers import randomize_factors, to_numpy
from keras_lora.layers import frozen_backward

DIM, HEADS, HEAD = 128, 4, 32  # each kernel 64 KB
EINSUM_CALL = keras.layers.EinsumDense.call


def _model(blocks):
    """Attention-like einsums (several output or input axes), LoRA on the first
    and the last: the first one's factors learn through the others' input
    gradients (the plain frozen ones' and the last LoRA layer's base)."""
    keras.utils.set_random_seed(5)
    inputs = keras.Input((DIM,))
    x = inputs
    for i in range(blocks):
        x = keras.layers.EinsumDense(
            "bd,dnh->bnh", (HEADS, HEAD), bias_axes="nh", name=f"split_{i}"
        )(x)
        x = keras.layers.EinsumDense(
            "bnh,nhd->bd", (DIM,), activation="gelu", name=f"join_{i}"
        )(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(x))
    keras_lora.enable_lora(model, rank=2, targets=["split_0", f"join_{blocks - 1}"])
    randomize_factors(model)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    return model


def test_frozen_einsums_train_as_keras(monkeypatch):
    """Same outputs and the same step as Keras's own einsum backward."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, DIM)).astype("float32")
    y = rng.normal(size=(3, 4)).astype("float32")
    lean = _model(2)
    if keras.backend.backend() == "torch":
        # Eager PyTorch keeps Keras's call: its tuned hot path is not touched.
        assert "call" not in lean.get_layer("join_0").__dict__
        assert frozen_backward.lean_call(EINSUM_CALL) is EINSUM_CALL
        return
    # The frozen plain einsum gets the lean call (the adapted one has it in
    # its class) where XLA schedules the step: JAX, and TensorFlow's `fit`.
    assert "call" in lean.get_layer("join_0").__dict__
    assert frozen_backward.is_lean(lean.get_layer("join_1"))
    keras_own = _model(2)
    before = {v.path: to_numpy(v) for v in lean.trainable_weights}
    lean_outputs = to_numpy(lean(x))
    lean.train_on_batch(x, y)
    with monkeypatch.context() as patch:
        patch.setattr(frozen_backward, "SCHEDULED", False)  # Keras's own path
        np.testing.assert_allclose(lean_outputs, to_numpy(keras_own(x)), atol=1e-6)
        keras_own.train_on_batch(x, y)
    for variable, reference in zip(lean.trainable_weights, keras_own.trainable_weights):
        step = before[variable.path] - to_numpy(variable)
        assert np.abs(step).max() > 0, variable.path
        np.testing.assert_allclose(
            step, before[variable.path] - to_numpy(reference), atol=1e-5
        )


def test_no_transposed_kernel_kept_for_backward():
    """XLA's temporaries of a step: at most a few kernels, not one per layer.

    Before, XLA made a transposed copy of every frozen einsum kernel for
    its input gradient at the start of the step and kept it until the
    backward pass reached the layer (issue 25). (At this tiny batch XLA also
    reads each `join` kernel through a copy in the forward pass.)
    """
    if keras.backend.backend() != "jax":
        return  # the figure is XLA's (JAX); the other test covers the gradient
    import jax

    from benchmarks.step_memory import compiled_footprint

    blocks, batch = 4, 2
    model = _model(blocks)
    model.optimizer.build(model.trainable_variables)
    x = jax.ShapeDtypeStruct((batch, DIM), np.float32)
    y = jax.ShapeDtypeStruct((batch, 4), np.float32)
    figures = compiled_footprint(model, x, y, jax.ShapeDtypeStruct((batch,), "f"))
    kernel_mb = DIM * HEADS * HEAD * 4 / 1e6
    # Before: 11.1 kernels (8 frozen ones); after: 4.1.
    assert figures["temp_mb"] < 6 * kernel_mb, figures
