"""`save_adapter` / `load_adapter`: small `.keras` files holding only the adapter.

An adapter file is a zip archive, like a `.keras` model:
- `metadata.json`: format name and version, keras-lora and Keras versions;
- `config.json`: the LoRA spec `enable_lora` recorded (per-layer rank, alpha,
  rsLoRA flag, dropout; targets; train_layers) and the name and shape of every
  stored array;
- `adapter.weights.h5`: the arrays, keyed by layer path: the factors of every
  adapted layer and the trainable weights of every `train_layers` layer. They
  are packed into one flat dataset per dtype (offsets in `config.json`): an
  HDF5 dataset costs ~400 bytes of headers, packing keeps the file at the
  weights' bytes plus a few KB.

Keys are layer paths, never layer indices (KerasHub's adapter files are keyed
by index and drop trained biases: keras-hub issue 2701). Nothing is pickled.
"""

import datetime
import io
import json
import os
import zipfile

import h5py
import keras
import numpy as np

from keras_lora import transform
from keras_lora.io_utils import atomic_write, check_keras_path

FORMAT = "keras-lora-adapter"
FORMAT_VERSION = 1
_METADATA = "metadata.json"
_CONFIG = "config.json"
_WEIGHTS = "adapter.weights.h5"


def _adapter_variables(model):
    """{key: variable} for everything `enable_lora` left trainable."""
    spec = transform.lora_spec(model)
    variables = {}
    for layer in transform.lora_layers(model):
        variables[f"{layer.path}/lora_a"] = layer.lora_a
        variables[f"{layer.path}/lora_b"] = layer.lora_b
    by_path = transform._layers_by_path(model)
    for path in spec["train_layers"]:
        for variable in by_path[path].trainable_weights:
            key = f"train/{variable.path}"
            if key in variables:
                raise ValueError(
                    f"Two trainable weights share the path '{variable.path}'; "
                    "give the layers of `train_layers` distinct names."
                )
            variables[key] = variable
    return variables


def save_adapter(model, filepath):
    """Writes the adapter of an adapted model to a small `.keras` file.

    Args:
        model: a model adapted with `enable_lora` (or reloaded/loaded so).
        filepath: destination, ending in `.keras`. Written atomically: a
            failure leaves no partial file and keeps an existing one.

    Example:

    >>> keras_lora.enable_lora(model, rank=8, train_layers=["logits"])
    >>> model.fit(...)
    >>> keras_lora.save_adapter(model, "task.adapter.keras")
    """
    filepath = check_keras_path(filepath)
    spec = transform.lora_spec(model)
    if spec is None:
        raise ValueError(
            f"Model '{getattr(model, 'name', model)}' is not adapted with LoRA: "
            "call `keras_lora.enable_lora(model, ...)` first."
        )
    variables = _adapter_variables(model)
    packed, index = _pack(
        {key: keras.ops.convert_to_numpy(v) for key, v in variables.items()}
    )
    config = {"spec": spec, "weights": index}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "keras_lora_version": _version(),
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "date_saved": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", libver="latest") as weights:
        for dtype, flat in packed.items():
            weights[dtype] = flat
    with atomic_write(filepath) as temporary:
        with zipfile.ZipFile(temporary, "w") as archive:
            archive.writestr(_METADATA, json.dumps(metadata, indent=2))
            archive.writestr(_CONFIG, json.dumps(config))
            archive.writestr(_WEIGHTS, buffer.getvalue())
    return filepath


def read_adapter(filepath):
    """Reads an adapter file into (config, {key: np.ndarray}).

    Raises:
        ValueError: naming the file, if it is missing, truncated, corrupt,
            or not a keras-lora adapter of a version this library reads.
    """
    filepath = check_keras_path(filepath)
    if not os.path.isfile(filepath):
        raise ValueError(f"Adapter file not found: filepath={filepath!r}")
    try:
        with zipfile.ZipFile(filepath) as archive:
            metadata = json.loads(archive.read(_METADATA))
            config = json.loads(archive.read(_CONFIG))
            if metadata.get("format") != FORMAT:
                raise ValueError(f"format is {metadata.get('format')!r}")
            if metadata.get("format_version", 0) > FORMAT_VERSION:
                raise ValueError(
                    f"format_version {metadata['format_version']} is newer than "
                    f"this library reads ({FORMAT_VERSION}): upgrade keras-lora"
                )
            with h5py.File(io.BytesIO(archive.read(_WEIGHTS)), "r") as weights:
                arrays = _unpack(weights, config["weights"])
    except (zipfile.BadZipFile, KeyError, OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"'{filepath}' is not a readable keras-lora adapter file ({error})."
        ) from None
    return config, arrays


def load_adapter(model, filepath):
    """Loads an adapter file onto a model of the same architecture.

    A model without LoRA is adapted as the file records first; a model already
    adapted must have the same adapted layers, ranks and scales. Every path and
    shape is checked before anything is assigned: on a mismatch the model is
    left exactly as it was.

    Args:
        model: a built base model (fresh, or already adapted alike).
        filepath: an adapter file written by `save_adapter`.

    Returns:
        The same model, with the adapter's weights.

    Raises:
        ValueError: for a bad file (naming it) or a mismatch (naming the first
            bad path and both shapes).
    """
    config, arrays = read_adapter(filepath)
    spec = config["spec"]
    was_adapted = transform.lora_spec(model) is not None
    if was_adapted:
        _check_same_adaptation(model, spec, filepath)
    else:
        transform.apply_spec(model, spec)
    try:
        variables = _adapter_variables(model)
        for key in config["weights"]:
            if key not in variables:
                raise ValueError(
                    f"'{filepath}' has weights for '{key}', which model "
                    f"'{model.name}' does not have."
                )
            if tuple(variables[key].shape) != arrays[key].shape:
                raise ValueError(
                    f"Shape mismatch for '{key}' in '{filepath}': the file has "
                    f"{arrays[key].shape}, the model has {tuple(variables[key].shape)}."
                )
        missing = sorted(set(variables) - set(config["weights"]))
        if missing:
            raise ValueError(
                f"'{filepath}' has no weights for '{missing[0]}' of model "
                f"'{model.name}'."
            )
    except Exception:
        if not was_adapted:
            transform.revert(model, merge=False)
        raise
    for key, variable in variables.items():
        variable.assign(arrays[key])
    return model


def _pack(arrays):
    """Concatenates arrays into one flat array per dtype; returns them and an index."""
    chunks, index, offsets = {}, {}, {}
    for key, array in arrays.items():
        if str(array.dtype) in ("bfloat16", "float16"):
            array = array.astype("float32")  # lossless; HDF5 has no bfloat16
        dtype = str(array.dtype)
        offset = offsets.get(dtype, 0)
        index[key] = {"dtype": dtype, "offset": offset, "shape": list(array.shape)}
        chunks.setdefault(dtype, []).append(array.reshape(-1))
        offsets[dtype] = offset + array.size
    packed = {dtype: np.concatenate(parts) for dtype, parts in chunks.items()}
    return packed, index


def _unpack(weights, index):
    dtypes = {entry["dtype"] for entry in index.values()}
    flat = {dtype: np.asarray(weights[dtype]) for dtype in dtypes}
    arrays = {}
    for key, entry in index.items():
        size = int(np.prod(entry["shape"]))
        start = entry["offset"]
        data = flat[entry["dtype"]][start : start + size]
        if data.size != size:
            raise ValueError(f"weights for '{key}' are truncated")
        arrays[key] = data.reshape(entry["shape"])
    return arrays


def _check_same_adaptation(model, spec, filepath):
    current = transform.lora_spec(model)["layers"]
    for path, layer_config in spec["layers"].items():
        ours = current.get(path)
        if ours is None:
            raise ValueError(
                f"'{filepath}' adapts layer '{path}', which is not adapted in "
                f"model '{model.name}'. Load it onto a fresh base model instead."
            )
        for field in ("rank", "alpha", "use_rslora"):
            if ours[field] != layer_config[field]:
                raise ValueError(
                    f"Layer '{path}' has {field}={ours[field]!r} in model "
                    f"'{model.name}' but {field}={layer_config[field]!r} in "
                    f"'{filepath}'."
                )


def _version():
    from keras_lora import __version__

    return __version__
