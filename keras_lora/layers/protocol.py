"""What model-level code may ask of a LoRA layer: its public protocol.

The transforms, named adapters, files and analysis talk to a LoRA layer
through these methods only, never through its `_lora_*` members, so that a
layer type (or how it stores its adapters) can change behind them.
"""

from keras_lora.layers.lora_settings import LoRASettings


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
    def lora_primary_is_named(self):
        """False until the model names the primary adapter (a layer made by
        its constructor, e.g. rebuilt from a saved config, is not named)."""
        return self._lora_named

    def set_lora_primary(self, name):
        """Names the primary adapter (its variables keep their names)."""
        self._lora_replace_primary(self.lora_primary_adapter.replaced(name=name))
        self._lora_set("_lora_named", True)

    def set_lora_initializer(self, initializer):
        """Records how A started (what `get_config` writes)."""
        primary = self.lora_primary_adapter
        config = {**primary.settings.config(), "a_initializer": initializer}
        self._lora_replace_primary(primary.replaced(settings=LoRASettings(**config)))

    def lora_trained_variables(self):
        """The primary adapter's trained variables: A, B and its variants'
        (DoRA's magnitude)."""
        extra = [v for x in self.lora_variants for v in x.trained_variables(self)]
        return [self.lora_a, self.lora_b, *extra]

    def lora_adapter_file_variables(self, name):
        """{key: variable} an adapter file stores for adapter `name`: A and
        B, and its variants' state (DoRA's magnitude)."""
        adapter = self.lora_adapter(name)
        stored = {"lora_a": adapter.a, "lora_b": adapter.b}
        for variant in adapter.settings.variants:
            stored.update(variant.adapter_file_variables(self))
        return stored

    def lora_base_swaps(self):
        """[(variable, value)] under which the layer computes its base model
        (`disable_lora`): its first variant's (a changed start, if any, comes
        first and knows the base it changed)."""
        return self.lora_variants[0].base_swaps(self)

    @property
    def lora_additive(self):
        """False when the primary update cannot be weighted or summed
        (DoRA): it runs at weight 1 or not at all."""
        return self.lora_variants[-1].additive

    @property
    def lora_shares_layer(self):
        """False when the primary adapter must be the layer's only one and
        its base kernel unchanged for others (DoRA, PiSSA/OLoRA)."""
        return all(variant.shares_layer for variant in self.lora_variants)

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
