"""KerasHub tasks in the serving formats (issue 22, item 1(b)).

A tiny `GPT2CausalLM` and `BertTextClassifier` built from configs, LoRA on
their default targets (query and value), each built once per module. Each
(task, format, mode) case (CASES) exports once, runs in the format's own
runtime and is compared with the live LoRA task: "live" the unmerged model (`merge=False`),
"float" and "int8" `export_serving(..., quantize=None / "int8")`. A case that
cannot work skips with the reason; docs/deploy.md has the table. And the
merged GPT-2 as a KerasHub preset (`export_preset`), loaded by KerasHub alone.
"""

import os

import keras
import numpy as np
import pytest

import keras_lora
from deploy_helpers import (
    BACKEND,
    FORMATS,
    NOT_ON_BACKEND,
    SUFFIX,
    export_kwargs,
    run_artifact,
    skip_on_this_backend,
)
from helpers import SEQ, VOCAB, randomize_factors, to_numpy, token_batch

keras_hub = pytest.importorskip("keras_hub")

pytestmark = pytest.mark.usefixtures("no_openvino_telemetry")

MODES = ["live", "float", "int8"]

# (task, format, backend, mode) -> why it cannot work; None: any task or mode.
NOT_FOR_TASKS = {
    (None, "openvino", "torch", None): (
        "Keras's OpenVINO export from torch traces with torch.jit.trace, which "
        "refuses KerasHub's weights ('Cannot insert a Tensor that requires grad "
        "as a constant'): KerasHub's Task and Backbone set attributes past "
        "torch.nn.Module on torch, so their weights are no torch parameters of "
        "the task"
    ),
    ("gpt2", "onnx", "jax", None): (
        "jax2onnx's patched `jnp.arange` reads Keras's `jnp.arange(n, None)` (in "
        "KerasHub's causal mask) as a start and a None stop and fails, also "
        "with a fully static signature"
    ),
    ("bert", None, None, "int8"): (
        "KerasHub rebuilds BertTextClassifier's `logits` Dense from `num_classes` "
        "when it loads the task, without its int8 policy: a quantized task's "
        "`.keras` file does not load ('Layer logits expected 2 variables, but "
        "received 0'), without LoRA too"
    ),
    (None, "litert", "tensorflow", "int8"): (
        "the TFLite converter refuses Keras's int8 attention output ('tfl.squeeze' "
        "op attribute 'squeeze_dims' failed to satisfy constraint)"
    ),
    (None, "openvino", "tensorflow", "int8"): (
        "OpenVINO converts Keras's int8 graph but runs it to wrong outputs"
    ),
    (None, "onnx", "torch", "int8"): (
        "onnxruntime refuses the int8 task torch.onnx (dynamo) writes: 'Squeeze "
        "[ShapeInferenceError] Dimension of input 0 must be 1 instead of 16'"
    ),
}


def _reason(task, fmt, mode):
    for key, reason in NOT_FOR_TASKS.items():
        if all(k is None or k == v for k, v in zip(key, (task, fmt, BACKEND, mode))):
            return reason
    return None


# Both tasks' backbones: one block, hidden 16, sequences of 8 at most.
CONFIG = dict(
    vocabulary_size=VOCAB,
    num_layers=1,
    num_heads=2,
    hidden_dim=16,
    intermediate_dim=32,
    max_sequence_length=SEQ,
)


def _gpt2():
    backbone = keras_hub.models.GPT2Backbone(**CONFIG)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def _bert():
    backbone = keras_hub.models.BertBackbone(**CONFIG)
    return keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=2, preprocessor=None
    )


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """name -> (LoRA task, inputs, its outputs, its base preset folder), each
    task built once (its preset written before LoRA, as a base is shared)."""
    built = {}

    def get(name):
        if name not in built:
            task = {"gpt2": _gpt2, "bert": _bert}[name]()
            base = str(tmp_path_factory.mktemp(name) / "base")
            task.save_to_preset(base)
            x = token_batch(2)
            x["padding_mask"][1, -3:] = 0  # the mask input reaches the artifact
            if name == "bert":
                x["segment_ids"] = np.zeros_like(x["token_ids"])
            plain = to_numpy(task(x)).reshape(-1)
            keras_lora.enable_lora(task, rank=2)  # default targets: query, value
            randomize_factors(task)
            expected = to_numpy(task(x)).reshape(-1)
            # The adapter matters: an artifact without it would be far off.
            assert np.abs(expected - plain).max() > 1e-3 * np.abs(expected).max()
            built[name] = task, x, expected, base
        return built[name]

    return get


def _signature(x, fmt):
    """The input signature: Keras's own (batch and length free) on TensorFlow.

    jax: a fixed length (KerasHub's PositionEmbedding compares a symbolic one
    with its maximum: 'inconclusive'), and for ONNX a fixed batch too
    (jax2onnx's attention-mask Expand with a free batch fails in onnxruntime:
    'invalid expand shape'). torch: a fixed length; for ONNX a fixed batch too
    (with a free dimension Keras uses torch.onnx's TorchScript exporter, which
    refuses KerasHub's weights: see NOT_FOR_TASKS).
    """
    if BACKEND == "tensorflow":
        return None
    batch = 2 if fmt == "onnx" else None
    return [
        {
            name: keras.InputSpec(shape=(batch, SEQ), dtype="int32", name=name)
            for name in x
        }
    ]


# What runs, to keep the suite's time: GPT-2's live model in every format and
# BERT's in ONNX and the backend's main format; the merged float model in the
# main format (and GPT-2's in ONNX); int8 on TensorFlow. The merged model's
# path to a file (`export_serving`'s merge and reload) is the same for every
# format, its graph is part of the live one, and test_deploy.py exports both
# merged kinds of a small model to every format. Cases that cannot work are all
# kept (a skip costs nothing): each skips with its reason.
MAIN_FORMAT = "torch" if BACKEND == "torch" else "tf_saved_model"


def _runs(name, fmt, mode):
    if mode == "live":
        return name == "gpt2" or fmt in ("onnx", MAIN_FORMAT)
    if mode == "float":
        return fmt == MAIN_FORMAT or (name, fmt) == ("gpt2", "onnx")
    return fmt == MAIN_FORMAT and BACKEND == "tensorflow"


CASES = [
    (name, fmt, mode)
    for name in ("gpt2", "bert")
    for fmt in FORMATS
    for mode in MODES
    if _runs(name, fmt, mode)
    or (fmt, BACKEND) in NOT_ON_BACKEND
    or _reason(name, fmt, mode) is not None
]


@pytest.mark.parametrize("name, fmt, mode", CASES)
def test_a_keras_hub_task_exports_with_its_outputs(tasks, name, fmt, mode, tmp_path):
    """On torch, "live" failed before issue 22 in `torch.export` ("'<' not
    supported between instances of 'InputLayer' and 'GPT2CausalLM'"): LoRA's
    record of the compiled trainable state was a tracked dict keyed by layers."""
    skip_on_this_backend(fmt)
    reason = _reason(name, fmt, mode)
    if reason is not None:
        pytest.skip(reason)
    task, x, expected, _ = tasks(name)
    path = str(tmp_path / f"{name}{SUFFIX[fmt]}")
    keras_lora.export_serving(
        task,
        path,
        format=fmt,
        merge=mode != "live",
        quantize="int8" if mode == "int8" else None,
        input_signature=_signature(x, fmt),
        **export_kwargs(fmt, names=list(x)),
    )
    served = np.asarray(run_artifact(fmt, path, x)).reshape(-1)
    scale = np.abs(expected).max()
    if mode == "int8":
        # Keras's int8 rounding of weights and activations (about 1% here).
        np.testing.assert_allclose(served, expected, atol=0.05 * scale)
        assert np.abs(served - expected).max() > 0  # it is the int8 model
    else:
        np.testing.assert_allclose(served, expected, atol=1e-5 * scale, rtol=1e-5)


def test_a_merged_task_reloads_from_its_preset_without_keras_lora(tasks, tmp_path):
    lm, x, expected, base = tasks("gpt2")
    preset = str(tmp_path / "preset")
    assert keras_lora.export_preset(lm, preset) == preset
    again = keras_hub.models.GPT2CausalLM.from_preset(preset)
    assert not keras_lora.lora_layers(again)
    assert type(again) is keras_hub.models.GPT2CausalLM  # KerasHub's own class
    np.testing.assert_allclose(to_numpy(again(x)).reshape(-1), expected, atol=1e-5)
    # An adapter next to the base preset: one call onto `from_preset(dir)`.
    adapter = os.path.join(base, "adapter.keras")
    keras_lora.save_adapter(lm, adapter)
    task = keras_lora.load_adapter(
        keras_hub.models.GPT2CausalLM.from_preset(base), adapter
    )
    np.testing.assert_allclose(to_numpy(task(x)).reshape(-1), expected, atol=1e-5)
