"""Several threads calling one LoRA model (issue 21, item 1).

A serving thread, a `tf.data` map or a callback may call a model while another
thread does. A plain Keras model gives each caller its own outputs; so must a
LoRA model: a forward pass changes no layer state (the activation, a conv's
`rank`, the named adapter being computed are read per thread, never swapped).
"""

import threading
import time

import keras
import numpy as np

import keras_lora
from helpers import randomize_factors, to_numpy

SECONDS = 0.75  # per model: dozens of interleaved calls on 2 cores


def dense_model():
    keras.utils.set_random_seed(0)
    x = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu", name="a")(x)
    h = keras.layers.Dense(8, activation="tanh", name="b")(h)
    return keras.Model(x, keras.layers.Dense(3, name="c")(h))


def conv_model():
    keras.utils.set_random_seed(0)
    x = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(x)
    h = keras.layers.Flatten()(h)
    return keras.Model(x, keras.layers.Dense(3, activation="relu", name="d")(h))


def run_threads(model, inputs, expected, threads=4, seconds=SECONDS):
    """Each thread calls `model` on its own input until time is up; returns
    the number of calls whose outputs differed from the single-thread ones."""
    wrong, calls, errors = [0] * threads, [0] * threads, []
    start = threading.Barrier(threads)
    deadline = time.monotonic() + seconds

    def work(i):
        start.wait()
        try:
            while time.monotonic() < deadline:
                out = to_numpy(model(inputs[i % len(inputs)]))
                calls[i] += 1
                if not np.allclose(out, expected[i % len(inputs)], atol=1e-6):
                    wrong[i] += 1
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors, errors
    assert sum(calls) > 4 * threads  # the threads really overlapped
    return sum(wrong), sum(calls)


def inputs_and_outputs(model, shape, n=2):
    rng = np.random.default_rng(1)
    inputs = [rng.normal(size=shape).astype("float32") for _ in range(n)]
    # Negative and positive pre-activations: a skipped ReLU shows.
    return inputs, [to_numpy(model(x)) for x in inputs]


def test_threads_calling_one_dense_and_conv_model_get_their_own_outputs():
    cases = ((dense_model, (4, 6), None), (conv_model, (2, 6, 6, 2), ["conv", "d"]))
    for build, shape, targets in cases:
        model = build()
        model(np.zeros(shape, "float32"))
        keras_lora.enable_lora(model, rank=2, targets=targets)
        randomize_factors(model)
        inputs, expected = inputs_and_outputs(model, shape)
        wrong, calls = run_threads(model, inputs, expected)
        assert wrong == 0, f"{build.__name__}: {wrong} of {calls} calls wrong"
        # Nothing was left changed: the activations and the conv's rank.
        for layer in keras_lora.lora_layers(model):
            assert layer.activation is not None
            assert layer.rank == 2
        for x, y in zip(inputs, expected):
            np.testing.assert_allclose(to_numpy(model(x)), y, atol=1e-6)


def test_threads_calling_a_model_with_two_weighted_adapters():
    model = dense_model()
    model(np.zeros((4, 6), "float32"))
    keras_lora.enable_lora(model, rank=2)
    keras_lora.add_adapter(model, "two", rank=3)
    randomize_factors(model)
    rng = np.random.default_rng(2)
    for layer in keras_lora.lora_layers(model):
        for variable in layer.weights:
            if variable.name.endswith("_two"):
                variable.assign(rng.normal(0, 0.2, variable.shape))
    keras_lora.set_adapter(model, ["default", "two"], weights=[0.5, 2.0])
    inputs, expected = inputs_and_outputs(model, (4, 6))
    wrong, calls = run_threads(model, inputs, expected)
    assert wrong == 0, f"{wrong} of {calls} calls wrong"


def test_export_merged_beside_serving_threads(tmp_path):
    """The writing thread sees plain layers; the serving threads LoRA ones."""
    model = dense_model()
    model(np.zeros((4, 6), "float32"))
    keras_lora.enable_lora(model, rank=2)
    randomize_factors(model)
    inputs, expected = inputs_and_outputs(model, (4, 6))
    stop, exports, errors = threading.Event(), [], []

    def export_loop():
        try:
            while not stop.is_set():
                path = tmp_path / f"merged_{len(exports) % 2}.keras"
                exports.append(keras_lora.export_merged(model, path))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    writer = threading.Thread(target=export_loop)
    writer.start()
    try:
        wrong, calls = run_threads(model, inputs, expected, threads=2, seconds=1.2)
    finally:
        stop.set()
        writer.join()
    assert not errors, errors
    assert len(exports) >= 2
    assert wrong == 0, f"{wrong} of {calls} calls wrong beside export_merged"
    plain = keras.saving.load_model(exports[-1])
    assert not keras_lora.lora_layers(plain)
    for x, y in zip(inputs, expected):
        np.testing.assert_allclose(to_numpy(plain(x)), y, atol=1e-5)
    # The live model is still the LoRA model.
    assert len(keras_lora.lora_layers(model)) == 3
    assert all(type(v).__name__ for v in model.weights)


def test_threads_calling_a_quantized_base():
    """int8 and int4 bases: Keras's quantized call runs inside the layer."""
    for mode in ("int8", "int4"):
        model = dense_model()
        model(np.zeros((4, 6), "float32"))
        keras_lora.enable_lora(model, rank=2)
        model.quantize(mode)
        randomize_factors(model)
        inputs, expected = inputs_and_outputs(model, (4, 6))
        wrong, calls = run_threads(model, inputs, expected, seconds=1.0)
        assert wrong == 0, f"{mode}: {wrong} of {calls} calls wrong"
        for layer in keras_lora.lora_layers(model):
            assert isinstance(layer.lora_base_kernel, keras.Variable)  # not a tensor


def test_a_quantized_base_keeps_its_activation_and_bias():
    """Keras's quantized call hides them from a lean backward (issue 25's);
    the LoRA layer must get them back after every call."""
    model = dense_model()
    model(np.zeros((4, 6), "float32"))
    keras_lora.enable_lora(model, rank=2)
    model.quantize("int8")
    x = np.random.default_rng(3).normal(size=(4, 6)).astype("float32")
    model(x)
    model(x)
    activations = {layer.name: layer.activation for layer in model.layers[1:]}
    assert activations["a"] is keras.activations.relu
    assert activations["b"] is keras.activations.tanh
    assert all(layer.bias is not None for layer in model.layers[1:])
