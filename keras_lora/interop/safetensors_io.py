"""Reads and writes `.safetensors` files with NumPy only (no torch).

Reading is done here rather than with `safetensors.numpy` because NumPy has no
bfloat16, and many PEFT adapters are saved in bf16: the format is simple (an
8-byte little-endian header length, a JSON header, raw little-endian bytes),
and bf16 widens to float32 exactly by a 16-bit shift. Writing uses
`safetensors.numpy` (the `interop` extra).
"""

import json
import math
import os

import numpy as np

_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
}


def read(path):
    """Returns `({name: np.ndarray}, metadata)`; bf16 tensors become float32.

    Raises:
        ValueError: if the file is not a well-formed safetensors file.
    """
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"'{path}' is not a safetensors file (too short).")
    header_size = int.from_bytes(data[:8], "little")
    if header_size > len(data) - 8:
        raise ValueError(f"'{path}' is not a safetensors file (bad header size).")
    try:
        header = json.loads(data[8 : 8 + header_size])
    except ValueError as error:
        raise ValueError(f"'{path}' has an unreadable header: {error}") from None
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + header_size :]
    tensors = {}
    for name, info in header.items():
        dtype, shape = info.get("dtype"), tuple(info.get("shape", ()))
        begin, end = info.get("data_offsets", (0, -1))
        if dtype != "BF16" and dtype not in _DTYPES:
            raise ValueError(
                f"Tensor '{name}' in '{path}' has a dtype NumPy cannot read. "
                f"Received: dtype={dtype!r}"
            )
        itemsize = 2 if dtype == "BF16" else np.dtype(_DTYPES[dtype]).itemsize
        if not 0 <= begin <= end <= len(body) or end - begin != (
            math.prod(shape) * itemsize
        ):
            raise ValueError(
                f"Tensor '{name}' in '{path}' has data offsets that do not fit its "
                f"shape {shape} and dtype {dtype}. Received: data_offsets="
                f"{[begin, end]}"
            )
        raw = body[begin:end]
        if dtype == "BF16":
            bits = np.frombuffer(raw, "<u2").astype("<u4") << 16
            array = bits.view("<f4")
        else:
            array = np.frombuffer(raw, _DTYPES[dtype])
        tensors[name] = array.reshape(shape).copy()
    return tensors, metadata


def write(path, tensors, metadata=None):
    """Writes `{name: np.ndarray}` to `path` as safetensors (PyTorch-readable)."""
    try:
        from safetensors.numpy import save_file
    except ImportError:
        raise ImportError(
            "Writing PEFT adapters needs the `safetensors` package: "
            "`pip install keras-lora[interop]`."
        ) from None
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(arrays, os.fspath(path), metadata={"format": "pt", **(metadata or {})})
