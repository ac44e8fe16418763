"""The single-adapter low-rank path `s·(x·A)·B`, as lean as its arithmetic.

On JAX and TensorFlow the layer's `call` is traced once and compiled, so each
`keras.ops` call costs nothing per step. Keras's PyTorch backend runs eagerly:
every `keras.ops` call pays 10-40 µs of Python (argument conversion, dtype
promotion, symbolic checks) before PyTorch's own kernel launch, which is more
than a small projection's arithmetic and was most of a LoRA layer's added
latency. On PyTorch, when the operands already share a dtype (the factors are
cast to the compute dtype first), the path is therefore written with
PyTorch's own operators: the same maths, three calls instead of nine.
Everything else (casts, dropout, other layer types) stays in `keras.ops`.
"""

import math

import keras
from keras import ops

# The backend is fixed when Keras is imported.
_TORCH = keras.backend.backend() == "torch"
if _TORCH:
    import torch


def matmul_update(x, a, b, scale):
    """Returns `s·(x·A)·B` where A meets x's last axes as a matrix.

    Args:
        x: inputs `(..., *in_axes)`, in the compute dtype.
        a: A `(*in_axes, r)` (a tensor, in the compute dtype).
        b: B `(r, *out_axes)`.
        scale: the float s (no multiply when it is 1).

    Returns:
        A tensor `(..., *out_axes)`.
    """
    if _TORCH and x.dtype == a.dtype:
        if a.dim() == 2 and b.dim() == 2:  # Dense, and most projections
            low = torch.matmul(x, torch_down(a))
            return torch.matmul(low if scale == 1.0 else low * scale, b)
        return _torch_reshaped_update(x, a, b, scale)
    # Contractions, not `reshape(x, (-1, d_in))`: a reshape through the
    # flattened leading axes cannot be exported with a symbolic batch size
    # (jax2onnx: "reshape with symbolic dimensions requires mapping to input
    # axes"). Compiled on JAX and TensorFlow, both are the same GEMM.
    in_rank = len(a.shape) - 1
    if in_rank == 1:
        low = ops.matmul(x, a)
    else:
        low = ops.tensordot(x, a, axes=in_rank)
    if len(b.shape) == 2:
        return ops.matmul(scaled(low, scale), b)
    return ops.tensordot(scaled(low, scale), b, axes=1)


def _torch_reshaped_update(x, a, b, scale):
    """`matmul_update` on PyTorch for several input or output axes."""
    in_rank = a.dim() - 1
    rank = a.shape[-1]
    d_in = math.prod(a.shape[:-1])
    out_axes = tuple(b.shape[1:])
    lead = x.shape[: x.dim() - in_rank]
    if in_rank != 1:
        x = x.reshape(*lead, d_in)
    low = torch.matmul(x, torch_down(a.reshape(d_in, rank)))
    if scale != 1.0:
        low = low * scale
    if len(out_axes) == 1:
        return torch.matmul(low, b)
    return torch.matmul(low, b.reshape(rank, -1)).reshape(*lead, *out_axes)


def scaled(x, scale):
    """`x · s`, skipped when s = 1."""
    return x if scale == 1.0 else ops.multiply(x, scale)


def add(x, y):
    """`x + y`: PyTorch's own add when the dtypes match (see the module doc)."""
    if _TORCH and x.dtype == y.dtype:
        return x + y
    return ops.add(x, y)


def torch_down(a):
    """A `(d_in, r)` for `x @ A` on PyTorch, column-major while training on CPU.

    Same values, held as a contiguous copy of Aᵀ seen through a transpose (a
    copy of d_in·r numbers). Autograd then computes dA as `(dhᵀ x)ᵀ` instead
    of `xᵀ dh`, a GEMM orientation PyTorch's CPU kernels run several times
    faster (see docs/benchmarks.md). Skipped where it cannot pay: without
    autograd (inference) and on CUDA (not measured to pay there).
    """
    if torch.is_grad_enabled() and a.requires_grad and a.device.type == "cpu":
        return a.t().contiguous().t()
    return a
