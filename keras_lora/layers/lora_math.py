"""The LoRA maths shared by every layer type: argument checks, scale and merge.

Everything here is a plain function so that the three layer types, `merge_lora`
and `export_merged` compute the update in exactly one way.
"""

import math
import numbers

from keras import ops


def check_rank(rank):
    """Returns `rank` if it is a positive int, else raises a `ValueError`."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"`rank` must be a positive integer. Received: rank={rank!r}")
    return int(rank)


# The largest finite float32: a scale above it is infinite in the factors'
# dtype (NaN outputs from the first step).
FLOAT32_MAX = 3.4028234663852886e38


def is_float32_scale(value):
    """True for a positive real number that is finite in float32."""
    return (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and 0 < value <= FLOAT32_MAX
    )


def check_alpha(alpha, rank):
    """Returns the effective alpha: `rank` when `alpha` is None."""
    if alpha is None:
        return float(rank)
    if not is_float32_scale(alpha):
        raise ValueError(
            "`alpha` must be a positive number (finite in float32) or None. "
            f"Received: alpha={alpha!r}"
        )
    return float(alpha)


def check_dropout(dropout):
    """Returns `dropout` as a float in [0, 1), else raises a `ValueError`."""
    if (
        isinstance(dropout, bool)
        or not isinstance(dropout, numbers.Real)
        or not 0 <= dropout < 1
    ):
        raise ValueError(
            f"`dropout` must be a float in [0, 1). Received: dropout={dropout!r}"
        )
    return float(dropout)


def check_rank_fits(rank, d_in, d_out, layer_name):
    """Raises if a rank-`rank` update cannot exist between d_in and d_out."""
    if rank > min(d_in, d_out):
        raise ValueError(
            f"`rank` must be at most min(d_in, d_out) = {min(d_in, d_out)} for "
            f"layer '{layer_name}' (d_in={d_in}, d_out={d_out}). "
            f"Received: rank={rank}"
        )


def lora_scale(rank, alpha, use_rslora):
    """The factor s in W + s·A·B: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def merged_kernel(kernel, lora_a, lora_b, merge_equation, scale, dtype=None):
    """Returns W + s·ΔW, computed in float32 and cast to the kernel's dtype.

    Args:
        kernel: the frozen base kernel (a variable or tensor).
        lora_a: the factor A, laid out as `merge_equation`'s first operand.
        lora_b: the factor B, laid out as `merge_equation`'s second operand.
        merge_equation: an einsum equation `"A,B->kernel"` that contracts the
            rank axis and lays ΔW out exactly like the kernel.
        scale: the float s.
        dtype: the result's dtype (default: the kernel's). `"float32"` keeps
            an update that rounding to a bf16 kernel would partly lose.

    Returns:
        A tensor of the kernel's shape, in `dtype` or the kernel's dtype.
    """
    delta = ops.einsum(
        merge_equation, ops.cast(lora_a, "float32"), ops.cast(lora_b, "float32")
    )
    merged = ops.add(ops.cast(kernel, "float32"), ops.multiply(delta, scale))
    return ops.cast(merged, dtype or kernel.dtype)


def layer_merged_kernel(layer, kernel, dtype=None):
    """`merged_kernel` of a LoRA layer's primary adapter on `kernel`."""
    return merged_kernel(
        kernel,
        layer.lora_a,
        layer.lora_b,
        layer.lora_merge_equation,
        layer.lora_scale,
        dtype=dtype,
    )
