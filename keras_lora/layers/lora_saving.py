"""What a LoRA layer records: its config and its variables in a `.keras` file.

The base class writes its own layout ("0", "1", ...) and the factors go under
their own names, so a reloaded model has the factors it had (Keras's built-in
LoRA reloads them as zeros).
"""

import keras


class LoRASaving:
    """Mixin of `LoRALayer`: `get_config` and the save/load of its variables."""

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
