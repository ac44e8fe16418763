"""`LoRAEinsumDense`: a `keras.layers.EinsumDense` with the paper's rank-r update.

The kernel's axes are split by the equation into input axes (contracted with
the input), output axes (only in the output) and group axes (in the input and
the output: one factor pair per group). ΔW is a rank-r matrix between the
flattened input axes and the flattened output axes, as in the paper: for a
query kernel `(hidden, heads, head_dim)`, A is `(hidden, r)` and B is
`(r, heads, head_dim)`. (Keras's own `EinsumDense.enable_lora` factorises only
the last axis, which is not the paper's update and costs far more parameters.)
"""

import math
import re
import string

import keras
from keras import ops

from keras_lora.layers import frozen_backward, low_rank, quantized
from keras_lora.layers.lora_layer import LoRALayer

_SPEC = r"([a-zA-Z]*(?:\.\.\.)?[a-zA-Z]*)"
_EQUATION = re.compile(_SPEC + r",([a-zA-Z]+)->" + _SPEC)


def split_einsum_equation(equation, expert_axes=""):
    """Splits an EinsumDense equation into the equations of the LoRA path.

    Args:
        equation: an equation `EinsumDense` accepts, e.g. `"abc,cde->abde"`.
        expert_axes: kernel letters that are group axes even where the input
            lacks them: a mixture-of-experts bank `"th,ehm->etm"` runs every
            token through every expert `e`, and each expert gets its own
            factors (A `ehr`, B `erm`), as group axes do.

    Returns:
        A dict with `group_axes`, `input_axes`, `output_axes` (kernel axis
        letters, in kernel order), `kernel` (the kernel's letters) and three
        einsum equations: `down` (x, A -> low-rank h), `up` (h, B -> output)
        and `merge` (A, B -> ΔW laid out like the kernel).

    Raises:
        ValueError: if the equation is malformed or has no input or no output
            axis in its kernel.
    """
    match = _EQUATION.fullmatch(equation) if isinstance(equation, str) else None
    if match is None:
        raise ValueError(
            "`equation` must be an EinsumDense equation such as 'abc,cd->abd'. "
            f"Received: equation={equation!r}"
        )
    inputs, kernel, output = match.groups()
    letters = lambda spec: spec.replace("...", "")  # noqa: E731
    in_letters, out_letters = set(letters(inputs)), set(letters(output))
    experts = [c for c in kernel if c in expert_axes and c in out_letters]
    group = [
        c for c in kernel if (c in in_letters and c in out_letters) or c in experts
    ]
    contracted = [c for c in kernel if c in in_letters and c not in out_letters]
    produced = [c for c in kernel if c in out_letters and c not in group]
    orphan = [c for c in kernel if c not in in_letters and c not in out_letters]
    if (
        not contracted
        or not produced
        or orphan
        or len(set(kernel)) != len(kernel)
        or len(experts) != len(expert_axes)
    ):
        raise ValueError(
            "LoRA needs an `equation` whose kernel has at least one axis "
            "contracted with the input, at least one axis that only the output "
            "has, and no axis that is summed away or repeated. "
            f"Received: equation={equation!r}"
        )
    rank_axis = next(c for c in string.ascii_letters if c not in equation)
    a_spec = "".join(group + contracted) + rank_axis
    b_spec = "".join(group) + rank_axis + "".join(produced)
    # The low-rank intermediate keeps every input axis the output keeps.
    # (and the expert axes the input lacks, in front).
    hidden = "".join(c for c in experts if c not in in_letters)
    hidden += "".join(
        token
        for token in re.findall(r"\.\.\.|[a-zA-Z]", inputs)
        if token == "..." or token in out_letters
    )
    hidden += rank_axis
    return {
        "group_axes": group,
        "input_axes": contracted,
        "output_axes": produced,
        "kernel": kernel,
        "down": f"{inputs},{a_spec}->{hidden}",
        "up": f"{hidden},{b_spec}->{output}",
        "merge": f"{a_spec},{b_spec}->{kernel}",
    }


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAEinsumDense(LoRALayer, keras.layers.EinsumDense):
    """EinsumDense layer with a frozen kernel and a trainable rank-r update.

    Computes `einsum(equation, x, W) + b + s · ((dropout(x) · A) · B)`, where
    A maps the kernel's flattened input axes to rank r and B maps r to its
    flattened output axes (one pair per group axis, if any). Only `lora_a` and
    `lora_b` train; a fresh layer equals its base `EinsumDense` exactly.

    Args:
        equation: an equation `keras.layers.EinsumDense` accepts.
        output_shape: the output shape, as for `EinsumDense`.
        rank: positive int, at most `min(d_in, d_out)` of the flattened axes.
        alpha: positive float or None (defaults to `rank`); scale alpha/rank.
        dropout, use_rslora: as in `keras_lora.layers.lora_settings`.
        **kwargs: the other LoRA settings (`use_dora`, `init`, the
            initializers: see `keras_lora.layers.lora_settings`) and any
            `EinsumDense` argument (`bias_axes`, `activation`, ...).

    Example:

    >>> query = keras_lora.LoRAEinsumDense(
    ...     "abc,cde->abde", output_shape=(None, 4, 16), rank=8
    ... )
    >>> query(np.ones((2, 10, 64))).shape
    (2, 10, 4, 16)
    >>> query.lora_a.shape, query.lora_b.shape
    ((64, 8), (8, 4, 16))
    """

    _lora_base = keras.layers.EinsumDense

    def __init__(
        self,
        equation,
        output_shape,
        rank=8,
        alpha=None,
        dropout=0.0,
        use_rslora=False,
        **kwargs,
    ):
        split_einsum_equation(equation)  # fail early on an unsupported equation
        settings = self.lora_settings_from(kwargs, rank, alpha, dropout, use_rslora)
        super().__init__(equation, output_shape, **kwargs)
        self._init_lora(settings)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_lora()

    def call(self, inputs, training=None):
        # The frozen kernel's input gradient is made in the backward pass
        # (JAX, TensorFlow: `frozen_backward.py`); PyTorch: Keras's call.
        return self._lora_forward(_LEAN_CALL, inputs, training)

    def _lora_layout(self):
        return self._layout_of(self.equation)

    def _layout_of(self, equation, expert_axes=""):
        """`_lora_layout` for `equation` (see `split_einsum_equation`)."""
        equations = split_einsum_equation(equation, expert_axes)
        # Read on every call: decided once here.
        self._lora_equations = {**equations, "is_matmul": _is_matmul(equations)}
        kernel_axes = self._lora_equations["kernel"]
        size = dict(zip(kernel_axes, quantized.kernel_shape(self)))
        dims = lambda axes: [size[c] for c in axes]  # noqa: E731
        groups = dims(self._lora_equations["group_axes"])
        d_in = dims(self._lora_equations["input_axes"])
        d_out = dims(self._lora_equations["output_axes"])
        a_shape = tuple(groups + d_in + [self.rank])
        b_shape = tuple(groups + [self.rank] + d_out)
        return a_shape, b_shape, math.prod(d_in), math.prod(d_out)

    @property
    def lora_merge_equation(self):
        return self._lora_equations["merge"]

    def _lora_kernel_input_axes(self):
        equations = self._lora_equations
        return tuple(equations["kernel"].index(c) for c in equations["input_axes"])

    def _lora_output_view(self, vector):
        """A tensor over the kernel's non-input axes (kernel order), laid out
        to broadcast against the output: its axes in the output's order, with
        1 for every output axis the kernel does not have after the first."""
        kernel = self._lora_equations["kernel"]
        letters = [c for c in kernel if c not in self._lora_equations["input_axes"]]
        output = self._lora_equations["up"].split("->")[1]
        tail = output[min(output.index(c) for c in letters) :]
        if "..." in tail:
            raise ValueError(
                f"DoRA cannot broadcast its magnitude over the output of layer "
                f"'{self.name}'. Received: equation={self.equation!r}"
            )
        ordered = sorted(letters, key=tail.index)
        if ordered != letters:
            vector = ops.transpose(vector, [letters.index(c) for c in ordered])
        sizes = dict(zip(ordered, ops.shape(vector)))
        return ops.reshape(vector, tuple(sizes.get(c, 1) for c in tail))

    def _lora_output_bias(self):
        return self.bias  # Keras shapes it to broadcast against the output

    def _lora_is_matmul(self):
        """True if the LoRA path is `reshape(x, (-1, d_in)) @ A @ B` reshaped.

        That is: no group axis, the contracted axes are the input's last axes
        (in kernel order) and the output is the input's other axes followed by
        the kernel's output axes (in kernel order), as for every KerasHub
        attention projection. Two plain matmuls are cheaper than einsums on
        PyTorch and let `low_rank.torch_down` lay A out for its backward pass.
        """
        return self._lora_equations["is_matmul"]

    def _lora_base_outputs(self, base_call, inputs, training):
        if base_call is not keras.layers.EinsumDense.call:
            return super()._lora_base_outputs(base_call, inputs, training)
        # A float base, the hot path: `EinsumDense.call` before its
        # activation, written out (no scope to enter, one frame fewer).
        x = ops.einsum(self.equation, inputs, self.kernel)
        return x if self.bias is None else ops.add(x, self.bias)

    def _lora_delta(self, inputs, training, adapter=None):
        a, b = self._lora_factors(adapter)
        equations = self._lora_equations
        lora_inputs = self._lora_input(inputs, training, adapter)
        if self._lora_is_matmul():
            scale = self._lora_scale_of(adapter)
            return low_rank.matmul_update(lora_inputs, a, b, scale)
        low = ops.einsum(equations["down"], lora_inputs, a)
        return ops.einsum(equations["up"], self._scaled(low, adapter), b)


_LEAN_CALL = frozen_backward.lean_call(keras.layers.EinsumDense.call)


def _is_matmul(eq):
    """See `LoRAEinsumDense._lora_is_matmul`."""
    inputs = eq["down"].split(",")[0]
    output = eq["up"].split("->")[1]
    contracted = "".join(eq["input_axes"])
    kept = inputs[: len(inputs) - len(contracted)]
    return (
        not eq["group_axes"]
        and inputs.endswith(contracted)
        and output == kept + "".join(eq["output_axes"])
    )
