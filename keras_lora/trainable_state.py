"""The model's trainable flags and compiled state around LoRA changes.

Adapting, merging or switching adapters changes which variables train: the
flags the model had must be recorded (and given back by `merge_lora`), a
built optimizer's slots belong to the old variables (an unbuilt copy takes
its place) and traced train/predict functions must be dropped.
"""

from keras_lora import distributed_torch
from keras_lora.keras_private import DotNotTrackScope
from keras_lora.model_paths import relative_path, sublayers

# Compiled functions that depend on which adapters are active but not on the
# trainable set (KerasHub's CausalLM compiles `generate_function`).
INFERENCE_FUNCTIONS = ("predict_function", "test_function", "generate_function")


def set_trainable(layer, value):
    """`layer.trainable = value`, recursing into sublayers on every backend.

    Keras's setter recurses by assigning `sublayer.trainable = value`, which
    TensorFlow's `__setattr__` skips when the sublayer already has that value
    (a trainable sublayer's frozen variables would stay frozen), and which
    costs a tracking pass per assignment (`set_adapter` on a 24-block model
    spent 60 ms there). So this does what the setter does, once per layer:
    the flag, and the variables the layer created trainable.
    """
    for sublayer in layer._flatten_layers(include_self=True):
        object.__setattr__(sublayer, "_trainable", bool(value))
        for variable in sublayer._trainable_variables:
            variable.trainable = value


def trainable_flags(model):
    """The model's own trainable flags, as JSON, for `restore_trainable_flags`."""
    return {
        "model": model.trainable,
        "frozen_layers": [
            relative_path(model, lyr.path)
            for lyr in sublayers(model)
            if not lyr.trainable and lyr.path
        ],
        "frozen_variables": [
            relative_path(model, v.path) for v in model.weights if not v.trainable
        ],
    }


def restore_trainable_flags(model, state):
    """Gives the model back the flags `trainable_flags` recorded."""
    frozen_layers = set(state["frozen_layers"])
    frozen_variables = set(state["frozen_variables"])
    set_trainable(model, state["model"])
    # Parents come before their children here, and the `trainable` setter
    # recurses, so each child's own flag is set after its parent's.
    for layer in sublayers(model):
        if layer.path:  # an InputLayer has none: its parent's flag it keeps
            frozen = relative_path(model, layer.path) in frozen_layers
            set_trainable(layer, not frozen)
    for variable in model.weights:
        variable.trainable = relative_path(model, variable.path) not in frozen_variables


def fresh_optimizer(model):
    """An unbuilt copy of the model's optimizer if its slots must be rebuilt.

    Adapting or merging changes the trainable variables, and a built
    optimizer's slots belong to the old ones. The copy is made from the
    optimizer's own config (never by re-deserializing the compile arguments,
    which fails for a user's plain-function loss); a learning-rate schedule
    is passed as the live object, so unregistered schedules work. Runs
    before the model is changed: a failure leaves the model as it was.
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not getattr(optimizer, "built", False):
        return None
    config = optimizer.get_config()
    if isinstance(config.get("learning_rate"), dict):
        # A schedule or a callable: the live object, not its serialization.
        config["learning_rate"] = optimizer._learning_rate
    try:
        return type(optimizer).from_config(config)
    except Exception as error:
        raise ValueError(
            f"The optimizer of model '{model.name}' "
            f"({type(optimizer).__name__}) cannot be copied for the new set of "
            f"trainable variables ({error}). Change LoRA before `compile`, or "
            "give the optimizer a `get_config`/`from_config` round trip."
        ) from None


def reset_compiled_functions(model, optimizer=None):
    """Drops traced train/test/predict functions: the variables changed.

    A built optimizer is replaced by `optimizer`, its unbuilt copy (see
    `fresh_optimizer`); the user's loss and metric objects stay as they are.
    """
    for name in ("train_function", *INFERENCE_FUNCTIONS):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)
    accept_trainable_change(model, optimizer)


def accept_trainable_change(model, optimizer):
    """After the trainable set changed: a fresh optimizer, no stale train step.

    Args:
        optimizer: the unbuilt copy from `fresh_optimizer` (None: keep).
    """
    if getattr(model, "train_function", None) is not None:
        model.train_function = None
    distributed_torch.track_torch_parameters(model)  # model.parameters() for DDP
    if optimizer is not None:
        model.optimizer = optimizer
    if getattr(model, "compiled", False) and hasattr(
        model, "_compiled_trainable_state"
    ):
        # The optimizer was rebuilt for the new flags: Keras's "trainable
        # state has changed since compile" warning would be a false alarm.
        # Stored untracked, as Keras's `compile` stores it (a tracked dict
        # keyed by layers breaks `torch.export`: docs/deploy.md).
        with DotNotTrackScope():
            model._compiled_trainable_state = {
                layer: layer.trainable for layer in model._flatten_layers()
            }
