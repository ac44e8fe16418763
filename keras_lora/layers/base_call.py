"""The base class's `call` inside a LoRA layer, without changing the layer.

Keras's base classes apply things inside `call` that the LoRA update must
come before: the activation, a tied int embedding's logit soft cap; a conv's
`call` reads its spatial rank from `self.rank`, the LoRA rank's name. Swapping
those attributes around the base call would change the layer for every thread
calling it meanwhile. Instead each one is a property on the LoRA class
(`hidden_in_base_call`) that reads differently only on the thread running that
layer's base call (`base_call_scope`); its value stays in the instance's
`__dict__`, where Keras put it, so a layer turned back into its base class
keeps it.
"""

import contextlib
import threading

# The layer whose base class's `call` this thread is running (see
# `LoRALayer.activation`). Thread-local: a forward pass changes no shared
# state, so several threads can call one model (a serving thread, a
# `tf.data` map, a callback) and each gets its own outputs.
_BASE_CALL = threading.local()


@contextlib.contextmanager
def base_call_scope(layer):
    """Within it, on this thread, `layer`'s base call sees no activation."""
    previous = getattr(_BASE_CALL, "layer", None)
    _BASE_CALL.layer = layer
    try:
        yield
    finally:
        _BASE_CALL.layer = previous


def in_base_call(layer):
    """True while this thread runs `layer`'s base call (`base_call_scope`)."""
    return getattr(_BASE_CALL, "layer", None) is layer


def hidden_in_base_call(name):
    """A property that reads None inside `base_call_scope` (on that thread,
    for that layer) and the instance's own value everywhere else."""

    def get(self):
        return None if in_base_call(self) else stored_attribute(self, name)

    def set(self, value):
        self.__dict__[name] = value

    return property(get, set)


def stored_attribute(layer, name):
    """`layer.__dict__[name]`, or AttributeError (what `getattr` expects of a
    property whose value is not set yet)."""
    try:
        return layer.__dict__[name]
    except KeyError:
        raise AttributeError(
            f"'{type(layer).__name__}' object has no attribute '{name}'"
        ) from None
