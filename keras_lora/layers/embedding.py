"""`LoRAEmbedding` and `LoRAReversibleEmbedding`: embeddings with a rank-r update."""

import keras
from keras import ops

from keras_lora.keras_private import set_keras_mask
from keras_lora.layers import quantized_backward
from keras_lora.layers.base_call import base_call_scope, hidden_in_base_call
from keras_lora.layers.lora_layer import LoRALayer

# PEFT's choice for embeddings: the gathered factor starts at zero and the
# other one is random, so ΔW = 0 at start and both factors get gradients.
EMBEDDING_A_INITIALIZER = "zeros"
EMBEDDING_B_INITIALIZER = {"class_name": "RandomNormal", "config": {"stddev": 1.0}}


class _LoRALookup(LoRALayer):
    """Lookup path shared by both embedding classes: E[ids] + s·A[ids]·B."""

    _lora_kernel_attr = "_embeddings"

    lora_default_settings = {
        "a_initializer": EMBEDDING_A_INITIALIZER,
        "b_initializer": EMBEDDING_B_INITIALIZER,
    }

    def __init__(
        self,
        input_dim,
        output_dim,
        rank=8,
        alpha=None,
        dropout=0.0,
        use_rslora=False,
        **kwargs,
    ):
        settings = self.lora_settings_from(kwargs, rank, alpha, dropout, use_rslora)
        super().__init__(input_dim, output_dim, **kwargs)
        self._init_lora(settings)

    def build(self, input_shape=None):
        super().build(input_shape)
        self._build_lora()

    def call(self, inputs, training=None):
        return self._lora_forward(keras.layers.Embedding.call, inputs, training)

    def quantized_call(self, inputs, training=None):
        return self._lora_forward(
            keras.layers.Embedding.quantized_call, inputs, training
        )

    def _lora_forward(self, base_call, inputs, training):
        # No activation, and the base calls take no `training` argument.
        outputs = base_call(self, inputs)
        return ops.add(outputs, self._lora_delta(inputs, training))

    def _lora_delta(self, inputs, training, adapter=None):
        if inputs.dtype != "int32" and inputs.dtype != "int64":
            inputs = ops.cast(inputs, "int32")
        a, b = self._lora_factors(adapter)
        low_rank = self._lora_input(ops.take(a, inputs, axis=0), training, adapter)
        return ops.matmul(self._scaled(low_rank, adapter), b)


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAEmbedding(_LoRALookup, keras.layers.Embedding):
    """Embedding layer with a frozen table and a trainable rank-r update.

    Looks up `E[ids] + s · A[ids] B`, with A of shape `(input_dim, rank)` and B
    of shape `(rank, output_dim)`. As in PEFT, the gathered factor A starts at
    zero and B is random, so a fresh layer equals its base `Embedding`.
    Dropout, if any, acts on the gathered rows of A in training.

    KerasHub's `ReversibleEmbedding` (token embeddings whose transpose is also
    the output projection of causal LMs) becomes a `LoRAReversibleEmbedding`
    under `enable_lora`: with tied weights the reverse projection uses the same
    updated table, `logits = x (E + s·A·B)ᵀ`, computed in factored form, so the
    merged model is exactly the adapted one. With untied weights the separate
    `reverse_embeddings` stay frozen and untouched.

    Args:
        input_dim: int, vocabulary size.
        output_dim: int, embedding size.
        rank: positive int, at most `min(input_dim, output_dim)`.
        alpha: positive float or None (defaults to `rank`).
        dropout, use_rslora: as in `keras_lora.layers.lora_settings`.
        **kwargs: the initializers (defaults here: A zeros, B normal with
            stddev 1; see `keras_lora.layers.lora_settings`) and any
            `keras.layers.Embedding` argument.

    Example:

    >>> layer = keras_lora.LoRAEmbedding(1000, 64, rank=4)
    >>> layer(np.array([[1, 2, 3]])).shape
    (1, 3, 64)
    """

    _lora_base = keras.layers.Embedding


if hasattr(keras.layers, "ReversibleEmbedding"):

    @keras.saving.register_keras_serializable(package="keras_lora")
    class LoRAReversibleEmbedding(_LoRALookup, keras.layers.ReversibleEmbedding):
        """`ReversibleEmbedding` with a rank-r update of its (tied) table.

        See `LoRAEmbedding`; with `tie_weights=True` the reverse projection is
        `x (E + s·A·B)ᵀ = x Eᵀ + s·(x Bᵀ) Aᵀ`.
        """

        _lora_base = keras.layers.ReversibleEmbedding

        def call(self, inputs, reverse=False, training=None):
            if reverse:
                return self._reverse(self._reverse_base, inputs)
            return self._forward_with_mask(super().call, inputs, training)

        def quantized_call(self, inputs, reverse=False, training=None):
            if reverse:
                base = self._int_reverse
                if self.tie_weights:
                    base = quantized_backward.reverse_input_gradient(self, base)
                return self._reverse(base, inputs)
            return self._forward_with_mask(super().quantized_call, inputs, training)

        def _int_reverse(self, inputs):
            # Keras's quantized logits without the soft cap (applied after
            # the low-rank term, in `_reverse`): see `logit_soft_cap`.
            with base_call_scope(self):
                return keras.layers.Layer.quantized_call(self, inputs, reverse=True)

        # Read per thread, like `LoRALayer.activation`: Keras's quantized
        # reverse call sees no cap, every other reader the real one.
        logit_soft_cap = hidden_in_base_call("logit_soft_cap")

        def _forward_with_mask(self, lookup, inputs, training):
            outputs = lookup(inputs, training=training)
            mask = keras.layers.Embedding.compute_mask(self, inputs)
            if mask is not None:
                set_keras_mask(outputs, mask)
            return outputs

        def _reverse_base(self, inputs):
            if self.tie_weights:
                kernel = ops.transpose(self._embeddings)
            else:
                kernel = self.reverse_embeddings
            if self.reverse_dtype is not None:
                inputs = ops.cast(inputs, self.reverse_dtype)
                kernel = ops.cast(kernel, self.reverse_dtype)
            return ops.matmul(inputs, kernel)

        def _tied_update(self, inputs, adapter=None):
            """`s·(x Bᵀ) Aᵀ` of `adapter` (the logits' update)."""
            a, b = self._lora_factors(adapter)
            if self.reverse_dtype is not None and self.quantization_mode is None:
                inputs = ops.cast(inputs, self.reverse_dtype)
                a = ops.cast(a, self.reverse_dtype)
                b = ops.cast(b, self.reverse_dtype)
            low_rank = ops.matmul(ops.cast(inputs, b.dtype), ops.transpose(b))
            return ops.matmul(self._scaled(low_rank, adapter), ops.transpose(a))

        def _reverse(self, base, inputs):
            """Logits: the base's, plus `s·(x Bᵀ) Aᵀ` when the table is tied."""
            logits = base(inputs)
            if self.tie_weights:
                if self._lora_example_ids is not None:
                    raise ValueError(
                        "Per-example adapters (`adapter_ids`) do not support "
                        f"the tied logits of layer '{self.path}': adapt the "
                        "attention layers, not the embedding."
                    )
                update = self._lora_each_active(
                    lambda adapter: self._tied_update(inputs, adapter)
                )
                if update is not None:
                    logits = ops.add(logits, ops.cast(update, logits.dtype))
            if self.logit_soft_cap is not None:
                cap = self.logit_soft_cap
                logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
            return logits
