"""Layouts of the LoRA factors under a `keras.distribution.ModelParallel`.

Keras gives a variable its layout when the variable is created, from the
active distribution's `LayoutMap` (a regex per variable path); a path that no
key matches is replicated on every device. The factors are new paths that a
model's layout map (KerasHub's `get_layout_map`, or a user's) does not know,
so without help each `lora_a` / `lora_b` would be a full replica on every
device, whatever the kernel's layout; worse, a broad key such as
`".*query.*"` could hand a factor the kernel's layout, whose rank does not fit
(keras issue 19496).

While a LoRA layer creates its factors, `factor_layouts(layer)` makes the
distribution answer for them with a layout derived from the base kernel's:

- A takes the kernel's sharding of its input axes (and group axes),
  B the kernel's sharding of its output axes (and group axes);
- the rank axis is never sharded;
- an axis whose size the mesh axes do not divide is replicated instead (the
  kernel may shard an axis that, say, a per-head factor axis does not share);
- a `LayoutMap` key that names a factor (the key contains `"lora"` and matches
  the factor's path, or is the exact path) wins over the derived layout.

Which kernel axis is an input, output or group axis is the layer's own merge
equation `"A,B->kernel"` (`layer.lora_merge_equation`): each factor axis
letter that the kernel has takes the kernel's layout of that axis. So Dense,
EinsumDense in any axis order (GPT-2 `(hidden, heads, head_dim)`, Gemma
`(heads, hidden, head_dim)`) and the embeddings follow the same rule.

Optimizer slots follow: Keras creates each slot with its variable's layout.
Outside a `ModelParallel` (no distribution, `DataParallel`, TensorFlow or
PyTorch) nothing changes: factors are replicated like every variable there.
"""

import contextlib
import copy
import math
import re

import keras

# The names LoRA layers give their factors (a named adapter's factors start
# with them too).
_FACTOR_PREFIXES = ("lora_a", "lora_b")


@contextlib.contextmanager
def factor_layouts(layer):
    """Gives the factors `layer` creates in this block layouts derived from its kernel.

    Use it around the `add_weight` calls that create the factors, after the
    kernel exists and `layer.lora_merge_equation` can be read. A variable
    whose name starts with `"lora_a"` is laid out as A, `"lora_b"` as B; any
    other variable created in the block gets the distribution's usual layout.

    Args:
        layer: a LoRA layer whose base kernel is built.

    Example:

    >>> with factor_layouts(self):
    ...     self.lora_a = self.add_weight(name="lora_a", shape=a_shape)
    ...     self.lora_b = self.add_weight(name="lora_b", shape=b_shape)
    """
    distribution = keras.distribution.distribution()
    if not isinstance(distribution, keras.distribution.ModelParallel):
        yield
        return
    # A shallow copy is still a `ModelParallel` (same mesh and layout map) for
    # any code that checks the type; only its answer for the factors differs.
    derived = copy.copy(distribution)
    usual = distribution.get_variable_layout

    def get_variable_layout(variable):
        role = _factor_role(variable.name)
        if role is None or getattr(variable, "_layout", None) is not None:
            return usual(variable)
        return factor_layout(layer, role, variable.path, variable.shape, distribution)

    derived.get_variable_layout = get_variable_layout
    keras.distribution.set_distribution(derived)
    try:
        yield
    finally:
        keras.distribution.set_distribution(distribution)


def factor_layout(layer, role, path, shape, distribution):
    """Returns the `TensorLayout` of one factor of `layer` under `distribution`.

    Args:
        layer: the LoRA layer (its kernel and `lora_merge_equation` are read).
        role: `"lora_a"` or `"lora_b"`.
        path: the factor variable's path (for the layout map).
        shape: the factor's shape.
        distribution: a `keras.distribution.ModelParallel`.

    Returns:
        The layout map's entry for the factor if a key names it, else the
        layout derived from the kernel's.
    """
    if role not in _FACTOR_PREFIXES:
        raise ValueError(
            f"`role` must be one of {_FACTOR_PREFIXES}. Received: role={role!r}"
        )
    mesh = distribution.device_mesh
    chosen = _named_entry(_layout_map(distribution), path)
    if chosen is not None:
        return chosen
    kernel = layer.lora_base_kernel
    kernel_axes = _axes(getattr(kernel, "_layout", None), len(kernel.shape))
    if kernel_axes is None:
        kernel_axes = _axes(distribution.get_variable_layout(kernel), len(kernel.shape))
    operands, kernel_spec = layer.lora_merge_equation.split("->")
    a_spec, b_spec = operands.split(",")
    by_letter = dict(zip(kernel_spec, kernel_axes or (None,) * len(kernel_spec)))
    spec = a_spec if role == "lora_a" else b_spec
    axes = [by_letter.get(letter) for letter in spec]
    axes = [
        axis if _divides(size, axis, mesh) else None for size, axis in zip(shape, axes)
    ]
    return keras.distribution.TensorLayout(axes, mesh)


def _factor_role(name):
    for prefix in _FACTOR_PREFIXES:
        if name.startswith(prefix):
            return prefix
    return None


def _layout_map(distribution):
    # `ModelParallel` keeps its `LayoutMap` private; it is read here only.
    return getattr(distribution, "_layout_map", None) or {}


def _named_entry(layout_map, path):
    """The layout map's entry for `path` if a key names a factor, else None."""
    # `LayoutMap.__contains__` is true for any key (its lookup returns None
    # rather than raising), so the keys are compared as a list.
    keys = list(layout_map)
    if path in keys:
        return layout_map[path]
    keys = [key for key in keys if "lora" in key and re.fullmatch(key, path)]
    if len(keys) > 1:
        raise ValueError(
            f"LoRA factor '{path}' matches several layout map keys: {keys}. "
            "Make each factor path match at most one key that names a factor."
        )
    return layout_map[keys[0]] if keys else None


def _axes(layout, ndim):
    """A layout's per-axis mesh axes as a tuple, or None without a layout."""
    if layout is None:
        return None
    axes = getattr(layout, "axes", None)
    if axes is None:
        # A backend layout (a `jax.sharding.NamedSharding`): its spec may
        # omit trailing unsharded axes.
        axes = tuple(getattr(layout, "spec", ()))
    axes = tuple(axes) + (None,) * (ndim - len(axes))
    return axes[:ndim]


def _divides(size, axis, mesh):
    """True if the mesh axis (or axes) `axis` splits `size` evenly."""
    if axis is None:
        return True
    names = axis if isinstance(axis, (tuple, list)) else (axis,)
    sizes = dict(zip(mesh.axis_names, mesh.shape))
    return size % math.prod(sizes[name] for name in names) == 0
