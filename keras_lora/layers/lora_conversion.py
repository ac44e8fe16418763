"""Turning a built Keras layer into its LoRA class and back, in place.

`enable_lora` changes a layer's class in place (same object, so every
reference a Functional graph or a KerasHub block holds stays valid) and adds
the factors; `merge_lora` folds the update in and gives the layer its class
back, with no LoRA attribute left (`LORA_ATTRIBUTES`).
"""

from keras_lora.layers import quantized

# Instance attributes a LoRA layer adds to its base layer.
LORA_ATTRIBUTES = (
    "_lora_base_class",
    "_lora_equations",
    "_lora_keras_quantize",
    # The adapters and which are active (adapter_set.py).
    "_lora_adapters",
    "_lora_primary_record",
    "_lora_named",
    "_lora_active",
    "_lora_example_ids",
    "_lora_example_names",
)


class LoRAConversion:
    """Mixin of `LoRALayer`: `adapt` (classmethod) and `unadapt`."""

    # Settings this layer type starts from unless given (`LoRASettings`).
    lora_default_settings = {}

    # In-place conversion, used by `enable_lora` and `merge_lora`.
    @classmethod
    def adapt(cls, layer, **settings):
        """Turns a built base layer into this LoRA class, in place.

        Args:
            layer: a built instance of this class's base (e.g. `Dense`).
            **settings: the primary adapter's `LoRASettings`, as in the
                constructor.

        Returns:
            The same `layer` object, now an instance of `cls`.
        """
        if isinstance(layer, LoRAConversion):
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
            layer._init_lora({**cls.lora_default_settings, **settings})
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
        else:
            # Dropping the update: the base most variants leave as it is;
            # PiSSA/OLoRA's original W (its principal part is in A0, B0).
            for variant in self.lora_variants:
                kernel = variant.kernel_without_update(self)
                if kernel is not None:
                    self.lora_base_kernel.assign(kernel)
        if "_lora_keras_quantize" in self.__dict__:
            self.__dict__["quantize"] = self._lora_keras_quantize
        # Untrack the factors so that `weights` is what it was before.
        for adapter in self._lora_adapters.values():
            self._lora_untrack(adapter)
        for name in self.lora_state_variables():
            self._untrack_variable(getattr(self, name))
            object.__delattr__(self, name)
        # Leave no LoRA attribute behind on the plain layer.
        for name in LORA_ATTRIBUTES:
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
