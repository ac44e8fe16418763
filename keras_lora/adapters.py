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

import contextlib
import datetime
import io
import json
import math
import os
import zipfile

import h5py
import keras
import numpy as np

from keras_lora import (
    adapter_entries,
    atomic,
    model_inits,
    model_paths,
    named_adapters,
    transform,
)
from keras_lora.io_utils import atomic_write, check_keras_path
from keras_lora.layers.adapter_set import check_adapter_name
from keras_lora.safe_files import MAX_JSON_BYTES, read_flat_dataset, read_member
from keras_lora.spec import LAYER_KEYS, OPTIONAL_KEYS, check_spec

FORMAT = "keras-lora-adapter"
FORMAT_VERSION = 1
_METADATA = "metadata.json"
_CONFIG = "config.json"
_WEIGHTS = "adapter.weights.h5"
# What `_pack` writes (bf16/f16 are widened to float32).
_DTYPES = ("float32", "float64", "int8", "int16", "int32", "int64", "uint8")
# HDF5 headers around the packed datasets: 463 bytes measured; generous.
_H5_OVERHEAD = 64 * 1024


def save_adapter(model, filepath, name=None):
    """Writes one adapter of an adapted model to a small `.keras` file.

    Args:
        model: a model adapted with `enable_lora` / `add_adapter` (or
            reloaded or loaded so).
        filepath: destination, ending in `.keras`. Written atomically: a
            failure leaves no partial file and keeps an existing one.
        name: which named adapter; None for the model's only adapter, or its
            single active one. The file is the same format either way: it
            loads onto a fresh base, or under any name.

    Example:

    >>> keras_lora.enable_lora(model, rank=8, train_layers=["logits"])
    >>> model.fit(...)
    >>> keras_lora.save_adapter(model, "task.adapter.keras")
    """
    filepath = check_keras_path(filepath)
    name, spec = named_adapters.adapter_spec(model, name)
    entries = adapter_entries.adapter_variables(model, name)
    # PiSSA/OLoRA layers: written as rank-2r LoRA for the original base.
    spec, entries = model_inits.for_original_base(model, spec, entries)
    packed, index = _pack(
        {
            key: keras.ops.convert_to_numpy(variable) if value is None else value
            for key, (variable, value) in entries.items()
        }
    )
    config = {"spec": _file_spec(spec), "weights": index}
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

    The file is untrusted input: see `read_adapter_config` and
    `read_adapter_weights` for what is checked, all before the weights are read.

    Raises:
        ValueError: naming the file, if it is missing, truncated, corrupt,
            crafted, or not a keras-lora adapter of a version this library reads.
    """
    config = read_adapter_config(filepath)
    return config, read_adapter_weights(filepath, config["weights"])


def read_adapter_config(filepath):
    """Reads and validates an adapter file's `config.json` (not its weights).

    Checked: the archive holds exactly the three members of the format, each
    JSON member is bounded in size, the metadata names this format and a
    version this library reads, the spec has exactly the known keys, types
    and values (`keras_lora.spec.check_spec`), and the weight index packs
    each array right after the previous one (no overlap, no gap).

    Returns:
        `{"spec": spec, "weights": index}`.
    """
    filepath = check_keras_path(filepath)
    source = f"'{filepath}'"
    with _reading(filepath):
        with zipfile.ZipFile(filepath) as archive:
            metadata = json.loads(
                read_member(archive, _METADATA, MAX_JSON_BYTES, source)
            )
            _check_metadata(metadata, source)
            members = sorted(archive.namelist())
            if members != sorted((_METADATA, _CONFIG, _WEIGHTS)):
                raise ValueError(
                    f"{source} must hold exactly {_METADATA}, {_CONFIG} and "
                    f"{_WEIGHTS}. Received: members={members}"
                )
            config = json.loads(read_member(archive, _CONFIG, MAX_JSON_BYTES, source))
        if not isinstance(config, dict) or sorted(config) != ["spec", "weights"]:
            raise ValueError(
                f"{source}: config.json must be an object with the keys 'spec' "
                f"and 'weights'. Received: {type(config).__name__} "
                f"{sorted(config) if isinstance(config, dict) else ''}"
            )
        spec = check_spec(config["spec"], source)
        _check_index(config["weights"], source)
    return {"spec": spec, "weights": config["weights"]}


def read_adapter_weights(filepath, index):
    """Reads the arrays that a validated `index` declares, and nothing else.

    The HDF5 member's size is bounded by what the index declares before it is
    read, and each packed dataset must be a plain, unfiltered dataset of
    exactly the declared dtype and length (`keras_lora.safe_files`).

    Returns:
        `{key: np.ndarray}` in the shapes of `index`.
    """
    source = f"'{filepath}'"
    lengths = _check_index(index, source)
    needed = sum(n * np.dtype(dtype).itemsize for dtype, n in lengths.items())
    with _reading(filepath):
        with zipfile.ZipFile(filepath) as archive:
            raw = read_member(archive, _WEIGHTS, needed + _H5_OVERHEAD, source)
        with h5py.File(io.BytesIO(raw), "r") as weights:
            flat = {
                dtype: read_flat_dataset(weights, dtype, dtype, n, source)
                for dtype, n in lengths.items()
            }
            names = sorted(weights.keys())
            if names != sorted(lengths):
                raise ValueError(
                    f"{source}: {_WEIGHTS} must hold the datasets "
                    f"{sorted(lengths)} and nothing else. Received: {names}"
                )
    arrays = {}
    for key, entry in index.items():
        size = math.prod(entry["shape"])
        start = entry["offset"]
        arrays[key] = flat[entry["dtype"]][start : start + size].reshape(entry["shape"])
    return arrays


@contextlib.contextmanager
def _reading(filepath):
    """Turns what a broken file makes the zip/JSON/HDF5 readers raise into a
    `ValueError` naming the file (our own checks already name it)."""
    if not os.path.isfile(filepath):
        raise ValueError(f"Adapter file not found: filepath={filepath!r}")
    try:
        yield
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        KeyError,
        TypeError,
        EOFError,
        UnicodeDecodeError,
        json.JSONDecodeError,
    ) as error:
        raise ValueError(
            f"'{filepath}' is not a readable keras-lora adapter file ({error})."
        ) from None


def _check_metadata(metadata, source):
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else metadata
        raise ValueError(
            f"{source} is not a keras-lora adapter file: metadata.json names "
            f"format={found!r}, not {FORMAT!r}."
        )
    version = metadata.get("format_version")
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"{source} has format_version={version!r}; this library reads "
            f"versions 1 to {FORMAT_VERSION} (a newer file needs a newer "
            "keras-lora)."
        )


def _check_index(index, source):
    """Validates the weight index; returns {dtype: packed length}."""
    if not isinstance(index, dict):
        raise ValueError(
            f"{source}: config.json `weights` must be an object. "
            f"Received: weights={type(index).__name__}"
        )
    lengths = {}
    for key, entry in index.items():
        if (
            not isinstance(entry, dict)
            or sorted(entry) != ["dtype", "offset", "shape"]
            or entry["dtype"] not in _DTYPES
            or not _is_int(entry["offset"])
            or not isinstance(entry["shape"], list)
            or not all(_is_int(d) and d >= 0 for d in entry["shape"])
        ):
            raise ValueError(
                f"{source}: config.json `weights[{key!r}]` must be "
                f"{{dtype in {list(_DTYPES)}, offset: int, shape: [int >= 0]}}. "
                f"Received: {entry!r}"
            )
        dtype = entry["dtype"]
        if entry["offset"] != lengths.get(dtype, 0):
            raise ValueError(
                f"{source}: config.json `weights[{key!r}]` starts at offset "
                f"{entry['offset']}, but the arrays are packed one after the "
                f"other (expected {lengths.get(dtype, 0)}): overlapping or "
                "gapped offsets are refused."
            )
        lengths[dtype] = entry["offset"] + math.prod(entry["shape"])
    return lengths


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def load_adapter(model, filepath, name=None):
    """Loads an adapter file onto a model of the same architecture.

    A model without LoRA is adapted as the file records first. With `name`,
    the file becomes a further named adapter of an adapted model (inactive:
    `set_adapter` activates it), with its own targets and rank. Without it, an
    adapted model must already have the file's layers, ranks and scales, and
    the file's values replace those of its only (or single active) adapter.
    Every path, shape and dtype is checked before anything is assigned: on a
    mismatch the model is left exactly as it was.

    Args:
        model: a built base model (fresh, or already adapted).
        filepath: an adapter file written by `save_adapter`.
        name: None, or the name to load the adapter under.

    Returns:
        The same model, with the adapter's weights.

    Raises:
        ValueError: for a bad file (naming it) or a mismatch (naming the first
            bad path and both shapes).
    """
    transform.check_model(model)
    if name is not None:
        check_adapter_name(name)
    config = read_adapter_config(filepath)
    spec = config["spec"]
    known = named_adapters.list_adapters(model)
    if name is not None and name in known:
        raise ValueError(
            f"Model '{model.name}' already has an adapter named {name!r}: "
            "delete it first (`keras_lora.delete_adapter`) or pick another name."
        )
    by_path = model_paths.layers_by_path(model)
    # The variables that may be overwritten: the trained heads, and the
    # factors of the adapter that the file replaces.
    written = [
        v
        for path in spec["train_layers"]
        if path in by_path
        for v in transform.head_weights(by_path[path])
    ]
    if known and name is None:
        target, current = named_adapters.adapter_spec(model)
        _check_same_adaptation(model, current, spec, filepath)
        written += [
            v for v, _ in adapter_entries.adapter_variables(model, target).values()
        ]
    with atomic.all_or_nothing(model, written):  # an interrupt too
        if not known:
            transform.apply_spec(model, spec)
            named_adapters.rename_first(model, name or "default")
            target = name or "default"
        elif name is not None:
            named_adapters.add_spec(model, name, spec)
            target = name
        entries = adapter_entries.adapter_variables(model, target)
        _check_entries(model, filepath, config["weights"], entries)
        arrays = read_adapter_weights(filepath, config["weights"])
        adapter_entries.assign_adapter_values(model, target, entries, arrays)
    return model


def _check_entries(model, filepath, index, entries):
    """Raises unless the file's arrays are exactly the adapter's variables."""
    for key in index:
        if key not in entries:
            raise ValueError(
                f"'{filepath}' has weights for '{key}', which model "
                f"'{model.name}' does not have."
            )
        entry, variable = index[key], entries[key][0]
        if tuple(variable.shape) != tuple(entry["shape"]):
            raise ValueError(
                f"Shape mismatch for '{key}' in '{filepath}': the file has "
                f"{tuple(entry['shape'])}, the model has {tuple(variable.shape)}."
            )
        if entry["dtype"] != _stored_dtype(variable.dtype):
            raise ValueError(
                f"Dtype mismatch for '{key}' in '{filepath}': the file has "
                f"{entry['dtype']}, the model stores {variable.dtype} as "
                f"{_stored_dtype(variable.dtype)}."
            )
    missing = sorted(set(entries) - set(index))
    if missing:
        raise ValueError(
            f"'{filepath}' has no weights for '{missing[0]}' of model '{model.name}'."
        )


def _stored_dtype(dtype):
    """The dtype an array is stored in: bf16/f16 widen to float32 (lossless;
    HDF5 has no bfloat16)."""
    dtype = str(dtype)
    return "float32" if dtype in ("bfloat16", "float16") else dtype


def _file_spec(spec):
    """The spec as an adapter file records it: the known keys only."""
    return {
        **{key: spec[key] for key in ("version", "targets", "train_layers")},
        "layers": {
            path: {
                key: config[key]
                for key in LAYER_KEYS + OPTIONAL_KEYS
                if key in LAYER_KEYS or config.get(key)
            }
            for path, config in spec["layers"].items()
        },
    }


def _pack(arrays):
    """Concatenates arrays into one flat array per dtype; returns them and an index."""
    chunks, index, offsets = {}, {}, {}
    for key, array in arrays.items():
        dtype = _stored_dtype(array.dtype)
        array = array.astype(dtype, copy=False)
        offset = offsets.get(dtype, 0)
        index[key] = {"dtype": dtype, "offset": offset, "shape": list(array.shape)}
        chunks.setdefault(dtype, []).append(array.reshape(-1))
        offsets[dtype] = offset + array.size
    packed = {dtype: np.concatenate(parts) for dtype, parts in chunks.items()}
    return packed, index


def _check_same_adaptation(model, current, spec, filepath):
    for path, layer_config in spec["layers"].items():
        ours = current["layers"].get(path)
        if ours is None:
            raise ValueError(
                f"'{filepath}' adapts layer '{path}', which is not adapted in "
                f"model '{model.name}'. Load it onto a fresh base model, or "
                "under a new name (`load_adapter(..., name=...)`)."
            )
        for field in ("rank", "alpha", "use_rslora", "use_dora"):
            # alpha=None means alpha=rank: the same scale.
            if _effective(ours, field) != _effective(layer_config, field):
                raise ValueError(
                    f"Layer '{path}' has {field}={_effective(ours, field)!r} in "
                    f"model '{model.name}' but "
                    f"{field}={_effective(layer_config, field)!r} in '{filepath}'."
                )


def _effective(layer_config, field):
    value = layer_config.get(field, False)
    return layer_config["rank"] if field == "alpha" and value is None else value


def _version():
    from keras_lora import __version__

    return __version__
