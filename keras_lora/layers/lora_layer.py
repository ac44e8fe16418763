"""`LoRALayer`: the machinery every LoRA layer type shares.

A LoRA layer is its Keras base class (`Dense`, `EinsumDense`, `Embedding`, ...)
plus two float32 factors and a frozen base. The base output is the base
class's own `call`, or its `quantized_call` on an int8/int4 base, so every
quantization mode Keras implements for that class works unchanged; the LoRA
layer adds `s·(dropout(x)·A)·B` before the activation. The subclass says two
things: where the factors sit relative to the kernel (`_lora_layout`) and how
x meets A and B (`_lora_delta`). Everything else lives here, once.

The same object can become a LoRA layer after it was built (`enable_lora`
changes its class in place, so every reference held by a Functional graph or a
KerasHub block stays valid) and turn back into its base class (`merge_lora`):
`lora_conversion.py`. What it saves and its config: `lora_saving.py`.
"""

import keras
from keras import ops

from keras_lora.class_view import ClassViewMixin
from keras_lora.layers import (
    low_rank,
    quantized,
    quantized_backward,
)
from keras_lora.layers.adapter_set import Adapter, AdapterSet
from keras_lora.layers.base_call import base_call_scope, hidden_in_base_call
from keras_lora.layers.lora_conversion import LoRAConversion
from keras_lora.layers.lora_saving import LoRASaving
from keras_lora.layers.lora_settings import LoRASettings
from keras_lora.layers.protocol import LoRAProtocol


class LoRALayer(ClassViewMixin, LoRAProtocol, AdapterSet, LoRASaving, LoRAConversion):
    """Mixin placed before the Keras base class in every LoRA layer."""

    # The Keras base class, and its attribute that holds the kernel variable.
    _lora_base = None
    _lora_kernel_attr = "_kernel"

    def lora_settings_from(self, kwargs, *named):
        """The LoRA settings of a constructor: the ones it names (`rank`,
        `alpha`, `dropout`, `use_rslora`, in that order, as shared/DESIGN.md's
        signatures give them) and the rest from its `kwargs` (taken out of
        it), over this layer type's defaults; see `LoRASettings`."""
        given = dict(zip(LoRASettings.NAMES, named))
        return LoRASettings.pop_from(kwargs, self.lora_default_settings, **given)

    def _init_lora(self, settings):
        """Records the primary adapter's settings (a dict of `LoRASettings`)."""
        if getattr(self, "lora_rank", None):
            raise ValueError(
                "`lora_rank` (Keras's built-in LoRA) cannot be combined with "
                f"{type(self).__name__}; use `rank`. "
                f"Received: lora_rank={self.lora_rank}"
            )
        settings = LoRASettings(**settings)
        for variant in settings.variants:
            variant.check(self)
        self._lora_set_adapters({"default": Adapter("default", settings)})

    def _build_lora(self):
        """Freezes the base variables and adds the primary adapter's factors
        and its variants' state (DoRA's magnitude, PiSSA/OLoRA's start)."""
        quantized.check_mode(self.quantization_mode, self.name)
        for variable in self.weights:
            variable.trainable = False
        self._lora_replace_primary(self._lora_make_factors(self.lora_primary_adapter))
        for variant in self.lora_variants:
            variant.build(self)

    @property
    def lora_variants(self):
        """The primary adapter's variants (`variant.py`), the update's last."""
        return self.lora_primary_adapter.settings.variants

    # The primary adapter's settings and factors under the names a
    # single-adapter user knows (shared/DESIGN.md's stable names).
    lora_a = property(lambda self: self.lora_primary_adapter.a)
    lora_b = property(lambda self: self.lora_primary_adapter.b)
    lora_seed_generator = property(
        lambda self: self.lora_primary_adapter.seed_generator
    )
    rank = property(lambda self: self.lora_primary_adapter.rank)
    alpha = property(lambda self: self.lora_primary_adapter.alpha)
    _alpha_arg = property(lambda self: self.lora_primary_adapter.alpha_arg)
    dropout = property(lambda self: self.lora_primary_adapter.dropout)
    use_rslora = property(lambda self: self.lora_primary_adapter.use_rslora)
    lora_scale = property(lambda self: self.lora_primary_adapter.scale)
    a_initializer = property(
        lambda self: self.lora_primary_adapter.settings.a_initializer
    )
    b_initializer = property(
        lambda self: self.lora_primary_adapter.settings.b_initializer
    )
    use_dora = property(lambda self: self.lora_primary_adapter.settings.use_dora)
    lora_init = property(lambda self: self.lora_primary_adapter.settings.init)

    # Where the factors sit: a (d_in, d_out) kernel's layout (Dense,
    # Embedding); the other layer types override these two.
    def _lora_layout(self):
        """Returns (A shape, B shape, d_in, d_out) of the primary adapter."""
        d_in, d_out = quantized.kernel_shape(self)
        return (d_in, self.rank), (self.rank, d_out), d_in, d_out

    @property
    def lora_merge_equation(self):
        """Einsum `"A,B->kernel"` that lays s·A·B out like the kernel."""
        return "ir,ro->io"

    @property
    def lora_base_kernel(self):
        """The frozen base kernel variable (int8/packed int4 when quantized)."""
        return getattr(self, self._lora_kernel_attr)

    # The forward pass: the base class's own output, plus the low-rank term
    # before the activation.
    def call(self, inputs, training=None):
        return self._lora_forward(self._lora_base.call, inputs, training)

    def quantized_call(self, inputs, training=None):
        lean = quantized_backward.lean_call(self._lora_base.quantized_call, self)
        return self._lora_forward(lean, inputs, training)

    def _lora_forward(self, base_call, inputs, training):
        outputs = self._lora_base_outputs(base_call, inputs, training)
        if self._lora_active is None:  # the primary adapter alone
            update = self._lora_primary_record.settings.variants[-1]
            outputs = update.outputs(self, base_call, outputs, inputs, training)
        else:
            delta = self._lora_total_delta(inputs, training)
            if delta is not None:  # None: no adapter active on this layer
                outputs = ops.add(outputs, delta)
        activation = self.activation
        return outputs if activation is None else activation(outputs)

    def _lora_base_outputs(self, base_call, inputs, training):
        """The base class's output before its activation.

        Keras applies the activation inside `call`; the update must come
        before it, so the base runs with `self.activation` reading None on
        this thread for this layer (see `activation`). No state of the layer
        changes: other threads calling it meanwhile see the real activation.
        """
        with base_call_scope(self):
            return base_call(self, inputs, training=training)

    # Keras's base classes apply `self.activation` inside `call`; the update
    # must come before it. A property (a data descriptor, so it takes
    # precedence over the instance attribute Keras set) reads None in the
    # base call only; the value stays where Keras put it, in the instance's
    # `__dict__`, so a layer turned back into its base class keeps it.
    activation = hidden_in_base_call("activation")

    # How a per-output-unit vector (DoRA's magnitude) meets the kernel and
    # the outputs. Dense's layout; the other layer types override these.
    def _lora_kernel_input_axes(self):
        """The kernel axes contracted with the input."""
        return (0,)

    def _lora_output_view(self, vector):
        """`vector` (the kernel's non-input axes) shaped to broadcast against
        the layer's outputs."""
        return vector

    def _lora_output_bias(self):
        """The bias as it is added to the outputs, or None."""
        bias = getattr(self, "bias", None)
        return None if bias is None else self._lora_output_view(bias)

    def _lora_delta(self, inputs, training, adapter=None):
        """Returns s·(dropout(x)·A)·B shaped like the output.

        `adapter` is the named adapter to compute (None: the primary one, the
        fast path). Subclasses define it.
        """
        raise NotImplementedError

    def _lora_input(self, x, training, adapter=None):
        """Dropout on the LoRA path's input, in training only.

        `self.dropout` is tested first: under `keras.RematScope` on JAX,
        `jax.checkpoint` turns `training` into a traced bool that Python cannot
        branch on. With dropout and a traced flag, both paths are computed and
        `where` picks one.
        """
        adapter = adapter or self._lora_primary_record
        dropout = adapter.dropout
        if not dropout or training is None or training is False:
            return x
        if training is not True and keras.backend.backend() == "jax":
            # The seed generator's state update would leak out of
            # `jax.checkpoint` (Keras's own `Dropout` layer fails there too).
            raise ValueError(
                f"LoRA dropout cannot run in layer '{self.name}' under "
                "`keras.RematScope` on JAX (modes 'full', 'list_of_layers' and "
                "'larger_than'): use `dropout=0.0`, or "
                "`RematScope(mode='activations')`. "
                f"Received: dropout={dropout}"
            )
        dropped = keras.random.dropout(x, dropout, seed=adapter.seed_generator)
        if training is True:
            return dropped
        return ops.where(ops.cast(training, "bool"), dropped, x)

    def _lora_factors(self, adapter=None):
        """The factors in the compute dtype (they are stored in float32)."""
        dtype = self.compute_dtype
        adapter = adapter or self._lora_primary_record
        a, b = adapter.a, adapter.b
        if a.dtype != dtype:
            return ops.cast(a, dtype), ops.cast(b, dtype)
        return a.value, b.value

    def _scaled(self, x, adapter=None):
        """Multiplies the small rank-r intermediate by s (skipped when s = 1)."""
        return low_rank.scaled(x, self._lora_scale_of(adapter))

    def _lora_scale_of(self, adapter=None):
        """s of `adapter` (None: the primary adapter)."""
        return (adapter or self._lora_primary_record).scale

    def merged_kernel(self, dtype=None):
        """Returns dequant(W) + s·ΔW for merge and export.

        Computed in float32. A float base's kernel is returned in its own dtype
        unless `dtype` is given; a quantized base's merged kernel is float32
        (re-quantize it with `quantized.twin`).
        """
        kernel = self._lora_float_kernel()
        update = self.lora_variants[-1]
        if self._lora_active is not None and update.additive:
            # Named adapters: the active set.
            merged = ops.add(ops.cast(kernel, "float32"), self.lora_update())
            return ops.cast(merged, dtype or kernel.dtype)
        return update.merged_kernel(self, kernel, dtype)

    def _lora_float_kernel(self):
        """W: the base kernel, dequantized (float32) on a quantized base."""
        if self.quantization_mode is None:
            return self.lora_base_kernel
        return quantized.dequantized_kernel(self)

    # `model.quantize` after `enable_lora`: the frozen base is quantized by
    # Keras's own code and the factors stay float32.
    def quantize(self, mode=None, type_check=True, config=None):
        quantized.check_mode(mode, self.name)
        self._lora_base.quantize(self, mode, type_check=False, config=config)
