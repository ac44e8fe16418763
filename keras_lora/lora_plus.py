"""`LoRAPlus`: LoRA+ (Hayou et al. 2024), B trained with a λ× larger learning rate.

LoRA+ gives the B factors a learning rate `ratio` times that of the A factors
(λ = 16 by default, the paper's choice for most tasks). This wrapper runs any
Keras optimizer as it is, then moves each B factor `ratio` times as far as the
optimizer moved it: `B ← B₀ + ratio · (B₁ − B₀)`. For every optimizer whose
step is proportional to its learning rate (SGD with or without momentum,
Adam, AdamW's decoupled decay, RMSprop, Adagrad, Lion, ...) this is exactly a
learning rate `ratio × lr` for B, without a second optimizer or a second copy
of its state. (Scaling B's *gradients* instead would be a no-op under Adam,
whose step does not depend on the gradient's scale.) Other variables, A
factors and trained heads, get the optimizer's own step.

B factors are recognised by name: `lora_b`, and `lora_b_<adapter>` for named
adapters.
"""

import keras
from keras import ops

from keras_lora.layers import lora_math


def is_lora_b(variable):
    """True for a LoRA B factor (primary or named adapter)."""
    name = variable.name
    return name == "lora_b" or name.startswith("lora_b_")


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAPlus(keras.optimizers.Optimizer):
    """Wraps an optimizer so that LoRA's B factors learn `ratio` times faster.

    Args:
        optimizer: any Keras optimizer instance (its learning rate, schedule,
            weight decay, clipping and state are used as they are).
        ratio: positive number λ, B's learning rate over A's (default 16).
        name: optional name of the wrapper.

    Example:

    >>> keras_lora.enable_lora(model, rank=8)
    >>> model.compile(
    ...     optimizer=keras_lora.LoRAPlus(keras.optimizers.AdamW(2e-4), ratio=16),
    ...     loss=...,
    ... )
    >>> model.fit(...)
    """

    def __init__(self, optimizer, ratio=16.0, name=None, **kwargs):
        if kwargs:
            raise ValueError(
                "LoRAPlus takes only `optimizer`, `ratio` and `name`; set other "
                "options on the wrapped optimizer. "
                f"Received: {sorted(kwargs)}"
            )
        if not isinstance(optimizer, keras.optimizers.Optimizer) or isinstance(
            optimizer, LoRAPlus
        ):
            raise ValueError(
                "`optimizer` must be a Keras optimizer instance (not a "
                f"LoRAPlus). Received: optimizer={optimizer!r}"
            )
        if not lora_math.is_float32_scale(ratio):
            raise ValueError(
                "`ratio` must be a positive number (finite in float32). "
                f"Received: ratio={ratio!r}"
            )
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = optimizer
        self.ratio = float(ratio)

    def build(self, var_list):
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    @property
    def variables(self):
        # The wrapped optimizer's state only: the wrapper's own `iterations`
        # and learning rate are never used, and a file then holds exactly
        # what a plain optimizer of that class holds.
        return self.inner_optimizer.variables

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(trainable_variables)
            self.built = True
        variables = trainable_variables or self._trainable_variables
        # B's values before the step (B is small: rank × d_out); a copy, since
        # torch optimizers update the variable's tensor in place.
        before = [
            (v, ops.copy(ops.convert_to_tensor(v)))
            for v, g in zip(variables, grads)
            if g is not None and is_lora_b(v)
        ]
        self.inner_optimizer.apply(grads, trainable_variables)
        if self.ratio == 1.0:
            return
        for variable, old in before:
            step = ops.subtract(ops.convert_to_tensor(variable), old)
            variable.assign(ops.add(old, ops.multiply(step, self.ratio)))

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "ratio": self.ratio,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        optimizer = config.pop("optimizer")
        if isinstance(optimizer, dict):
            optimizer = keras.saving.deserialize_keras_object(
                optimizer, custom_objects=custom_objects
            )
        return cls(optimizer, **config)
