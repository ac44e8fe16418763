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
KerasHub block stays valid) and turn back into its base class (`merge_lora`).
"""

import keras
from keras import ops

from keras_lora import lora_init
from keras_lora.class_view import ClassViewMixin
from keras_lora.layers import (
    dora,
    layouts,
    lora_math,
    low_rank,
    quantized,
    quantized_backward,
)
from keras_lora.layers.adapter_set import AdapterSet
from keras_lora.layers.base_call import base_call_scope, hidden_in_base_call
from keras_lora.layers.protocol import LoRAProtocol

# Instance attributes a LoRA layer adds to its base layer.
_LORA_ATTRIBUTES = (
    "rank",
    "alpha",
    "_alpha_arg",
    "dropout",
    "use_rslora",
    "use_dora",
    "lora_init",
    "a_initializer",
    "b_initializer",
    "lora_scale",
    "lora_seed_generator",
    "_lora_base_class",
    "_lora_equations",
    "_lora_keras_quantize",
    # Named adapters (adapter_set.py).
    "_lora_primary",
    "_lora_extra",
    "_lora_active",
    "_lora_example_ids",
    "_lora_example_names",
)


class LoRALayer(ClassViewMixin, LoRAProtocol, AdapterSet):
    """Mixin placed before the Keras base class in every LoRA layer."""

    # The Keras base class, and its attribute that holds the kernel variable.
    _lora_base = None
    _lora_kernel_attr = "_kernel"

    def _init_lora(
        self,
        rank,
        alpha,
        dropout,
        use_rslora,
        a_initializer,
        b_initializer,
        use_dora=False,
        init=None,
    ):
        if getattr(self, "lora_rank", None):
            raise ValueError(
                "`lora_rank` (Keras's built-in LoRA) cannot be combined with "
                f"{type(self).__name__}; use `rank`. "
                f"Received: lora_rank={self.lora_rank}"
            )
        self.rank = lora_math.check_rank(rank)
        # `alpha` is kept as given (None means "equal to rank") for get_config.
        self._alpha_arg = alpha
        self.alpha = lora_math.check_alpha(alpha, self.rank)
        self.dropout = lora_math.check_dropout(dropout)
        if not isinstance(use_rslora, bool):
            raise ValueError(
                f"`use_rslora` must be a bool. Received: use_rslora={use_rslora!r}"
            )
        self.use_rslora = use_rslora
        self.use_dora = dora.check_use_dora(use_dora, self)
        self.lora_init = lora_init.check_layer_init(init, self)
        self.a_initializer = keras.initializers.get(a_initializer)
        self.b_initializer = keras.initializers.get(b_initializer)
        self.lora_scale = lora_math.lora_scale(self.rank, self.alpha, use_rslora)

    def _build_lora(self):
        """Freezes the base variables and adds the factors (and dropout seed)."""
        quantized.check_mode(self.quantization_mode, self.name)
        a_shape, b_shape, d_in, d_out = self._lora_layout()
        lora_math.check_rank_fits(self.rank, d_in, d_out, self.name)
        for variable in self.weights:
            variable.trainable = False
        # Adding state to a built layer is what Keras's own `enable_lora` does.
        locked = self._tracker.locked
        self._tracker.unlock()
        try:
            with layouts.factor_layouts(self):  # follow the kernel's sharding
                # Float32 under every dtype policy: bf16 factors stop learning.
                self.lora_a = self.add_weight(
                    name="lora_a",
                    shape=a_shape,
                    initializer=self.a_initializer,
                    dtype="float32",
                    trainable=True,
                )
                self.lora_b = self.add_weight(
                    name="lora_b",
                    shape=b_shape,
                    initializer=self.b_initializer,
                    dtype="float32",
                    trainable=True,
                )
                if self.lora_init is not None:
                    # PiSSA/OLoRA: the factors' starting values, kept (frozen)
                    # to save adapters that apply to the original base.
                    self.lora_a_initial = self.add_weight(
                        name="lora_a_initial",
                        shape=a_shape,
                        initializer="zeros",
                        dtype="float32",
                        trainable=False,
                    )
                    self.lora_b_initial = self.add_weight(
                        name="lora_b_initial",
                        shape=b_shape,
                        initializer="zeros",
                        dtype="float32",
                        trainable=False,
                    )
            if self.lora_init is not None:
                lora_init.initialize_layer(self)
            if self.use_dora:
                self.lora_magnitude = self.add_weight(
                    name="lora_magnitude",
                    shape=dora.magnitude_shape(self),
                    initializer="zeros",
                    dtype="float32",
                    trainable=True,
                )
                dora.reset_magnitude(self)
            self.lora_seed_generator = (
                keras.random.SeedGenerator(name="lora_seed")
                if self.dropout > 0
                else None
            )
        finally:
            if locked:
                self._tracker.lock()

    def _lora_layout(self):
        """Returns (A shape, B shape, d_in, d_out). Subclasses define it."""
        raise NotImplementedError

    @property
    def lora_merge_equation(self):
        """Einsum `"A,B->kernel"` that lays s·A·B out like the kernel."""
        raise NotImplementedError

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
        if self.use_dora and self._lora_active is None:
            outputs = dora.outputs(self, base_call, outputs, inputs, training)
        elif self._lora_active is None:  # the primary adapter alone
            outputs = low_rank.add(outputs, self._lora_delta(inputs, training))
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
        dropout = adapter.dropout if adapter else self.dropout
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
        seed = adapter.seed_generator if adapter else self.lora_seed_generator
        dropped = keras.random.dropout(x, dropout, seed=seed)
        if training is True:
            return dropped
        return ops.where(ops.cast(training, "bool"), dropped, x)

    def _lora_factors(self, adapter=None):
        """The factors in the compute dtype (they are stored in float32)."""
        dtype = self.compute_dtype
        a, b = (adapter.a, adapter.b) if adapter else (self.lora_a, self.lora_b)
        if a.dtype != dtype:
            return ops.cast(a, dtype), ops.cast(b, dtype)
        return a.value, b.value

    def _scaled(self, x, adapter=None):
        """Multiplies the small rank-r intermediate by s (skipped when s = 1)."""
        return low_rank.scaled(x, self._lora_scale_of(adapter))

    def _lora_scale_of(self, adapter=None):
        """s of `adapter` (None: the primary adapter)."""
        return adapter.scale if adapter else self.lora_scale

    def merged_kernel(self, dtype=None):
        """Returns dequant(W) + s·ΔW for merge and export.

        Computed in float32. A float base's kernel is returned in its own dtype
        unless `dtype` is given; a quantized base's merged kernel is float32
        (re-quantize it with `quantized.twin`).
        """
        kernel = self._lora_float_kernel()
        if self.use_dora:  # W' = m · (W + s·ΔW) / ‖W + s·ΔW‖
            return dora.merged_kernel(self, kernel, dtype or kernel.dtype)
        if self._lora_active is not None:  # named adapters: the active set
            merged = ops.add(ops.cast(kernel, "float32"), self.lora_update())
            return ops.cast(merged, dtype or kernel.dtype)
        merged = lora_math.merged_kernel(
            kernel,
            self.lora_a,
            self.lora_b,
            self.lora_merge_equation,
            self.lora_scale,
            dtype=dtype,
        )
        return merged

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

    def lora_config(self):
        """The LoRA hyper-parameters, as `get_config` records them."""
        return {
            "rank": self.rank,
            "alpha": self._alpha_arg,
            "dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "a_initializer": keras.initializers.serialize(self.a_initializer),
            "b_initializer": keras.initializers.serialize(self.b_initializer),
            "use_dora": self.use_dora,
            "init": self.lora_init,
        }

    def lora_state_variables(self):
        """{name: variable} of the primary adapter's state beyond A and B:
        DoRA's magnitude, PiSSA/OLoRA's starting factors."""
        names = ("lora_magnitude", "lora_a_initial", "lora_b_initial")
        return {n: getattr(self, n) for n in names if n in self.__dict__}

    def get_config(self):
        return {**super().get_config(), **self.lora_config()}

    # Saving: the base class writes its own layout ("0", "1", ...), and the
    # factors go under their own names, so a reloaded model has the factors it
    # had (Keras's built-in LoRA reloads them as zeros).
    def save_own_variables(self, store):
        super().save_own_variables(store)
        self.save_lora_variables(store)

    def load_own_variables(self, store):
        super().load_own_variables(store)
        self.load_lora_variables(store)

    def save_lora_variables(self, store):
        """Writes the factors (and DoRA/PiSSA state, named adapters) to `store`."""
        store["lora_a"] = self.lora_a
        store["lora_b"] = self.lora_b
        for key, variable in self.lora_state_variables().items():
            store[key] = variable
        for name, adapter in (self._lora_extra or {}).items():
            store[f"lora_a_{name}"] = adapter.a
            store[f"lora_b_{name}"] = adapter.b

    def load_lora_variables(self, store):
        """Reads what `save_lora_variables` wrote."""
        self.lora_a.assign(store["lora_a"])
        self.lora_b.assign(store["lora_b"])
        for key, variable in self.lora_state_variables().items():
            variable.assign(store[key])
        for name, adapter in (self._lora_extra or {}).items():
            adapter.a.assign(store[f"lora_a_{name}"])
            adapter.b.assign(store[f"lora_b_{name}"])

    # In-place conversion, used by `enable_lora` and `merge_lora`.
    @classmethod
    def adapt(
        cls,
        layer,
        rank=8,
        alpha=None,
        dropout=0.0,
        use_rslora=False,
        a_initializer="he_uniform",
        b_initializer="zeros",
        use_dora=False,
        init=None,
    ):
        """Turns a built base layer into this LoRA class, in place.

        Args:
            layer: a built instance of this class's base (e.g. `Dense`).
            rank, alpha, dropout, use_rslora, a_initializer, b_initializer,
            use_dora, init: as in the constructor.

        Returns:
            The same `layer` object, now an instance of `cls`.
        """
        if isinstance(layer, LoRALayer):
            raise ValueError(
                f"Layer '{layer.path}' is already a LoRA layer "
                f"({type(layer).__name__}); it cannot be adapted twice."
            )
        if not layer.built:
            raise ValueError(
                f"Layer '{layer.name}' must be built before it is adapted: call "
                "the model on data (or `model.build`) first."
            )
        if getattr(layer, "lora_enabled", False):
            raise ValueError(
                f"Layer '{layer.path}' already uses Keras's built-in LoRA "
                "(`lora_enabled=True`); build it without `lora_rank`."
            )
        base_class = type(layer)
        layer.__class__ = cls
        try:
            layer._init_lora(
                rank,
                alpha,
                dropout,
                use_rslora,
                a_initializer,
                b_initializer,
                use_dora,
                init,
            )
            layer._build_lora()
        except Exception:
            layer.__class__ = base_class
            raise
        layer._lora_base_class = base_class
        # Keras binds `quantize` per instance when the layer is created (to
        # the base class's method, which refuses subclasses): route it
        # through `LoRALayer.quantize` so `model.quantize` reaches the base.
        keras_quantize = layer.__dict__.get("quantize")
        if keras_quantize is not None:
            layer._lora_keras_quantize = keras_quantize
            layer.__dict__["quantize"] = _quantize_through(layer, keras_quantize)
        return layer

    def _lora_base_class_of(self):
        """The class this layer turns back into (its class before `adapt`)."""
        return getattr(self, "_lora_base_class", type(self)._lora_base)

    def unadapt(self, merge):
        """Turns this layer back into its base class, in place.

        Args:
            merge: if True, W is replaced by W + s·ΔW first; if False, the
                update is dropped and the base kernel is left as it is (a
                PiSSA/OLoRA layer's gets its original W_res + s·A0·B0 back).
        """
        base_class = self._lora_base_class_of()
        if merge and self.quantization_mode is None:
            kernel = self.lora_base_kernel
            kernel.assign(self.merged_kernel())
        elif merge:
            # dequant(W) + s·A·B in float32, re-quantized by Keras's own
            # quantizer (same mode and block size) into the same variables:
            # the model stays as small as it was.
            twin = quantized.twin(
                self, base_class, self.merged_kernel(), self.quantization_mode
            )
            quantized.assign_from(self, twin)
        elif self.lora_init is not None and self.quantization_mode is None:
            # PiSSA/OLoRA: dropping the update means the original W, whose
            # principal part the starting factors hold.
            self.lora_base_kernel.assign(lora_init.original_kernel(self))
        if "_lora_keras_quantize" in self.__dict__:
            self.__dict__["quantize"] = self._lora_keras_quantize
        # Untrack the factors so that `weights` is what it was before.
        for adapter in (self._lora_extra or {}).values():
            for variable in (adapter.a, adapter.b):
                self._untrack_variable(variable)
            if adapter.seed_generator is not None:
                self._seed_generators.remove(adapter.seed_generator)
        for name in ("lora_a", "lora_b", *self.lora_state_variables()):
            self._untrack_variable(getattr(self, name))
            object.__delattr__(self, name)
        if self.lora_seed_generator is not None:
            self._seed_generators.remove(self.lora_seed_generator)
        # Leave no LoRA attribute behind on the plain layer.
        for name in _LORA_ATTRIBUTES:
            self.__dict__.pop(name, None)
        self.__class__ = base_class
        return self


def _quantize_through(layer, keras_quantize):
    """`layer.quantize` for an adapted layer: checks the mode, then Keras's."""

    def quantize(mode=None, type_check=True, config=None, **kwargs):
        quantized.check_mode(
            mode or getattr(config, "mode", None) or config, layer.name
        )
        return keras_quantize(mode=mode, config=config, type_check=False, **kwargs)

    return quantize
