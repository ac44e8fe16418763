"""`adapter_ids`: a different adapter for each example of one batch (serving).

Multi-tenant LoRA servers (Punica, S-LoRA, LoRAX) run requests for different
adapters through one base in one batch: example i's low-rank path uses its own
gathered factors (`AdapterSet` in `layers/adapter_set.py`), so the cost is one rank-r
path per example whatever the number of adapters. The ids live in an int32
variable of the model: a compiled `predict` or KerasHub `generate` reads them
as state, so new ids of the same batch size need no retrace.
"""

import contextlib

import numpy as np

from keras_lora import adapted_model, named_adapters, transform
from keras_lora.layers.expert_einsum import LoRAExpertEinsum

_VARIABLE = "_keras_lora_ids_variable"


@contextlib.contextmanager
def adapter_ids(model, ids):
    """Runs each example of a batch with its own adapter.

    Args:
        model: a model with named adapters (`add_adapter`, `load_adapter(...,
            name=...)`); their trained heads, if any, cannot differ per
            example, so adapters with `train_layers` are refused.
        ids: one entry per example of the batch: an adapter name, or None for
            the base model. Every call inside the block must use a batch of
            exactly `len(ids)` examples, in this order (a batch of another
            size, a single id for several examples included, is a
            `ValueError`: `predict` needs a `batch_size` of `len(ids)` that
            divides the number of examples).

    The block is for inference (`predict`, `__call__`, `generate`). Inside
    it, training (`fit`, `training=True`), `set_adapter` and the other
    adapter changes, `merge_lora`, `model.save`, `export_merged` and a
    nested `adapter_ids` block raise a `ValueError`; on exit the model is as
    it was before, whatever happened inside.

    Example:

    >>> with keras_lora.adapter_ids(model, ["french", "legal", None, "french"]):
    ...     logits = model.predict(x, batch_size=4)
    ...     texts = causal_lm.generate(prompts)   # 4 prompts
    """
    names = named_adapters.list_adapters(model)
    if not names:
        raise ValueError(f"Model '{model.name}' has no adapter.")
    adapted_model.check_outside_adapter_ids(model, "A nested `adapter_ids` block")
    if isinstance(ids, str) or not hasattr(ids, "__len__") or not len(ids):
        raise ValueError(
            "`ids` must be a non-empty list with one adapter name (or None) per "
            f"example. Received: ids={ids!r}"
        )
    ids = list(ids)
    for entry in ids:
        if entry is not None and entry not in names:
            raise ValueError(
                f"`ids` names {entry!r}, which is not an adapter of model "
                f"'{model.name}'. Its adapters: {names}"
            )
    check_per_example(model, [n for n in ids if n is not None])
    index = np.array(
        [len(names) if n is None else names.index(n) for n in ids], "int32"
    )
    variable = _ids_variable(model, len(ids))
    variable.assign(index)
    layers = transform.lora_layers(model)
    saved = [layer.lora_example_state() for layer in layers]
    outside = getattr(model, "_keras_lora_function_key", None) or "outside"
    # Keyed by the outside configuration too: JAX's compiled functions take the
    # trainable and non-trainable variables as separate state lists, and the
    # trainable set is the outside configuration's (reusing a function traced
    # under another set of the same shapes would swap variables' values).
    inside = ("ids", len(ids), tuple(names), outside)
    for layer in layers:
        active = tuple((n, 1.0) for n in layer.lora_adapter_names)
        layer.set_lora_example_state(active, variable, names)
    named_adapters.swap_functions(model, outside, inside)
    object.__setattr__(model, adapted_model.IDS_BLOCK, True)
    for method in _GUARDED:
        if hasattr(model, method):
            object.__setattr__(model, method, _guarded(model, method))
    try:
        yield model
    finally:
        for name in (adapted_model.IDS_BLOCK, *_GUARDED):
            model.__dict__.pop(name, None)
        for layer, (active, example_ids) in zip(layers, saved):
            layer.set_lora_example_state(active, example_ids)
        _untrack(model, variable)
        named_adapters.swap_functions(model, inside, outside)


def check_per_example(model, names):
    """Raises unless adapters `names` can differ per example of one batch.

    Args:
        model: a model with named adapters.
        names: the adapter names the examples may use.
    """
    heads = sorted({n for n in names if model._keras_lora_adapters[n]["train_layers"]})
    if heads:
        raise ValueError(
            f"Adapters {heads} train heads (`train_layers`), which cannot differ "
            "per example: run their examples as separate batches."
        )
    experts = [
        lyr for lyr in transform.lora_layers(model) if isinstance(lyr, LoRAExpertEinsum)
    ]
    if experts:
        # A bank sees the tokens of all examples flattened into one axis (and
        # per expert): an example's id no longer names its rows there.
        raise ValueError(
            f"Model '{model.name}' has LoRA on mixture-of-experts weights "
            f"('{experts[0].path}'): per-example adapters are not supported "
            "there. Run each adapter's examples as a separate batch "
            "(`set_adapter`)."
        )
    special = [lyr for lyr in transform.lora_layers(model) if not lyr.lora_shares_layer]
    if special:
        raise ValueError(
            f"Model '{model.name}' has a DoRA or PiSSA/OLoRA layer "
            f"('{special[0].path}'): per-example adapters need updates that add "
            "to an unchanged base kernel. Received: "
            f"use_dora={special[0].use_dora}, init={special[0].lora_init!r}"
        )


def _ids_variable(model, size):
    """The model's int32 ids variable of `size` entries, tracked by the model."""
    variable = model.__dict__.get(_VARIABLE)
    if variable is None or variable.shape[0] != size:
        locked = model._tracker.locked
        model._tracker.unlock()
        try:
            variable = model.add_weight(
                name="keras_lora_adapter_ids",
                shape=(size,),
                dtype="int32",
                initializer="zeros",
                trainable=False,
            )
        finally:
            if locked:
                model._tracker.lock()
        _untrack(model, variable)
        object.__setattr__(model, _VARIABLE, variable)
    # Tracked only inside the block: a model saved outside it has no such
    # variable. JAX's compiled functions take it as state while tracked.
    model._track_variable(variable)
    return variable


def _untrack(model, variable):
    if any(v is variable for v in model._non_trainable_variables):
        model._untrack_variable(variable)


# Refused up front inside the block (training; saving, which would write the
# ids variable), and guarded (inference).
_REFUSED = ("fit", "train_on_batch", "save", "save_weights")
_GUARDED = (*_REFUSED, "predict", "evaluate")


def _guarded(model, method):
    """`model.<method>` inside the block: training and saving refused up
    front; for inference, on JAX,
    variable values that a failed `predict`/`evaluate` leaves detached are
    put back.

    Keras's JAX trainer detaches every variable's value while its compiled
    step runs (`_purge_model_variables`) and re-attaches them only after a
    successful step: an error in the first batch (a batch of the wrong size)
    would leave a model whose every variable is empty, an error in a later
    one a model whose values were donated to the last successful step.
    """
    bound = getattr(type(model), method).__get__(model)

    def call(*args, **kwargs):
        if method in _REFUSED:
            adapted_model.check_outside_adapter_ids(model, f"`model.{method}`")
        kept = [(v, getattr(v, "_value", None)) for v in model.variables]
        try:
            return bound(*args, **kwargs)
        except BaseException:
            if getattr(model, "_jax_state", None):  # the last step's state
                model.jax_state_sync()
            for variable, value in kept:  # no step ran: nothing was donated
                if getattr(variable, "_value", 0) is None:
                    variable._value = value
            if hasattr(model, "_jax_state"):
                model._jax_state, model._jax_state_synced = None, True
            raise

    return call
