"""`LoRAConv1D`, `LoRAConv2D`, `LoRAConv3D`: convolutions with a rank-r update.

The update is loralib's and PEFT's: A is a convolution with the base's kernel
size, strides, padding and dilation and `rank` output channels, B a 1×1
convolution from `rank` channels to the base's `filters`. Both are applied as
convolutions (the kernel-shaped ΔW is never built in a step). A is stored as
`(*kernel_size, in_channels, rank)` and B as `(rank, filters)`, so
`einsum(lora_merge_equation, A, B)` is ΔW laid out exactly like the kernel
`(*kernel_size, in_channels, filters)`, and merging is exact.

Keras's `BaseConv` keeps the number of spatial axes in `self.rank`, the name
LoRA layers use for the LoRA rank (public API). The LoRA rank wins; Keras's
own code (its `build` and `call`) runs in `base_call_scope`, where `rank`
reads the spatial rank. Keras's value never leaves the instance's `__dict__`
(the LoRA rank is the primary adapter's), so a merged layer still has it.
"""

import math

import keras
from keras import ops

from keras_lora.layers.base_call import (
    base_call_scope,
    in_base_call,
    stored_attribute,
)
from keras_lora.layers.lora_layer import LoRALayer

# Spatial axis letters of the merge equation, for 1, 2 and 3 spatial axes.
_SPATIAL = {1: "w", 2: "hw", 3: "dhw"}


def _check_groups(groups, name):
    if groups != 1:
        raise ValueError(
            f"LoRA cannot adapt the grouped convolution '{name}': a rank-r "
            "update of a grouped kernel is not one low-rank matrix. Adapt "
            "convolutions with `groups=1`, or leave this one out of `targets`. "
            f"Received: groups={groups}"
        )


class _LoRAConv(LoRALayer):
    """What the three convolution classes share."""

    def __init__(
        self,
        filters,
        kernel_size,
        rank=8,
        alpha=None,
        dropout=0.0,
        use_rslora=False,
        **kwargs,
    ):
        settings = self.lora_settings_from(kwargs, rank, alpha, dropout, use_rslora)
        super().__init__(filters, kernel_size, **kwargs)
        _check_groups(self.groups, self.name)
        self._init_lora(settings)

    # A property, read per thread: a call never changes the layer's state.
    @property
    def rank(self):
        """The LoRA rank; the number of spatial axes to Keras's own code."""
        if in_base_call(self) or self._lora_adapters is None:
            return stored_attribute(self, "rank")  # Keras's, as it set it
        return self.lora_primary_adapter.rank

    @rank.setter
    def rank(self, value):  # Keras's `BaseConv.__init__` sets the spatial rank
        self.__dict__["rank"] = value

    def build(self, input_shape):
        with base_call_scope(self):
            super().build(input_shape)
        self._build_lora()

    @classmethod
    def adapt(cls, layer, **settings):
        _check_groups(layer.groups, layer.path or layer.name)
        return super().adapt(layer, **settings)

    def _lora_layout(self):
        in_channels = self._kernel.shape[-2]
        d_in = math.prod(self.kernel_size) * in_channels
        a_shape = (*self.kernel_size, in_channels, self.rank)
        return a_shape, (self.rank, self.filters), d_in, self.filters

    @property
    def lora_merge_equation(self):
        spatial = _SPATIAL[len(self.kernel_size)]
        return f"{spatial}ir,ro->{spatial}io"

    def call(self, inputs, training=None):
        return self._lora_forward(_base_call, inputs, training)

    def _lora_kernel_input_axes(self):
        return tuple(range(len(self.kernel_size) + 1))  # spatial and in_channels

    def _lora_output_view(self, vector):
        if self.data_format == "channels_first":  # (filters, 1, ..., 1)
            return ops.reshape(vector, (-1,) + (1,) * len(self.kernel_size))
        return vector

    def _lora_delta(self, inputs, training, adapter=None):
        a, b = self._lora_factors(adapter)
        x = self._lora_input(inputs, training, adapter)
        padding = self.padding
        if padding == "causal":  # Conv1D: the base pads the same way
            x = ops.pad(x, self._compute_causal_padding())
            padding = "valid"
        low_rank = ops.conv(
            x,
            a,
            strides=list(self.strides),
            padding=padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        spatial = len(self.kernel_size)
        up = ops.reshape(b, (1,) * spatial + tuple(b.shape))  # a 1×1 kernel
        return ops.conv(
            self._scaled(low_rank, adapter), up, data_format=self.data_format
        )


def _base_call(layer, inputs, training=None):
    """The base class's own `call` (it takes no `training` argument).

    Runs inside `base_call_scope` (`LoRALayer._lora_base_outputs`), where
    `rank` is Keras's spatial rank."""
    return layer._lora_base.call(layer, inputs)


_DOC = """{base} layer with a frozen kernel and a trainable rank-r update.

    Computes `activation(conv(x, W) + b + s · conv(conv(dropout(x), A), B))`
    with A a convolution of the base's kernel size, strides, padding and
    dilation into `rank` channels (stored `(*kernel_size, in_channels, rank)`),
    B a 1×1 convolution from `rank` channels to `filters` (stored
    `(rank, filters)`) and `s = alpha / rank` (`alpha / sqrt(rank)` with
    `use_rslora`). A starts He-uniform and B at zero, so a fresh layer computes
    exactly what its base `{base}` computes. `layer.rank` is the LoRA rank.
    Grouped convolutions (`groups > 1`) are refused.

    Args:
        filters: positive int, the number of output channels.
        kernel_size: int or tuple, as in `keras.layers.{base}`.
        rank: positive int, the rank r of the update (at most
            `min(prod(kernel_size) * in_channels, filters)`).
        alpha: positive float or None; the update is scaled by `alpha / rank`.
            Defaults to `rank` (scale 1).
        dropout, use_rslora: as in `keras_lora.layers.lora_settings`.
        **kwargs: the other LoRA settings (`use_dora`, `init`, the
            initializers: see `keras_lora.layers.lora_settings`) and any
            `keras.layers.{base}` argument (`strides`, `padding`, `activation`,
            ...).

    Example:

    >>> layer = keras_lora.{name}(8, 3, rank=2)
    >>> y = layer(np.ones({shape}))
    >>> [v.name for v in layer.trainable_weights]
    ['lora_a', 'lora_b']
    """


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAConv1D(_LoRAConv, keras.layers.Conv1D):
    __doc__ = _DOC.format(base="Conv1D", name="LoRAConv1D", shape="(2, 10, 4)")
    _lora_base = keras.layers.Conv1D


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAConv2D(_LoRAConv, keras.layers.Conv2D):
    __doc__ = _DOC.format(base="Conv2D", name="LoRAConv2D", shape="(2, 10, 10, 4)")
    _lora_base = keras.layers.Conv2D


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAConv3D(_LoRAConv, keras.layers.Conv3D):
    __doc__ = _DOC.format(base="Conv3D", name="LoRAConv3D", shape="(2, 6, 6, 6, 4)")
    _lora_base = keras.layers.Conv3D
