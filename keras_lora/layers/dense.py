"""`LoRADense`: a `keras.layers.Dense` with a trainable low-rank update."""

import keras
from keras import ops

from keras_lora.layers import low_rank
from keras_lora.layers.lora_layer import LoRALayer


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRADense(LoRALayer, keras.layers.Dense):
    """Dense layer with a frozen kernel and a trainable rank-r update.

    Computes `activation(x W + b + s · ((dropout(x) A) B))` with A of shape
    `(d_in, rank)`, B of shape `(rank, units)` and `s = alpha / rank`
    (`alpha / sqrt(rank)` with `use_rslora`). `W` and `b` are frozen; only
    `lora_a` and `lora_b` train. The full `d_in × units` update is never built
    in a step. A starts He-uniform and B at zero, so a fresh layer computes
    exactly what its base `Dense` computes.

    The base may be quantized (`dtype="int8_from_float32"`, or
    `layer.quantize("int8")`/`"int4"` before or after the factors exist): the
    base output is then Keras's own int8/int4 computation, the kernel stays
    quantized in memory, and the factors stay float32 (QLoRA).

    Args:
        units: positive int, dimensionality of the output space.
        rank: positive int, the rank r of the update (at most
            `min(d_in, units)`).
        alpha: positive float or None; the update is scaled by `alpha / rank`.
            Defaults to `rank` (scale 1).
        dropout, use_rslora: as in `keras_lora.layers.lora_settings`.
        **kwargs: the other LoRA settings (`a_initializer`, `b_initializer`,
            `use_dora`, `init`: see `keras_lora.layers.lora_settings`) and any
            `keras.layers.Dense` argument (`activation`, `use_bias`, `name`,
            `dtype`, ...).

    Example:

    >>> layer = keras_lora.LoRADense(16, rank=4, alpha=8)
    >>> y = layer(np.ones((2, 32)))
    >>> [v.name for v in layer.trainable_weights]
    ['lora_a', 'lora_b']
    """

    _lora_base = keras.layers.Dense

    def __init__(
        self, units, rank=8, alpha=None, dropout=0.0, use_rslora=False, **kwargs
    ):
        settings = self.lora_settings_from(kwargs, rank, alpha, dropout, use_rslora)
        super().__init__(units, **kwargs)
        self._init_lora(settings)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_lora()

    def _lora_base_outputs(self, base_call, inputs, training):
        if base_call is not keras.layers.Dense.call:
            return super()._lora_base_outputs(base_call, inputs, training)
        # A float base, the hot path: `Dense.call` before its activation,
        # written out (no scope to enter, one Python frame fewer).
        x = ops.matmul(inputs, self.kernel)
        return x if self.bias is None else ops.add(x, self.bias)

    def _lora_delta(self, inputs, training, adapter=None):
        a, b = self._lora_factors(adapter)
        x = self._lora_input(inputs, training, adapter)
        return low_rank.matmul_update(x, a, b, self._lora_scale_of(adapter))
