"""The private Keras names in `keras_lora/keras_private.py` still do their job.

If one of these fails after a Keras upgrade, Keras moved or changed a private
name: find its new home in Keras's own `Embedding` (how it hands the padding
mask to the next layer) and update `keras_lora/keras_private.py` only.
"""

import ast
import os
import re

import keras
import numpy as np
from keras import ops

from keras_lora import keras_private

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "keras_lora")


class MaskRecorder(keras.layers.Layer):
    """Returns its input and keeps the mask Keras gave it."""

    def __init__(self):
        super().__init__()
        self.supports_masking = True

    def call(self, inputs, mask=None):
        self.mask = mask
        return inputs


def test_set_keras_mask_reaches_the_next_layer():
    outputs = ops.ones((2, 3, 4))
    mask = np.array([[True, True, False], [True, False, False]])
    keras_private.set_keras_mask(outputs, ops.convert_to_tensor(mask))
    recorder = MaskRecorder()
    recorder(outputs)
    assert recorder.mask is not None, (
        "keras_private.set_keras_mask no longer hands a mask to the next layer"
    )
    np.testing.assert_array_equal(ops.convert_to_numpy(recorder.mask), mask)


def test_set_keras_mask_is_what_keras_embedding_uses():
    # Keras's Embedding(mask_zero=True) gives the next layer the same mask.
    ids = np.array([[3, 1, 0], [2, 0, 0]])
    recorder = MaskRecorder()
    recorder(keras.layers.Embedding(5, 4, mask_zero=True)(ids))
    np.testing.assert_array_equal(ops.convert_to_numpy(recorder.mask), ids != 0)


def test_private_keras_imports_only_in_keras_private():
    """Every `keras.src` import of the package is in keras_private.py."""
    found = []
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    modules = [node.module or ""]
                elif isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                else:
                    continue
                if any(m == "keras.src" or m.startswith("keras.src.") for m in modules):
                    found.append(os.path.relpath(path, PACKAGE))
    assert set(found) <= {"keras_private.py"}


def test_autocast_scope_none_reads_float32_inside_a_bf16_call():
    """What DoRA's norm relies on: Keras casts a float32 variable read in a
    mixed-bf16 `call`, and `AutocastScope(None)` reads it as stored."""

    class Reader(keras.layers.Layer):
        def build(self, input_shape):
            self.v = self.add_weight(shape=(2,), initializer="ones")

        def call(self, inputs):
            self.autocast_dtype = keras.backend.standardize_dtype(self.v.value.dtype)
            with keras_private.AutocastScope(None):
                self.raw_dtype = keras.backend.standardize_dtype(self.v.value.dtype)
            return inputs

    layer = Reader(dtype="mixed_bfloat16")
    layer(np.ones((1, 2), "float32"))
    assert (layer.autocast_dtype, layer.raw_dtype) == ("bfloat16", "float32")


def test_dequantize_with_sz_map_gives_the_kernel_keras_computes_with():
    """A block-wise int4 Dense: x·dequantized kernel (through the private
    function) equals Keras's own quantized output."""
    from keras_lora.layers import quantized

    x = np.random.default_rng(0).normal(size=(3, 16)).astype("float32")
    layer = keras.layers.Dense(8, use_bias=False)
    layer.build((None, 16))
    layer.quantize("int4", config=keras.quantizers.Int4QuantizationConfig(block_size=8))
    assert layer.kernel_zero is not None  # the grouped path
    kernel = ops.convert_to_numpy(quantized.dequantized_kernel(layer))
    np.testing.assert_allclose(x @ kernel, ops.convert_to_numpy(layer(x)), atol=1e-4)


def test_an_unnamed_layer_is_named_by_to_snake_case():
    """`raw_weights` names an unnamed MoE block by its attribute: it must
    recognise Keras's automatic name (snake-case class name, `_N` after)."""

    class MixtralSparseMoeBlock(keras.layers.Layer):
        pass

    snake = keras_private.to_snake_case("MixtralSparseMoeBlock")
    assert snake == "mixtral_sparse_moe_block"
    names = [MixtralSparseMoeBlock().name for _ in range(2)]
    assert all(re.fullmatch(snake + r"(_\d+)?", name) for name in names), names


def test_an_attribute_set_in_dot_not_track_scope_is_no_tracked_dict():
    """What `trainable_state` relies on: a dict keyed by layers set inside the
    scope is not made a Keras `TrackedDict` (which `torch.export` cannot
    flatten), as Keras's `compile` stores its own."""
    from keras.src.utils.tracking import TrackedDict

    model = keras.Sequential([keras.layers.Dense(2)])
    model.tracked = {model: True}
    with keras_private.DotNotTrackScope():
        model.untracked = {model: True}
    assert isinstance(model.tracked, TrackedDict)  # Keras's default
    assert not isinstance(model.untracked, TrackedDict)
