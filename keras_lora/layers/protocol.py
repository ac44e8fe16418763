"""What model-level code may ask of a LoRA layer: its public protocol.

The transforms, named adapters, files and analysis talk to a LoRA layer
through these methods only, never through its `_lora_*` members, so that a
layer type (or how it stores its adapters) can change behind them.
"""


class LoRAProtocol:
    """Mixin of `LoRALayer`: the public face of its private machinery."""

    @property
    def lora_base_class(self):
        """The class this layer turns back into (its class before `adapt`)."""
        return self._lora_base_class_of()

    def lora_layout(self):
        """`(A shape, B shape, d_in, d_out)` of the primary adapter."""
        return self._lora_layout()

    def lora_group_count(self):
        """How many group axes lead B (EinsumDense groups; 0 elsewhere)."""
        return self._lora_group_count()

    def lora_float_kernel(self):
        """W as a float tensor (dequantized on a quantized base)."""
        return self._lora_float_kernel()

    def lora_kernel_input_axes(self):
        """The kernel axes contracted with the input."""
        return self._lora_kernel_input_axes()

    @property
    def lora_primary(self):
        """The name of the adapter whose factors are `lora_a` / `lora_b`."""
        return self._lora_primary

    def set_lora_primary(self, name):
        """Renames the primary adapter (its variables keep their names)."""
        self._lora_set("_lora_primary", name)

    def set_lora_initializer(self, initializer):
        """Records how A started (what `get_config` writes)."""
        self._lora_set("a_initializer", initializer)

    def lora_example_state(self):
        """`(active pairs, ids variable)` of the per-example adapters state."""
        return self._lora_active, self._lora_example_ids

    def set_lora_example_state(self, active, example_ids, names=None):
        """Sets the active pairs and the per-example ids (`adapter_ids`).

        Args:
            active: None or `(name, weight)` pairs, as `set_lora_active`.
            example_ids: None, or an int32 variable of adapter indices.
            names: the model's adapter names the ids index (kept if None).
        """
        self._lora_set("_lora_active", active)
        self._lora_set("_lora_example_ids", example_ids)
        if names is not None:
            self._lora_set("_lora_example_names", tuple(names))
