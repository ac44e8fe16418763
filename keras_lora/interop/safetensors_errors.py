"""Says which field of a rejected `.safetensors` file is wrong.

The `safetensors` package decides whether a file is valid (`safetensors_io`);
its messages ("invalid offset for tensor `b`", "expected usize at line 1
column 67") name neither the file nor, mostly, the field. `explain` runs only
after the package has refused a file: it re-reads the header (never the
tensor data) and finds the first field the package's rules reject, so that a
user sees e.g. "`data_offsets` of tensor 'b' overlap ...". It decides
nothing: where it finds no culprit, the package's own words are the message.
"""

import json
import math
import os

# The `safetensors` package refuses longer headers (its MAX_HEADER_SIZE).
MAX_HEADER_SIZE = 100_000_000
# Bits per element of each dtype the format knows.
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
_MAX_U64 = 2**64 - 1


def explain(path, error):
    """The `ValueError` message for a file the `safetensors` package refused.

    Args:
        path: the file.
        error: the package's `SafetensorError`.

    Returns:
        A message naming the file and the field at fault.
    """
    try:
        problem = _find_problem(path)
    except (OSError, RecursionError, MemoryError):
        problem = None
    return (
        f"'{path}' is not a valid safetensors file: "
        f"{problem or 'the safetensors package refuses it'} "
        f"(safetensors: {error})"
    )


def _find_problem(path):
    size = os.path.getsize(path)
    if size < 8:
        return f"it must start with an 8-byte header length. Received: {size} bytes"
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        if header_size > MAX_HEADER_SIZE:
            return (
                f"the header length must be at most {MAX_HEADER_SIZE} bytes. "
                f"Received: header length={header_size}"
            )
        if header_size > size - 8:
            return (
                f"the header length runs past the end of the file ({size} "
                f"bytes). Received: header length={header_size}"
            )
        raw = f.read(header_size)
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except ValueError as error:
        return f"the header is not valid UTF-8 JSON: {error}"
    if not isinstance(header, dict):
        return (
            "the header must be a JSON object. Received: header of type "
            f"{type(header).__name__}: {_short(header)}"
        )
    problem = _metadata_problem(header.pop("__metadata__", None))
    if problem:
        return problem
    entries = []
    for name, info in header.items():
        problem = _entry_problem(name, info)
        if problem:
            return problem
        entries.append((info["data_offsets"], name))
    expected = 0
    for (begin, end), name in sorted(entries):
        if begin != expected or end < begin:
            return (
                f"`data_offsets` of tensor '{name}' must start where the previous "
                f"tensor ends (byte {expected}), with no overlap or gap. "
                f"Received: data_offsets={[begin, end]}"
            )
        expected = end
    if expected != size - 8 - header_size:
        return (
            f"the tensors' `data_offsets` must cover the data exactly: they end "
            f"at byte {expected}, the file holds {size - 8 - header_size} bytes "
            "after the header (trailing bytes, or a truncated file)."
        )
    return None


def _metadata_problem(metadata):
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        return (
            "`__metadata__` must be a JSON object of strings. Received: "
            f"__metadata__={_short(metadata)}"
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            return (
                f"`__metadata__` values must be strings. Received: "
                f"__metadata__[{key!r}]={_short(value)}"
            )
    return None


def _entry_problem(name, info):
    if not isinstance(info, dict):
        return f"tensor '{name}' must be a JSON object. Received: {_short(info)}"
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            return f"tensor '{name}' lacks its `{field}` field."
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_BITS:
        return (
            f"`dtype` of tensor '{name}' must be one of {sorted(DTYPE_BITS)}. "
            f"Received: dtype={_short(dtype)}"
        )
    if not isinstance(shape, list) or not all(map(_is_size, shape)):
        return (
            f"`shape` of tensor '{name}' must be a list of non-negative "
            f"integers. Received: shape={_short(shape)}"
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(map(_is_size, offsets))
    ):
        return (
            f"`data_offsets` of tensor '{name}' must be two non-negative "
            f"integers [begin, end]. Received: data_offsets={_short(offsets)}"
        )
    if offsets[1] < offsets[0]:
        return (
            f"`data_offsets` of tensor '{name}' must not end before they begin. "
            f"Received: data_offsets={offsets}"
        )
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 > _MAX_U64 or bits // 8 != offsets[1] - offsets[0]:
        return (
            f"`shape` and `data_offsets` of tensor '{name}' disagree: shape "
            f"{_short(shape)} of {dtype} takes {bits} bits, data_offsets hold "
            f"{offsets[1] - offsets[0]} bytes. Received: data_offsets={offsets}"
        )
    return None


def _is_size(x):
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= _MAX_U64


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _short(value):
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
