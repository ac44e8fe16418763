"""All or nothing: a model operation that is interrupted leaves no trace.

`enable_lora`, `merge_lora`, `set_adapter` and `load_adapter` change many
objects one after the other: layer classes, variables added to layers,
trainable flags, the model's LoRA attributes, variable values. A `ValueError`
half-way, or a `KeyboardInterrupt` (Ctrl-C) or any other `BaseException`
arriving between two of those steps, must leave the model exactly as it was,
so that the call can simply be retried.

`all_or_nothing` records, before the operation, what those steps can change:
each layer's class and attributes (lists and dicts kept by content, since
Keras's trackers append to them in place), each tracker's ids, each
variable's trainable flag, the model's `_keras_lora_*` state (nested
containers copied, their leaves shared), and the values of the variables the
operation will write. On any exception it puts all of it back. The record is
cheap (a few dict copies per layer) except for the values, which the caller
names: only what the operation overwrites.
"""

import contextlib

import keras

from keras_lora import distributed_torch

# Model attributes whose nested dicts/lists the operations change in place
# (named adapters: specs, head owners and stored head values, functions).
_MODEL_STATE_PREFIX = "_keras_lora_"


@contextlib.contextmanager
def all_or_nothing(model, variables=()):
    """Puts `model` back as it was if the block raises anything.

    Args:
        model: the Keras model (or layer) the block changes.
        variables: the existing variables whose values the block may
            overwrite (their values are copied now, and assigned back on
            failure).

    Example:

    >>> with all_or_nothing(model, [layer.kernel for layer in adapted]):
    ...     ...   # a KeyboardInterrupt here leaves the model unchanged
    """
    saved = _capture(model, variables)
    try:
        yield
    except BaseException:
        _restore(model, saved)
        raise


# The containers that tracking fills in place when a variable, seed generator
# or sublayer is added: Keras's lists and tracked lists, TensorFlow's
# checkpoint dependencies, torch's module registries.
_IN_PLACE = (
    "_trainable_variables",
    "_non_trainable_variables",
    "_seed_generators",
    "_layers",
    "_metrics",
    "_tracked",
    "_self_unconditional_checkpoint_dependencies",
    "_self_unconditional_dependency_names",
    "_modules",
    "_parameters",
    "_buffers",
)


def _capture(model, variables):
    layers = list(model._flatten_layers(include_self=True, recursive=True))
    return {
        "layers": [(layer, type(layer), _layer_state(layer)) for layer in layers],
        "model": _model_state(model),
        "trainable": [(v, v.trainable) for v in model.weights],
        "values": [(v, keras.ops.convert_to_numpy(v).copy()) for v in variables],
    }


def _model_state(model):
    """The model's `_keras_lora_*` state, its nested containers copied."""
    memo = {}
    return {
        key: _copy_containers(value, memo)
        for key, value in model.__dict__.items()
        if key.startswith(_MODEL_STATE_PREFIX)
    }


def _layer_state(layer):
    attributes = layer.__dict__.copy()
    contents = {}
    for key in _IN_PLACE:
        value = attributes.get(key)
        if value is not None and _in_place(value):
            contents[key] = value.copy()
    tracker = attributes.get("_tracker")
    ids = None
    if tracker is not None:
        ids = {name: set(found) for name, found in tracker.stored_ids.items()}
    return attributes, contents, ids


def _in_place(value):
    """Lists and dicts that trackers fill in place: plain ones, and Keras's
    tracked ones (TensorFlow's wrappers of a model's own lists, which no
    LoRA operation changes, are left alone)."""
    kind = type(value)  # not `isinstance`: TensorFlow's proxies pose as dicts
    return issubclass(kind, (list, dict)) and not kind.__module__.startswith(
        "tensorflow"
    )


def _copy_containers(value, memo):
    """Copies nested dicts and lists (shared ones once); leaves are shared."""
    if not isinstance(value, (dict, list)):
        return value
    if id(value) not in memo:
        if isinstance(value, dict):
            memo[id(value)] = {k: _copy_containers(v, memo) for k, v in value.items()}
        else:
            memo[id(value)] = [_copy_containers(v, memo) for v in value]
    return memo[id(value)]


def _restore(model, saved):
    for layer, cls, (attributes, contents, ids) in saved["layers"]:
        if type(layer) is not cls:
            layer.__class__ = cls
        state = layer.__dict__
        for key in [k for k in state if k not in attributes]:
            del state[key]
        for key, value in attributes.items():
            state[key] = value
            if key in contents:  # the same list or dict, its old content
                # The base methods: Keras's tracked containers would track
                # (and a locked tracker refuse) what they get back.
                if isinstance(value, list):
                    list.__setitem__(value, slice(None), contents[key])
                else:
                    dict.clear(value)
                    dict.update(value, contents[key])
        if ids is not None:
            for name, found in layer._tracker.stored_ids.items():
                found.clear()
                found.update(ids.get(name, ()))
    model.__dict__.update(saved["model"])
    for variable, trainable in saved["trainable"]:
        variable.trainable = trainable
    for variable, value in saved["values"]:
        variable.assign(value)
    distributed_torch.track_torch_parameters(model)
