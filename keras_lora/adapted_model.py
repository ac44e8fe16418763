"""How an adapted model survives `model.save` and `keras.saving.load_model`.

A KerasHub backbone (or any subclassed model) rebuilds its layers from
hyper-parameters when it is loaded, so its config cannot say "these layers are
LoRA layers". `enable_lora` therefore gives the model object a subclass of its
own class (same name, same behaviour) whose config wraps the original one with
the LoRA spec:

    {"model": <the model serialized as its original class>, "lora": <spec>}

Loading rebuilds the original model, builds it, applies the recorded
`enable_lora`, and only then does Keras load the weights (factors included) and
the optimizer state, so `fit` resumes exactly. `merge_lora` and
`export_merged` serialize the model as its original class again.

Decision (measured by the round-trip tests in tests/test_saving.py): this keeps
every layer object and reference intact, needs no copy of the model, and works
the same for Sequential, Functional, subclassed and KerasHub models.
"""

import contextlib

from keras.src.saving import object_registration, serialization_lib

REGISTERED_NAME = "keras_lora>AdaptedModel"

_adapted_classes = {}


class AdaptedModel:
    """Mixin placed before a model's own class while LoRA is enabled on it."""

    _keras_lora_base = None  # the model's original class

    def get_config(self):
        with as_class(self, self._keras_lora_base):
            inner = serialization_lib.serialize_keras_object(self)
        # The outer object recompiles after LoRA is on: drop the inner copy.
        inner.pop("compile_config", None)
        return {"model": inner, "lora": dict(self._keras_lora_spec)}

    def get_build_config(self):
        return None  # the inner config carries the build config

    def compile_from_config(self, config):
        # Keras skips this for models with a custom `compile` (KerasHub tasks),
        # which would lose the optimizer state on reload; their `compile`
        # accepts Keras's compile arguments, so call it.
        self.compile(**serialization_lib.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        from keras_lora.transform import apply_spec

        model = serialization_lib.deserialize_keras_object(
            config["model"], custom_objects=custom_objects
        )
        return apply_spec(model, config["lora"])


# Registered under one name: every per-class subclass loads through the mixin.
object_registration.GLOBAL_CUSTOM_OBJECTS[REGISTERED_NAME] = AdaptedModel


def adapted_class(base_class):
    """Returns (and caches) the adapted subclass of a model class."""
    if base_class not in _adapted_classes:
        cls = type(
            base_class.__name__,
            (AdaptedModel, base_class),
            {"__module__": base_class.__module__, "_keras_lora_base": base_class},
        )
        object_registration.GLOBAL_CUSTOM_NAMES[cls] = REGISTERED_NAME
        _adapted_classes[base_class] = cls
    return _adapted_classes[base_class]


def original_class(model):
    """The model's class without the adapted wrapper."""
    return type(model)._keras_lora_base if is_adapted(model) else type(model)


def is_adapted(model):
    return isinstance(model, AdaptedModel)


@contextlib.contextmanager
def as_class(obj, cls):
    """Temporarily gives `obj` the class `cls` (for serialization)."""
    previous = obj.__class__
    obj.__class__ = cls
    try:
        yield obj
    finally:
        obj.__class__ = previous
