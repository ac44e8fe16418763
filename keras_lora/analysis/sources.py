"""Where the analysis reads factors and kernels: layers, models, adapter files.

Everything comes out as float64 NumPy matrices in one layout, keras-lora's:
A `(d_in, r)`, B `(r, d_out)`, W `(d_in, d_out)`, with ΔW = s·A·B. For an
`EinsumDense` kernel, d_in and d_out are its flattened input and output axes
(the paper's matrix view); kernels with group axes have one update per group,
which these measures do not cover.
"""

import collections
import os

import keras
import numpy as np

from keras_lora.layers import lora_math
from keras_lora.layers.einsum_dense import split_einsum_equation

Factors = collections.namedtuple("Factors", ["a", "b", "scale", "path"])


def to_matrix(value):
    """A tensor, variable or array as a float64 NumPy array."""
    if isinstance(value, keras.Variable):
        value = value.value  # (NumPy 2 warns on a Variable's own __array__)
    if not isinstance(value, np.ndarray):
        value = keras.ops.convert_to_numpy(value)
    return np.asarray(value, dtype="float64")


def factors_of(source, argument):
    """Factors of a LoRA layer, or of `(model or adapter file, layer path)`.

    Args:
        source: a LoRA layer, or a pair `(model, path)` / `(filepath, path)`.
        argument: the caller's argument name, for error messages.

    Returns:
        A `Factors(a, b, scale, path)`.
    """
    if _is_lora_layer(source):
        return _layer_factors(source)
    if isinstance(source, tuple) and len(source) == 2:
        container, path = source
        if isinstance(container, (str, os.PathLike)):
            return _file_factors(os.fspath(container), path)
        if isinstance(container, keras.layers.Layer):
            return _layer_factors(find_layer(container, path, lora=True))
    raise ValueError(
        f"`{argument}` must be an array, a LoRA layer, or a pair (model or "
        f"adapter file, layer path). Received: {argument}={source!r}"
    )


def find_layer(model, path, lora=False):
    """The layer of `model` whose `layer.path` is `path`."""
    layers = [model, *model._flatten_layers(include_self=False, recursive=True)]
    for layer in layers:
        if layer.path == path:
            if lora and not _is_lora_layer(layer):
                raise ValueError(
                    f"Layer '{path}' of model '{model.name}' is not a LoRA layer. "
                    f"LoRA layers: {_lora_paths(layers)[:8]}"
                )
            return layer
    known = _lora_paths(layers) if lora else [lyr.path for lyr in layers]
    raise ValueError(
        f"Model '{model.name}' has no layer with path {path!r}. "
        f"{'LoRA layers' if lora else 'Layers'}: {known[:8]}"
    )


def kernel_matrix(layer):
    """The layer's frozen base kernel as a `(d_in, d_out)` matrix."""
    if _is_lora_layer(layer):
        kernel = layer.lora_base_kernel
    elif isinstance(layer, keras.layers.Embedding):
        kernel = layer.embeddings
    elif isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)):
        kernel = layer.kernel
    else:
        raise ValueError(
            f"Layer '{layer.path}' ({type(layer).__name__}) has no kernel LoRA "
            "adapts (Dense, EinsumDense or Embedding)."
        )
    kernel = to_matrix(kernel)
    if isinstance(layer, keras.layers.EinsumDense):
        axes = _einsum_axes(layer)
        order = [axes["kernel"].index(c) for c in axes["input_axes"]]
        order += [axes["kernel"].index(c) for c in axes["output_axes"]]
        kernel = np.transpose(kernel, order)
        d_in = int(np.prod([kernel.shape[k] for k in range(len(axes["input_axes"]))]))
        return kernel.reshape(d_in, -1)
    return kernel


def all_factors(source):
    """`{path: Factors}` of every adapted layer of a model or adapter file."""
    if isinstance(source, (str, os.PathLike)):
        filepath = os.fspath(source)
        config, arrays = read_adapter_file(filepath)
        return {
            path: _file_factors(filepath, path, config, arrays)
            for path in config["spec"]["layers"]
        }
    if isinstance(source, keras.layers.Layer):
        layers = source._flatten_layers(include_self=False, recursive=True)
        return {lyr.path: _layer_factors(lyr) for lyr in layers if _is_lora_layer(lyr)}
    raise ValueError(
        "`source` must be an adapted model or an adapter file. "
        f"Received: source={source!r}"
    )


def read_adapter_file(filepath):
    # The library's reader: every check it makes, one place (adapters.py).
    from keras_lora.adapters import read_adapter

    return read_adapter(filepath)


def _layer_factors(layer):
    if isinstance(layer, keras.layers.EinsumDense):
        _einsum_axes(layer)
    a, b = to_matrix(layer.lora_a), to_matrix(layer.lora_b)
    rank = layer.rank
    return Factors(
        a.reshape(-1, rank), b.reshape(rank, -1), float(layer.lora_scale), layer.path
    )


def _file_factors(filepath, path, config=None, arrays=None):
    if config is None:
        config, arrays = read_adapter_file(filepath)
    layers = config["spec"]["layers"]
    if path not in layers:
        raise ValueError(
            f"Adapter file '{filepath}' has no adapted layer {path!r}. "
            f"Adapted layers: {list(layers)[:8]}"
        )
    settings = layers[path]
    rank = settings["rank"]
    a = np.asarray(arrays[f"{path}/lora_a"], dtype="float64")
    b = np.asarray(arrays[f"{path}/lora_b"], dtype="float64")
    if b.shape[0] != rank:
        raise ValueError(
            f"Layer '{path}' in '{filepath}' has a B factor of shape {b.shape}: an "
            "EinsumDense kernel with group axes (one update per group), which the "
            "analysis does not cover."
        )
    alpha = lora_math.check_alpha(settings["alpha"], rank)
    scale = lora_math.lora_scale(rank, alpha, settings.get("use_rslora", False))
    return Factors(a.reshape(-1, rank), b.reshape(rank, -1), float(scale), path)


def _einsum_axes(layer):
    axes = split_einsum_equation(layer.equation)
    if axes["group_axes"]:
        raise ValueError(
            f"Layer '{layer.path}' has group axes {axes['group_axes']} in its "
            f"equation {layer.equation!r} (one update per group), which the "
            "analysis does not cover."
        )
    return axes


def _is_lora_layer(layer):
    return isinstance(layer, keras.layers.Layer) and hasattr(layer, "lora_a")


def _lora_paths(layers):
    return [layer.path for layer in layers if _is_lora_layer(layer)]
