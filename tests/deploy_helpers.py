"""The serving formats' runtimes, shared by the deployment tests (issue 22).

Each artifact is loaded with its format's own runtime (`onnxruntime`,
`tf.saved_model.load`, `torch.export.load`, `tf.lite.Interpreter`, OpenVINO).
"""

import keras
import pytest

BACKEND = keras.backend.backend()

# (format, backend) -> why Keras cannot export it there (docs/deploy.md).
NOT_ON_BACKEND = {
    ("tf_saved_model", "torch"): (
        "Keras exports a SavedModel from torch through torch_xla, whose wheels "
        "pin their own torch release (not torch 2.13 CPU)"
    ),
    ("torch", "jax"): "Keras's `format='torch'` runs on the torch backend only",
    ("torch", "tensorflow"): "Keras's `format='torch'` runs on the torch backend only",
    ("litert", "jax"): "Keras's LiteRT export runs on TensorFlow and torch only",
    ("litert", "torch"): (
        "Keras's LiteRT export from torch needs litert-torch, which pins older "
        "pydantic and typing_extensions: not in the test extras"
    ),
    ("openvino", "jax"): (
        "OpenVINO's converter reports unconverted operations in Keras's jax2tf "
        "graph (the plain merged model too)"
    ),
}
FORMATS = ["onnx", "tf_saved_model", "torch", "litert", "openvino"]
SUFFIX = {
    "onnx": ".onnx",
    "tf_saved_model": "",
    "torch": ".pt2",
    "litert": ".tflite",
    "openvino": ".xml",
}
RUNTIME = {"onnx": "onnxruntime", "openvino": "openvino"}


def export_kwargs(fmt, names=None):
    """A free batch size: Keras's torch export fixes it to 1 unless told.

    `names`: the input names of a model that takes a dict (a KerasHub task).
    """
    if fmt != "torch":
        return {}
    import torch

    batch = torch.export.Dim("batch", min=1, max=64)
    if names is not None:
        return {"dynamic_shapes": {name: {0: batch} for name in names}}
    return {"dynamic_shapes": {0: batch}}


def skip_on_this_backend(fmt):
    """Skips (with Keras's reason) a format this backend cannot export, or
    one whose runtime is not installed."""
    reason = NOT_ON_BACKEND.get((fmt, BACKEND))
    if reason is not None:
        pytest.skip(reason)
    if fmt in RUNTIME:
        pytest.importorskip(RUNTIME[fmt])


def run_artifact(fmt, path, *inputs):
    """The artifact's first output for `inputs`, computed by the format's runtime.

    `inputs`: arrays in the model's input order, or one dict of arrays by
    input name (a KerasHub task), matched to the artifact's own input names.
    """
    named = inputs[0] if len(inputs) == 1 and isinstance(inputs[0], dict) else None

    def ordered(names):  # the arrays in the artifact's input order
        if named is None:
            return list(inputs)
        return [named[_input_key(name, named)] for name in names]

    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path)
        names = [i.name for i in session.get_inputs()]
        return session.run(None, dict(zip(names, ordered(names))))[0]
    if fmt == "tf_saved_model":
        import tensorflow as tf

        loaded = tf.saved_model.load(path)  # kept: its variables die with it
        return (loaded.serve(named) if named else loaded.serve(*inputs)).numpy()
    if fmt == "litert":
        import tensorflow as tf

        interpreter = tf.lite.Interpreter(model_path=path)
        details = interpreter.get_input_details()
        values = ordered([detail["name"] for detail in details])
        for detail, value in zip(details, values):
            interpreter.resize_tensor_input(detail["index"], value.shape)
        interpreter.allocate_tensors()
        for detail, value in zip(details, values):
            interpreter.set_tensor(detail["index"], value)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    if fmt == "openvino":
        import openvino

        # float32 arithmetic (OpenVINO's CPU default on bf16-capable CPUs is bf16).
        compiled = openvino.Core().compile_model(
            path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
        )
        names = [i.get_any_name() for i in compiled.inputs]
        return compiled(ordered(names))[compiled.output(0)]
    import torch

    module = torch.export.load(path).module()
    if named is not None:
        tensors = {key: torch.as_tensor(value) for key, value in named.items()}
        return module(tensors).detach().numpy()
    return module(*map(torch.as_tensor, inputs)).detach().numpy()


def _input_key(name, named):
    """The key of `named` an artifact's input `name` stands for
    (`serving_default_token_ids:0` in LiteRT: `token_ids`)."""
    matches = [key for key in named if name == key or f"_{key}:" in name]
    if len(matches) != 1:
        raise ValueError(f"Input {name!r} matches {matches} of {sorted(named)}")
    return matches[0]
