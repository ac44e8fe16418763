"""`enable_lora` and `merge_lora`: LoRA on a whole model, in place.

`enable_lora` turns each target layer into its LoRA subclass in place (same
object, new class, two new variables), so every reference to it stays valid:
Functional graph nodes, KerasHub attention blocks, user attributes. It freezes
everything else at the variable level and records what it did as a JSON spec
on the model (see `adapted_model.py`), which `model.save`, `save_adapter` and
`merge_lora` read. (`disable_lora`: `disable.py`; trainable flags and
compiled state: `trainable_state.py`.)
"""

import inspect

import keras

from keras_lora import adapted_model, atomic, lora_init, model_inits, spec_builder
from keras_lora import targets as targets_lib
from keras_lora.layers import quantized_backward
from keras_lora.layers.lora_layer import LoRALayer
from keras_lora.model_paths import layers_by_path
from keras_lora.raw_weights import targets_by_path
from keras_lora.spec import SPEC_VERSION, check_layer_matches
from keras_lora.targets import lora_class_for
from keras_lora.trainable_state import (
    fresh_optimizer,
    reset_compiled_functions,
    restore_trainable_flags,
    set_trainable,
    trainable_flags,
)

__all__ = ["SPEC_VERSION", "enable_lora", "merge_lora"]

# What `apply_spec` records on the model object, and `revert` removes.
_MODEL_ATTRIBUTES = (
    "_keras_lora_spec",
    "_keras_lora_trainable_state",
    "_keras_lora_base_values",
    "_keras_lora_adapters",
    "_keras_lora_active",
    "_keras_lora_heads",
    "_keras_lora_functions",
    "_keras_lora_function_key",
    "_keras_lora_ids_variable",
)


def enable_lora(
    model,
    rank=8,
    alpha=None,
    targets=None,
    dropout=0.0,
    train_layers=None,
    use_rslora=False,
    rank_pattern=None,
    alpha_pattern=None,
    init="default",
    use_dora=False,
):
    """Adds LoRA to a built Keras model, in place, and freezes everything else.

    Args:
        model: a built Keras model: Sequential, Functional, subclassed, or a
            KerasHub backbone or task model.
        rank: positive int, the rank r of every update.
        alpha: positive float or None; updates are scaled by alpha / r (alpha
            defaults to r).
        targets: which layers to adapt: None (query and value projections of
            every attention block; every Dense/EinsumDense layer if the model
            has no attention, an error if it has convolutions), `"all-linear"`,
            `"all-conv"`, a list of layer names or regular expressions matched
            in full against `layer.path`, or a callable `layer -> bool`.
            (MoE experts: `targets.py`.)
        dropout: float in [0, 1), dropout on each LoRA path's input.
        train_layers: layers whose own weights stay trainable (e.g. a task
            head), with the same matching rules as `targets`; None for none.
        use_rslora: bool; scale by alpha / sqrt(r) (rsLoRA) instead.
        rank_pattern: dict `{regular expression: rank}`, per-layer ranks with
            PEFT's rule: the first key that matches a layer's path in full
            (or its last components after a `/`) gives its rank; other
            layers get `rank`. Every key must match an adapted layer.
        alpha_pattern: dict `{regular expression: alpha}`, per-layer alphas,
            same rule (a layer without one has `alpha`, or its own rank
            when `alpha` is None).
        init: `"default"` (A He-uniform, B zero), `"gaussian"` (A ~ N(0,
            σ=1/r), B zero, as PEFT's), or `"pissa"`/`"olora"` (the factors
            start from W's principal part, the residual stays in the frozen
            kernel); see `keras_lora/lora_init.py`.
        use_dora: bool; DoRA (Liu et al. 2024): each adapted layer also
            trains a magnitude per output unit (`keras_lora/layers/dora.py`).
            Dense, EinsumDense and convolution layers only.

    Returns:
        The same model object. Only the LoRA factors and the weights of
        `train_layers` are trainable; `merge_lora` undoes the freezing.

    Example:

    >>> backbone = keras_hub.models.GPT2Backbone(...)
    >>> keras_lora.enable_lora(backbone, rank=8)
    >>> keras_lora.print_trainable_parameters(backbone)
    """
    check_model(model)
    if adapted_model.is_adapted(model):
        raise ValueError(
            f"Model '{model.name}' is already adapted with LoRA; call "
            "`keras_lora.merge_lora(model)` before adapting it again, or add a "
            "named adapter with `keras_lora.add_adapter`."
        )
    model_inits.check_init(init)
    per_layer = {
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": use_dora,
        "init": init if init in lora_init.RESIDUAL_INITS else None,
    }
    spec = spec_builder.build_spec(
        model,
        rank=rank,
        alpha=alpha,
        targets=targets,
        dropout=dropout,
        train_layers=train_layers,
        use_rslora=use_rslora,
        **per_layer,
    )
    model_inits.check_residual_targets(model, spec)  # PiSSA/OLoRA: float kernels
    by_path = layers_by_path(model)
    # PiSSA/OLoRA write the residual into the base kernels.
    written = [by_path[p].weights for p in spec["layers"] if per_layer["init"]]
    with atomic.all_or_nothing(model, [v for ws in written for v in ws]):
        apply_spec(model, spec)
        model_inits.initialize(lora_layers(model), init)
    return model


def adapter_options(options, caller, excluded=("init", "use_dora")):
    """`enable_lora`'s arguments (its defaults filled in) from `options`.

    `enable_lora`'s signature declares them once; `add_adapter` takes them
    by keyword, all but `excluded`.

    Args:
        options: the arguments given, by keyword.
        caller: the public function's name, for the message.
        excluded: arguments `caller` does not take.

    Returns:
        A dict of every argument but `model` and `excluded`.
    """
    parameters = dict(inspect.signature(enable_lora).parameters)
    known = [n for n in parameters if n != "model" and n not in excluded]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"`{caller}` takes these arguments of `enable_lora`: {known}. "
            f"Received: {', '.join(f'{n}={options[n]!r}' for n in unknown)}"
        )
    return {n: options.get(n, parameters[n].default) for n in known}


def apply_spec(model, spec, trainable_state=None, keep_base_values=True):
    """Applies a recorded LoRA spec to a model (fresh, or with LoRA layers).

    Used by `enable_lora`, by `keras.saving.load_model` and by `load_adapter`.
    Layers that already are LoRA layers (a reloaded Functional config) must
    match the recorded rank. On any error, the model is left as it was.

    Args:
        model: a built model.
        spec: a spec as `enable_lora` records it (see `keras_lora.spec`).
        trainable_state: the trainable flags to restore when LoRA is removed;
            None to capture this model's own flags now (a reloaded model
            passes the flags its original had).
        keep_base_values: keep a copy of the `train_layers` weights as they
            are now, for `disable_lora` (False when they are not the base's
            values yet: a model being reloaded).
    """
    by_path = targets_by_path(model)
    missing = [p for p in [*spec["layers"], *spec["train_layers"]] if p not in by_path]
    if missing:
        raise ValueError(
            f"The LoRA spec names layer '{missing[0]}', which model "
            f"'{model.name}' does not have. Some layer paths of the model: "
            f"{sorted(by_path)[:12]}"
        )
    # Everything that can fail without touching the model runs first.
    optimizer = fresh_optimizer(model)
    if trainable_state is None:
        trainable_state = trainable_flags(model)
    trained_layers = [by_path[p] for p in spec["train_layers"]]
    base_values = (
        {
            v.path: keras.ops.convert_to_numpy(v)
            for layer in trained_layers
            for v in head_weights(layer)
        }
        if keep_base_values
        else None
    )
    with atomic.all_or_nothing(model):
        _apply_spec(model, spec, by_path, trained_layers, trainable_state)
        object.__setattr__(model, "_keras_lora_base_values", base_values)
        reset_compiled_functions(model, optimizer)
    return model


def _apply_spec(model, spec, by_path, trained_layers, trainable_state):
    set_trainable(model, True)  # layer flags; variables are frozen one by one below
    adapted = []
    for path, config in spec["layers"].items():
        layer = by_path[path]
        if isinstance(layer, LoRALayer):
            check_layer_matches(layer, path, config)
        else:  # a raw weight's LoRA layer is a new object
            layer = lora_class_for(layer).adapt(layer, **config)
        adapted.append(layer)
    for layer in adapted:
        layer.set_lora_primary("default")  # named_adapters.py
    freeze_all_but(model, lora_layers(model), trained_layers)
    # Quantized bases: a tied int8 logits table would give the layers below
    # it no gradient, and a policy-map model could not save
    # (quantized_backward.py).
    quantized_backward.prepare_model(model)
    if not adapted_model.is_adapted(model):
        model.__class__ = adapted_model.adapted_class(type(model))
    object.__setattr__(model, "_keras_lora_spec", spec)
    object.__setattr__(model, "_keras_lora_trainable_state", trainable_state)
    # Named adapters (named_adapters.py): this spec is the first one.
    object.__setattr__(model, "_keras_lora_adapters", {"default": spec})
    object.__setattr__(model, "_keras_lora_active", None)
    object.__setattr__(model, "_keras_lora_heads", {"owner": {}, "stored": {}})
    object.__setattr__(model, "_keras_lora_functions", {})
    for path in spec["train_layers"]:
        model._keras_lora_heads["owner"][path] = "default"


def freeze_all_but(model, adapted, trained, factors=None):
    """Leaves only the factors and the `trained` layers' weights trainable.

    Layers with nothing left to train get `trainable=False` (Keras's transfer
    learning convention: a frozen BatchNormalization then runs in inference
    mode and keeps its statistics); layers that hold a LoRA layer or a trained
    layer stay trainable, and their other variables are frozen one by one.

    Args:
        factors: the factor variables that train (default: the primary
            factors of `adapted`; named adapters pass the active ones).
    """
    keep = _with_relatives(model, [*adapted, *trained])
    for layer in targets_lib.sublayers(model):  # parents before children
        # A layer without weights (an InputLayer) has nothing to freeze.
        if not layer.weights:
            continue
        if id(layer) not in keep and layer.trainable:
            set_trainable(layer, False)
        elif id(layer) in keep and not layer.trainable:
            set_trainable(layer, True)  # frozen for an earlier active set
    # `set_trainable(model, True)` ran first, so a trained layer's variables are
    # trainable as its own layer made them (BatchNorm statistics are not).
    trained_ids = {id(v) for layer in trained for v in head_weights(layer)}
    if factors is None:
        factors = [v for lyr in adapted for v in trainable_lora_variables(lyr)]
    factors = {id(v) for v in factors}
    for variable in model.weights:
        variable.trainable = id(variable) in factors or (
            id(variable) in trained_ids and variable.trainable
        )


def trainable_lora_variables(layer):
    """The primary adapter's trained variables: A, B (and DoRA's magnitude)."""
    return layer.lora_trained_variables()


def _with_relatives(model, chosen):
    """Ids of the `chosen` layers, of the layers inside them and above them."""
    chosen_ids = {id(layer) for layer in chosen}
    keep = set()

    def walk(layer, ancestors):
        if id(layer) in chosen_ids:
            keep.update(ancestors)
            keep.update(id(lyr) for lyr in layer._flatten_layers(include_self=True))
        for child in layer._flatten_layers(include_self=False, recursive=False):
            walk(child, [*ancestors, id(layer)])

    walk(model, [])
    return keep


def merge_lora(model):
    """Folds every LoRA update into its base kernel, in place.

    Each LoRA layer becomes its plain Keras class again with
    `W' = W + s·A·B` (float32 maths, cast to the kernel's dtype), and the
    trainable flags the model had before `enable_lora` come back.

    Args:
        model: a model with LoRA layers (from `enable_lora`, or built with
            `LoRADense` & co. directly).

    Returns:
        The same model object, with no LoRA layer and no LoRA variable left.
    """
    check_model(model)
    adapted_model.check_outside_adapter_ids(model, "`merge_lora`")
    if not lora_layers(model):
        raise ValueError(
            f"Model '{model.name}' has no LoRA layer to merge. Call "
            "`keras_lora.enable_lora(model)` first."
        )
    written = [v for layer in lora_layers(model) for v in layer.weights]
    with atomic.all_or_nothing(model, written):
        return revert(model, merge=True)


def revert(model, merge, optimizer=None):
    """Turns every LoRA layer back into its base class and undoes the freezing.

    Args:
        model: a model with LoRA layers.
        merge: fold the updates into the kernels (`merge_lora`), or drop them
            (used to roll back a failed `load_adapter`).
        optimizer: the optimizer to give the model back (a rollback passes
            the one it had, with its state); None for an unbuilt copy.
    """
    if optimizer is None:
        optimizer = fresh_optimizer(model)
    for layer in lora_layers(model):
        layer.unadapt(merge=merge)
    if adapted_model.is_adapted(model):
        state = model._keras_lora_trainable_state
        model.__class__ = adapted_model.original_class(model)
        for name in _MODEL_ATTRIBUTES:
            model.__dict__.pop(name, None)
        restore_trainable_flags(model, state)
    else:
        for variable in model.weights:
            variable.trainable = True
    reset_compiled_functions(model, optimizer)
    return model


def head_weights(layer):
    """A trained layer's own weights: without the LoRA factors that other
    named adapters may have put on it."""
    if not isinstance(layer, LoRALayer):
        return list(layer.weights)
    factors = {
        id(v)
        for name in layer.lora_adapter_names
        for v in (layer.lora_adapter(name).a, layer.lora_adapter(name).b)
    }
    return [v for v in layer.weights if id(v) not in factors]


def lora_layers(model):
    """Every LoRA layer in `model`, in model order."""
    return [lyr for lyr in targets_lib.sublayers(model) if isinstance(lyr, LoRALayer)]


def lora_spec(model):
    """The JSON spec `enable_lora` recorded on `model` (None if not adapted)."""
    return getattr(model, "_keras_lora_spec", None)


def check_model(model):
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(
            f"`model` must be a Keras model or layer. Received: model={model!r}"
        )
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' must be built before LoRA can adapt it: call "
            "it on data or call `model.build(input_shape)` first."
        )
