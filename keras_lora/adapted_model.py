"""How an adapted model survives `model.save` and `keras.saving.load_model`.

A KerasHub backbone (or any subclassed model) rebuilds its layers from
hyper-parameters when it is loaded, so its config cannot say "these layers are
LoRA layers". `enable_lora` therefore gives the model object a subclass of its
own class (same name, same behaviour) whose config wraps the original one with
the LoRA spec:

    {"model": <the model serialized as its original class>, "lora": <spec>,
     "trainable": <the original model's trainable flags, restored on merge>}

Loading rebuilds the original model, builds it, applies the recorded
`enable_lora`, and only then does Keras load the weights (factors included) and
the optimizer state, so `fit` resumes exactly. `merge_lora` and
`export_merged` serialize the model as its original class again.

Decision (measured by the round-trip tests in tests/test_saving.py): this keeps
every layer object and reference intact, needs no copy of the model, and works
the same for Sequential, Functional, subclassed and KerasHub models.
"""

import contextlib

import keras

REGISTERED_NAME = "keras_lora>AdaptedModel"

_adapted_classes = {}


class AdaptedModel:
    """Mixin placed before a model's own class while LoRA is enabled on it."""

    _keras_lora_base = None  # the model's original class

    def get_config(self):
        check_outside_adapter_ids(self, "`model.save` (`get_config`)")
        with as_class(self, self._keras_lora_base):
            inner = keras.saving.serialize_keras_object(self)
        # The outer object recompiles after LoRA is on: drop the inner copy.
        inner.pop("compile_config", None)
        return _saving_hook("config")(self, inner)

    def get_build_config(self):
        return None  # the inner config carries the build config

    def compile_from_config(self, config):
        # Keras skips this for models with a custom `compile` (KerasHub tasks),
        # which would lose the optimizer state on reload; their `compile`
        # accepts Keras's compile arguments, so call it.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return _saving_hook("from_config")(config, custom_objects)


# How an adapted model's config is written and read back needs the spec, the
# transforms and the named adapters, floors above this one:
# `keras_lora.saving` (imported by `import keras_lora` and by the command
# line) registers both halves here.
_SAVING_HOOKS = {}


def set_saving_hooks(config, from_config):
    """Registers `config(model, inner_config) -> dict` and
    `from_config(config, custom_objects) -> model` (see `keras_lora.saving`)."""
    _SAVING_HOOKS.update(config=config, from_config=from_config)


def _saving_hook(name):
    if name not in _SAVING_HOOKS:
        raise RuntimeError(
            "A keras-lora adapted model is saved and loaded by keras_lora.saving: "
            "`import keras_lora` first."
        )
    return _SAVING_HOOKS[name]


# Registered under one name: every per-class subclass loads through the mixin.
keras.saving.get_custom_objects()[REGISTERED_NAME] = AdaptedModel


def adapted_class(base_class):
    """Returns (and caches) the adapted subclass of a model class."""
    if base_class not in _adapted_classes:
        # The module is ours, not the base class's: a process that loads a
        # saved adapted model without importing keras_lora then gets Keras's
        # "Could not locate class ... make sure they are all imported" error
        # naming `keras_lora.adapted_model` (Keras would otherwise import the
        # KerasHub/Keras base class and fail inside its `from_config`).
        cls = type(
            base_class.__name__,
            (AdaptedModel, base_class),
            {"__module__": __name__, "_keras_lora_base": base_class},
        )
        # Saved under the one registered name; loading stays with the mixin.
        keras.saving.register_keras_serializable("keras_lora", "AdaptedModel")(cls)
        keras.saving.get_custom_objects()[REGISTERED_NAME] = AdaptedModel
        _adapted_classes[base_class] = cls
    return _adapted_classes[base_class]


def original_class(model):
    """The model's class without the adapted wrapper."""
    return type(model)._keras_lora_base if is_adapted(model) else type(model)


def is_adapted(model):
    return isinstance(model, AdaptedModel)


# Set on a model while a `keras_lora.adapter_ids` block runs (mixed_batch.py).
IDS_BLOCK = "_keras_lora_ids_block"


def check_outside_adapter_ids(model, action):
    """Raises if `model` is inside an `adapter_ids` block.

    Inside, the layers compute per-example adapters and the model tracks its
    int32 ids variable: changing the active set, merging or saving there
    would act on (or write) that serving state.

    Args:
        model: a Keras model.
        action: what was called, for the message (e.g. "`merge_lora`").
    """
    if model.__dict__.get(IDS_BLOCK):
        raise ValueError(
            f"{action} cannot run inside a `keras_lora.adapter_ids` block of "
            f"model '{model.name}': leave the block first (it is for "
            "per-example inference only; train each adapter after "
            "`keras_lora.set_adapter(model, name)`)."
        )


@contextlib.contextmanager
def as_class(obj, cls):
    """Temporarily gives `obj` the class `cls` (for serialization)."""
    previous = obj.__class__
    obj.__class__ = cls
    try:
        yield obj
    finally:
        obj.__class__ = previous
