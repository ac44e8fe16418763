"""`model.save` / `keras.saving.load_model` of an adapted model: the load hook.

`adapted_model.AdaptedModel` is what Keras serializes; its config wraps the
original model's with the LoRA spec, the trainable flags and the named
adapters (see `adapted_model.py`). Writing and reading those needs the spec
checks, `enable_lora`'s `apply_spec` and the named adapters, which sit above
the model state, so they live here and are registered into `adapted_model`
when this module is imported (by `import keras_lora` and the command line).
"""

import keras

from keras_lora import adapted_model, named_adapters
from keras_lora.spec import (
    LEGACY_KEYS,
    check_named_config,
    check_spec,
    check_trainable_state,
)
from keras_lora.transform import apply_spec


def adapted_config(model, inner):
    """The config of an adapted `model` whose original config is `inner`."""
    return {
        "model": inner,
        "lora": dict(model._keras_lora_spec),
        "trainable": dict(model._keras_lora_trainable_state),
        "named": named_adapters.saved_config(model),
    }


def adapted_from_config(config, custom_objects=None):
    """Rebuilds the original model, then applies the recorded `enable_lora`
    (and named adapters); Keras loads the weights afterwards."""
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(
            "A keras-lora adapted model config needs the keys 'model' and "
            f"'lora'. Received: config keys={sorted(config or {})}"
        )
    spec = check_spec(config.get("lora"), "The saved model", True)
    # Models saved by keras-lora 0.1 kept the flags inside the spec.
    state = config.get("trainable") or {
        "model": True,
        **{key: config["lora"].get(key, []) for key in LEGACY_KEYS},
    }
    state = check_trainable_state(state, "The saved model")
    model = keras.saving.deserialize_keras_object(
        config["model"], custom_objects=custom_objects
    )
    named = config.get("named")
    if named is not None:
        named = check_named_config(named, "The saved model")
    # The weights are loaded after this: there are no base values yet.
    model = apply_spec(model, spec, trainable_state=state, keep_base_values=False)
    if named is not None:
        named_adapters.restore_adapters(model, named)
    return model


adapted_model.set_saving_hooks(adapted_config, adapted_from_config)
