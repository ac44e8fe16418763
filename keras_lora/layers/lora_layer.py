"""`LoRALayer`: the machinery every LoRA layer type shares.

A LoRA layer is its Keras base class (`Dense`, `EinsumDense`, `Embedding`, ...)
plus two float32 factors and a frozen base. The subclass says three things:
where the factors sit relative to the kernel (`_lora_layout`), how the factored
path is computed (its `call`), and which variable is the kernel
(`_lora_kernel_attr`). Everything else lives here, once.

The same object can become a LoRA layer after it was built (`enable_lora`
changes its class in place, so every reference held by a Functional graph or a
KerasHub block stays valid) and turn back into its base class (`merge_lora`).
"""

import math

import keras
from keras import ops

from keras_lora.layers import lora_math

# Instance attributes a LoRA layer adds to its base layer.
_LORA_ATTRIBUTES = (
    "rank",
    "alpha",
    "_alpha_arg",
    "dropout",
    "use_rslora",
    "a_initializer",
    "b_initializer",
    "lora_scale",
    "lora_seed_generator",
    "_lora_base_class",
    "_lora_equations",
)


class LoRALayer:
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
        self.a_initializer = keras.initializers.get(a_initializer)
        self.b_initializer = keras.initializers.get(b_initializer)
        self.lora_scale = lora_math.lora_scale(self.rank, self.alpha, use_rslora)

    def _build_lora(self):
        """Freezes the base variables and adds the factors (and dropout seed)."""
        if getattr(self, "quantization_mode", None):
            raise ValueError(
                f"LoRA cannot adapt quantized layer '{self.name}'. "
                f"Received: quantization_mode={self.quantization_mode}"
            )
        a_shape, b_shape, d_in, d_out = self._lora_layout()
        lora_math.check_rank_fits(self.rank, d_in, d_out, self.name)
        for variable in self.weights:
            variable.trainable = False
        # Adding state to a built layer is what Keras's own `enable_lora` does.
        locked = self._tracker.locked
        self._tracker.unlock()
        try:
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
        """The frozen base kernel variable."""
        return getattr(self, self._lora_kernel_attr)

    def _lora_input(self, x, training):
        """Dropout on the LoRA path's input, in training only."""
        if training and self.dropout > 0:
            x = keras.random.dropout(x, self.dropout, seed=self.lora_seed_generator)
        return x

    def _lora_factors(self):
        """The factors in the compute dtype (they are stored in float32)."""
        dtype = self.compute_dtype
        a, b = self.lora_a, self.lora_b
        if self.lora_a.dtype != dtype:
            a, b = ops.cast(a, dtype), ops.cast(b, dtype)
        return a, b

    def _lora_down(self, a):
        """A as a `(d_in, rank)` matrix for `x @ A`, stored column-major.

        Same values as `reshape(A, (d_in, rank))`, but held as a contiguous
        copy of Aᵀ seen through a transpose (a copy of d_in·r numbers). On
        PyTorch this makes autograd compute dA as `(dhᵀ x)ᵀ` instead of
        `xᵀ dh`, a GEMM orientation its CPU kernels run several times faster
        (see docs/benchmarks.md); XLA (JAX, TensorFlow) picks its own layouts.
        """
        d_in = math.prod(a.shape[:-1])
        a_t = ops.transpose(ops.reshape(a, (d_in, self.rank)))
        a_t = ops.reshape(ops.reshape(a_t, (d_in * self.rank,)), (self.rank, d_in))
        return ops.transpose(a_t)

    def _scaled(self, x):
        """Multiplies the small rank-r intermediate by s (skipped when s = 1)."""
        return x if self.lora_scale == 1.0 else ops.multiply(x, self.lora_scale)

    def merged_kernel(self):
        """Returns W + s·ΔW (float32 maths, kernel dtype): for merge and export."""
        return lora_math.merged_kernel(
            self.lora_base_kernel,
            self.lora_a,
            self.lora_b,
            self.lora_merge_equation,
            self.lora_scale,
        )

    def lora_config(self):
        """The LoRA hyper-parameters, as `get_config` records them."""
        return {
            "rank": self.rank,
            "alpha": self._alpha_arg,
            "dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "a_initializer": keras.initializers.serialize(self.a_initializer),
            "b_initializer": keras.initializers.serialize(self.b_initializer),
        }

    def get_config(self):
        return {**super().get_config(), **self.lora_config()}

    # Saving: the base class writes its own layout ("0", "1", ...), and the
    # factors go under their own names, so a reloaded model has the factors it
    # had (Keras's built-in LoRA reloads them as zeros).
    def save_own_variables(self, store):
        super().save_own_variables(store)
        store["lora_a"] = self.lora_a
        store["lora_b"] = self.lora_b

    def load_own_variables(self, store):
        super().load_own_variables(store)
        self.lora_a.assign(store["lora_a"])
        self.lora_b.assign(store["lora_b"])

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
    ):
        """Turns a built base layer into this LoRA class, in place.

        Args:
            layer: a built instance of this class's base (e.g. `Dense`).
            rank, alpha, dropout, use_rslora, a_initializer, b_initializer:
                as in the constructor.

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
                rank, alpha, dropout, use_rslora, a_initializer, b_initializer
            )
            layer._build_lora()
        except Exception:
            layer.__class__ = base_class
            raise
        layer._lora_base_class = base_class
        return layer

    def _lora_base_class_of(self):
        """The class this layer turns back into (its class before `adapt`)."""
        return getattr(self, "_lora_base_class", type(self)._lora_base)

    def unadapt(self, merge):
        """Turns this layer back into its base class, in place.

        Args:
            merge: if True, W is replaced by W + s·ΔW first; if False, the
                update is dropped and the base kernel is left as it is.
        """
        if merge:
            kernel = self.lora_base_kernel
            kernel.assign(self.merged_kernel())
        base_class = self._lora_base_class_of()
        # Untrack the factors so that `weights` is what it was before.
        for name in ("lora_a", "lora_b"):
            self._untrack_variable(getattr(self, name))
            object.__delattr__(self, name)
        if self.lora_seed_generator is not None:
            self._seed_generators.remove(self.lora_seed_generator)
        # Leave no LoRA attribute behind on the plain layer.
        for name in _LORA_ATTRIBUTES:
            self.__dict__.pop(name, None)
        self.__class__ = base_class
        return self
