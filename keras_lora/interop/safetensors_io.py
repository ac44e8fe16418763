"""Reads and writes `.safetensors` files with the `safetensors` package.

The package decides what a valid file is, so this reader is exactly as strict
as `safetensors.numpy.load_file` and PyTorch's loaders (overlapping or
gapped tensor offsets, trailing bytes, a malformed `__metadata__` are
refused), and it never reads tensor bytes before the whole header has been
checked against the file's size. Its errors are turned into `ValueError`s
that name the file and the offending field (`safetensors_errors.py`).
"""

import json
import math
import os

import numpy as np

from keras_lora.interop import safetensors_errors

# The dtypes `safe_open(..., framework="np")` returns as NumPy arrays.
NUMPY_DTYPES = {
    "F64",
    "F32",
    "F16",
    "I64",
    "I32",
    "I16",
    "I8",
    "U64",
    "U32",
    "U16",
    "U8",
    "BOOL",
    "C64",
}


def read(path, max_values=None):
    """Returns `({name: np.ndarray}, metadata)`; bf16 tensors become float32.

    Args:
        path: a `.safetensors` file.
        max_values: refuse a file whose tensors hold more values than this
            in all, before any is read (None: no limit).

    Returns:
        The tensors by name, and the `__metadata__` dict of strings (`{}` if
        the file has none).

    Raises:
        ValueError: if the `safetensors` package rejects the file (the message
            names the file and the field at fault), or a tensor has a dtype
            NumPy cannot hold (the float8 and sub-byte formats), or the
            tensors hold more than `max_values` values.
        ImportError: if `safetensors` is not installed.

    Example:

    >>> tensors, metadata = read("adapter_model.safetensors")
    """
    safetensors = _library()
    path = os.fspath(path)
    try:
        handle = safetensors.safe_open(path, framework="np")
    except safetensors.SafetensorError as error:
        raise ValueError(safetensors_errors.explain(path, error)) from None
    with handle as f:
        metadata = f.metadata() or {}
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
        unreadable = {
            name: dtype
            for name, dtype in dtypes.items()
            if dtype != "BF16" and dtype not in NUMPY_DTYPES
        }
        if unreadable:
            name, dtype = next(iter(unreadable.items()))
            raise ValueError(
                f"Tensor '{name}' in '{path}' has a dtype NumPy cannot hold. "
                f"Received: dtype={dtype!r}"
            )
        values = sum(math.prod(f.get_slice(name).get_shape()) for name in dtypes)
        if max_values is not None and values > max_values:
            raise ValueError(
                f"'{path}' holds {values} values, more than the {max_values} "
                f"expected at most. Received: size={os.path.getsize(path)} bytes"
            )
        bf16 = [name for name, dtype in dtypes.items() if dtype == "BF16"]
        tensors = {name: f.get_tensor(name) for name in dtypes if name not in bf16}
    if bf16:
        tensors.update(_read_bf16(path, bf16))
    return tensors, metadata


def _read_bf16(path, names):
    """bf16 tensors as float32, read by hand.

    `safe_open(..., framework="np")` cannot return bf16 (NumPy has no such
    dtype) and many PEFT adapters are saved in bf16; bf16 widens to float32
    exactly by a 16-bit shift. The file has already passed the library's
    checks, so the header parses and every offset lies inside the file; the
    lengths are checked again in case the file changed in between.
    """
    tensors = {}
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_size))
        for name in names:
            info = header[name]
            begin, end = info["data_offsets"]
            f.seek(8 + header_size + begin)
            raw = f.read(end - begin)
            if len(raw) != end - begin or len(raw) % 2:
                raise ValueError(
                    f"'{path}' changed while it was read: tensor '{name}' is cut "
                    f"short. Received: data_offsets={[begin, end]}"
                )
            bits = np.frombuffer(raw, "<u2").astype("<u4") << 16
            tensors[name] = bits.view("<f4").reshape(info["shape"])
    return tensors


def write(path, tensors, metadata=None):
    """Writes `{name: np.ndarray}` to `path` as safetensors (PyTorch-readable).

    Example:

    >>> write("adapter_model.safetensors", {"w": np.zeros((2, 3), "float32")})
    """
    safetensors = _library()
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    data = safetensors.numpy.save(arrays, metadata={"format": "pt", **(metadata or {})})
    # Written with `open`, not `save_file` (which makes a 0600 file of its
    # own): the file gets the mode the umask gives, or keeps its own.
    with open(path, "wb") as f:
        f.write(data)


def _library():
    try:
        import safetensors
        import safetensors.numpy
    except ImportError:
        raise ImportError(
            "Reading and writing PEFT adapters needs the `safetensors` package: "
            "`pip install keras-lora[interop]`."
        ) from None
    return safetensors
