"""The private Keras names keras-lora needs, in one place.

Keras exports no public API for these. Private names move between Keras
releases, so every use goes through this module, and
`tests/test_keras_private.py` checks each one against the installed Keras: if
Keras changes one, that test fails and says what to look for, rather than a
LoRA layer going silently wrong.
"""

# A LoRA embedding's `call` returns a new tensor: Keras reads the padding mask
# that the next layer receives from this tensor attribute (`_keras_mask`), set
# by Keras's own `Embedding` through this function. No public setter exists
# (Keras 3.15).
#
# Under a mixed policy Keras casts every float variable read inside a layer's
# `call` to the compute dtype (bf16). DoRA's column norm must see the float32
# kernel and magnitude (else m/‖W‖ is 1 ± 2⁻⁸ and a fresh layer is not its
# base): `AutocastScope(None)` reads them as stored. No public API (3.15).
from keras.src.backend import AutocastScope, set_keras_mask

# `export_serving` passes Keras's exporters the input signature Keras itself
# reads from a model: a Functional model reloaded from a `.keras` file has it,
# but has never been called, which Keras's ONNX exporter refuses unless a
# signature is given. No public API (3.15).
from keras.src.export.export_utils import get_input_signature

# A block-wise (grouped) int4 kernel is dequantized by Keras's own function
# (scale and zero point per group), so a LoRA layer's merge and DoRA's norm see
# exactly the kernel Keras's `quantized_call` computes with. Not exported
# under `keras.quantizers` (3.15).
from keras.src.quantizers.quantizers import dequantize_with_sz_map

# A layer created without a name is named `to_snake_case(class name)` plus
# `_N` by Keras; `raw_weights.py` recognises such auto-named MoE blocks by the
# same function. Not exported (3.15).
from keras.src.utils.naming import to_snake_case

# Keras's `compile` stores `_compiled_trainable_state` (a dict keyed by layer
# objects) with attribute tracking off; set with tracking on, it becomes a
# `TrackedDict`, whose torch pytree flattening sorts its keys and fails on
# layers ("'<' not supported between instances of 'InputLayer' and ..."),
# which breaks `torch.export` of the model. Keras's own scope, as `compile`
# uses it. No public API (3.15).
from keras.src.utils.tracking import DotNotTrackScope

__all__ = [
    "AutocastScope",
    "DotNotTrackScope",
    "dequantize_with_sz_map",
    "get_input_signature",
    "set_keras_mask",
    "to_snake_case",
]
