"""What a LoRA layer records: its config and its variables in a `.keras` file.

The base class writes its own layout ("0", "1", ...) and the factors go under
their own names, so a reloaded model has the factors it had (Keras's built-in
LoRA reloads them as zeros).
"""


class LoRASaving:
    """Mixin of `LoRALayer`: `get_config` and the save/load of its variables."""

    def lora_config(self):
        """The primary adapter's settings, as `get_config` records them."""
        return self.lora_primary_adapter.settings.config()

    def lora_state_variables(self):
        """{name: variable} of the primary adapter's state beyond A and B:
        DoRA's magnitude, PiSSA/OLoRA's starting factors."""
        return {
            name: variable
            for variant in self.lora_variants
            for name, variable in variant.state_variables(self).items()
        }

    def get_config(self):
        return {**super().get_config(), **self.lora_config()}

    def save_own_variables(self, store):
        super().save_own_variables(store)
        self.save_lora_variables(store)

    def load_own_variables(self, store):
        super().load_own_variables(store)
        self.load_lora_variables(store)

    def save_lora_variables(self, store):
        """Writes the factors (and DoRA/PiSSA state, named adapters) to `store`."""
        for key, variable in self._lora_stored_variables().items():
            store[key] = variable

    def load_lora_variables(self, store):
        """Reads what `save_lora_variables` wrote."""
        for key, variable in self._lora_stored_variables().items():
            variable.assign(store[key])

    def _lora_stored_variables(self):
        """{store key: variable}: the primary adapter's factors (`lora_a`,
        `lora_b`) and state, then each other adapter's (`lora_a_<name>`, ...),
        keyed by place, as a layer rebuilt from the config names them."""
        primary, *others = self._lora_adapters.values()
        stored = {"lora_a": primary.a, "lora_b": primary.b}
        stored.update(self.lora_state_variables())
        for adapter in others:
            stored[f"lora_a_{adapter.name}"] = adapter.a
            stored[f"lora_b_{adapter.name}"] = adapter.b
        return stored
