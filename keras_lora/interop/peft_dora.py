"""DoRA magnitudes in PEFT adapter folders (`use_dora: true`).

PEFT 0.21 saves one `<module>.lora_magnitude_vector` per adapted module: the
magnitude m of each output unit of W' = m·(W + s·ΔW)/‖W + s·ΔW‖, shaped
`(out_features,)` for a linear module (GPT-2's `Conv1D` too) and
`(1, filters, 1, ...)` for a convolution. keras-lora's layers hold the same
vector as `layer.lora_magnitude`, shaped like the kernel without its input
axes. A fused module (GPT-2's `c_attn`) holds the magnitudes of its Keras
layers concatenated in order, as its rows: the norm is per output row, so
splitting is exact. PEFT's DoRA on embeddings has no keras-lora counterpart.
"""

import math

import keras
import numpy as np

from keras_lora.interop import factors
from keras_lora.interop.peft_config import WEIGHTS_FILE

SUFFIX = ".lora_magnitude_vector"


def read_module(full, parts, layouts, use_dora):
    """Checks a module's magnitude against the config and the Keras layers.

    Args:
        full: the module's name in the adapter.
        parts: its tensors (`"m"`: the magnitude, when the file has one).
        layouts: `factors.layout` of each of its Keras layers.
        use_dora: the config's `use_dora`.

    Returns:
        None without DoRA, else the Keras magnitude of each layer (a list).
    """
    magnitude = parts.get("m")
    if not use_dora:
        if magnitude is not None:
            raise ValueError(
                f"Module '{full}' has a DoRA magnitude (`{SUFFIX[1:]}`) in "
                f"{WEIGHTS_FILE}, but the config says `use_dora: false`."
            )
        return None
    kind = layouts[0][2]
    if kind == "embedding":
        raise ValueError(
            f"The adapter uses DoRA on the embedding '{full}': keras-lora's DoRA "
            "adapts Dense, EinsumDense and convolution layers only. Received: "
            "use_dora=True"
        )
    if magnitude is None:
        raise ValueError(
            f"The config says `use_dora: true`, but module '{full}' has no "
            f"`{SUFFIX[1:]}` in {WEIGHTS_FILE}."
        )
    d_out = sum(math.prod(output_shape) for _, output_shape, _ in layouts)
    expected = factors.peft_shapes(layouts[0], 1, d_out)[2]
    if magnitude.shape != expected:
        raise ValueError(
            f"Module '{full}' must have a DoRA magnitude of shape {expected}. "
            f"Received: {SUFFIX[1:]}.shape={magnitude.shape}"
        )
    rows = np.reshape(magnitude, (d_out,))
    split, start = [], 0
    for _, output_shape, _ in layouts:
        stop = start + math.prod(output_shape)
        split.append(np.reshape(rows[start:stop], output_shape).astype("float32"))
        start = stop
    return split


def check_uniform(layers):
    """Returns whether the LoRA layers use DoRA: all of them, or none.

    PEFT's `use_dora` holds for every module of an adapter.
    """
    dora = [layer.path for layer in layers if layer.use_dora]
    if dora and len(dora) != len(layers):
        plain = [layer.path for layer in layers if not layer.use_dora]
        raise ValueError(
            "A PEFT adapter is DoRA for all of its modules or for none "
            f"(`use_dora`), but layers {dora[:4]} use DoRA and {plain[:4]} do "
            "not. Use DoRA on every adapted layer, or on none."
        )
    return bool(dora)


def write_module(module, adapted):
    """PEFT's magnitude of one module from its adapted Keras layers.

    A layer of a fused module without LoRA gets its rows' ‖W‖: with a zero
    update, DoRA then computes W there, as the Keras model does.
    """
    rows = []
    for index, layer in enumerate(module.layers):
        if index in adapted:
            value = keras.ops.convert_to_numpy(adapted[index].lora_magnitude)
            rows.append(np.reshape(value.astype("float32"), (-1,)))
        else:
            rows.append(factors.row_norms(layer))
    rows = np.concatenate(rows)
    shape = factors.peft_shapes(factors.layout(module.layers[0]), 1, rows.size)[2]
    return np.ascontiguousarray(np.reshape(rows, shape))
