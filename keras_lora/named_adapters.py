"""Several named adapters on one model: add, activate, weight, delete.

The paper's point (§1, §4.2): one frozen base shared by many small task
modules, swapped cheaply. A model holds its adapters by name
(`model._keras_lora_adapters`, each a spec like `enable_lora`'s, with its own
targets, rank, alpha, dropout and trained heads); `enable_lora` makes the one
called "default". Each LoRA layer holds the factors of the adapters that
target it (`layers/adapter_set.py`).

The active set is Python state: one adapter, several with weights, or none
(the base). Switching changes no variable shapes, so nothing is rebuilt; the
compiled `predict`/`evaluate` functions of each configuration are kept and
given back when it comes again, so each configuration is traced once.

Trained heads (`train_layers`) are per adapter. The active adapter's head
values live in the layer's variables; the others' are kept as NumPy copies
and swapped in on `set_adapter`; with no adapter owning a head, it holds the
base values captured when LoRA was first applied.
"""

import math
import numbers

import keras

from keras_lora import (
    adapted_model,
    atomic,
    model_paths,
    raw_weights,
    spec_builder,
    targets,
    trainable_state,
    transform,
)
from keras_lora.layers.adapter_set import check_adapter_name
from keras_lora.layers.lora_layer import LoRALayer
from keras_lora.spec import check_layer_matches


def list_adapters(model):
    """The names of the model's adapters, in the order they were added."""
    return list(getattr(model, "_keras_lora_adapters", None) or {})


def active_adapters(model):
    """The active `(name, weight)` pairs (empty: the base model)."""
    names = list_adapters(model)
    if not names:
        return []
    active = model._keras_lora_active
    return [(names[0], 1.0)] if active is None else list(active)


def add_adapter(
    model,
    name,
    rank=8,
    alpha=None,
    targets=None,
    dropout=0.0,
    train_layers=None,
    **options,
):
    """Adds a named LoRA adapter to a model, beside any it already has.

    On a model without LoRA this is `enable_lora` under another name, and the
    adapter is active. On an adapted model the new adapter starts inactive
    (its update is zero anyway): `set_adapter(model, name)` activates it for
    training or inference.

    Args:
        model: a built Keras model.
        name: a new adapter name: 1-64 letters, digits or underscores.
        rank, alpha, targets, dropout, train_layers: as in `enable_lora`;
            `targets` may select layers other adapters adapt.
        **options: `enable_lora`'s other arguments (`use_rslora`,
            `rank_pattern`, `alpha_pattern`; not `use_dora` or `init`, whose
            adapters are a layer's only one), checked against its signature.

    Returns:
        The same model.

    Example:

    >>> keras_lora.add_adapter(model, "sentiment", rank=8, train_layers=["logits"])
    >>> keras_lora.add_adapter(model, "topic", rank=4, targets="all-linear")
    >>> keras_lora.set_adapter(model, "topic")
    >>> model.fit(...)   # trains "topic" only
    """
    check_adapter_name(name)
    transform.check_model(model)
    named = {"rank": rank, "alpha": alpha, "targets": targets, "dropout": dropout}
    options = {**named, "train_layers": train_layers, **options}
    options = transform.adapter_options(options, "add_adapter")
    if not list_adapters(model):
        spec = spec_builder.build_spec(model, **options)
        transform.apply_spec(model, spec)
        rename_first(model, name)
        return model
    if name in list_adapters(model):
        raise ValueError(
            f"Model '{model.name}' already has an adapter named {name!r}. "
            f"Its adapters: {list_adapters(model)}"
        )
    spec = spec_builder.build_spec(model, adapted_ok=True, **options)
    add_spec(model, name, spec)
    return model


def add_spec(model, name, spec):
    """Adds adapter `name` as `spec` records it (inactive); all or nothing."""
    by_path = raw_weights.targets_by_path(model)
    missing = [p for p in [*spec["layers"], *spec["train_layers"]] if p not in by_path]
    if missing:
        raise ValueError(
            f"The LoRA spec names layer '{missing[0]}', which model "
            f"'{model.name}' does not have."
        )
    with atomic.all_or_nothing(model):  # an interrupt too: all or nothing
        for path, config in spec["layers"].items():
            _add_to_layer(by_path[path], path, name, config)
        _add_heads(model, name, spec, by_path)


def _add_to_layer(layer, path, name, config):
    if isinstance(layer, LoRALayer) and not layer.lora_primary_is_named:
        # A LoRA layer rebuilt from a saved Functional config: its primary
        # factors exist already and are this adapter's.
        check_layer_matches(layer, path, config, f"adapter {name!r}")
        layer.set_lora_primary(name)
    elif isinstance(layer, LoRALayer):
        layer.add_lora_adapter(name, **config)
    else:  # a raw weight's LoRA layer is a new object
        layer = targets.lora_class_for(layer).adapt(layer, **config)
        layer.set_lora_primary(name)


def _add_heads(model, name, spec, by_path):
    base_values = model._keras_lora_base_values
    if base_values is not None:
        owners = model._keras_lora_heads["owner"]
        for path in spec["train_layers"]:
            if owners.get(path) is None:  # the variables hold the base values
                for variable in transform.head_weights(by_path[path]):
                    base_values.setdefault(
                        variable.path, keras.ops.convert_to_numpy(variable)
                    )
    model._keras_lora_adapters[name] = spec
    model._keras_lora_functions.clear()  # new variables: retrace everything
    _activate(model, active_adapters(model), structure_changed=True)


def set_adapter(model, names, weights=None):
    """Chooses the adapters the model computes with (and trains).

    Args:
        model: a model with named adapters.
        names: an adapter name; a list of names (their updates are added,
            each times its weight); or None for the base model (no update,
            trained heads back to their base values).
        weights: for a list of names, one number each (default 1.0 each).

    Only the active adapters' factors (and the heads of the active adapter)
    are trainable afterwards. The variables keep their shapes: compiled
    `predict`/`evaluate` functions are kept per configuration, so switching
    back and forth traces each configuration once.

    Example:

    >>> keras_lora.set_adapter(model, ["sentiment", "topic"], weights=[0.7, 0.3])
    >>> keras_lora.set_adapter(model, None)   # the base model
    """
    known = list_adapters(model)
    if not known:
        raise ValueError(f"Model '{model.name}' has no adapter to activate.")
    if names is None:
        if weights is not None:
            raise ValueError(f"`weights` needs `names`. Received: weights={weights!r}")
        pairs = []
    elif isinstance(names, str):
        if weights is not None:
            raise ValueError(
                "`weights` goes with a list of names. "
                f"Received: names={names!r}, weights={weights!r}"
            )
        pairs = [(names, 1.0)]
    elif isinstance(names, (list, tuple)) and names:
        if weights is None:
            weights = [1.0] * len(names)
        if (
            not isinstance(weights, (list, tuple))
            or len(weights) != len(names)
            or not all(
                isinstance(w, numbers.Real)
                and not isinstance(w, bool)
                and math.isfinite(w)
                for w in weights
            )
        ):
            raise ValueError(
                "`weights` must be a list of finite numbers, one per name. "
                f"Received: names={names!r}, weights={weights!r}"
            )
        pairs = [(n, float(w)) for n, w in zip(names, weights)]
    else:
        raise ValueError(
            "`names` must be an adapter name, a non-empty list of names, or None. "
            f"Received: names={names!r}"
        )
    for name, _ in pairs:
        if name not in known:
            raise ValueError(
                f"Model '{model.name}' has no adapter {name!r}. Its adapters: {known}"
            )
    if len({n for n, _ in pairs}) != len(pairs):
        raise ValueError(f"`names` repeats an adapter. Received: names={names!r}")
    dora = [lyr for lyr in transform.lora_layers(model) if not lyr.lora_additive]
    if dora and pairs and pairs != [(dora[0].lora_primary, 1.0)]:
        raise ValueError(
            f"Model '{model.name}' uses DoRA (layer '{dora[0].path}'), whose "
            "update is not additive: its adapter runs at weight 1 or not at all. "
            f"Received: names={names!r}, weights={weights!r}"
        )
    _activate(model, pairs)
    return model


def delete_adapter(model, name):
    """Removes an adapter (its factors, and its trained heads' values).

    Deleting the last adapter turns the model back into its base (like
    dropping the update with `merge_lora`, but without merging).
    """
    known = list_adapters(model)
    if name not in known:
        raise ValueError(
            f"Model '{model.name}' has no adapter {name!r}. Its adapters: {known}"
        )
    if known == [name]:
        _activate(model, [])  # heads back to their base values
        transform.revert(model, merge=False)
        return model
    remaining = [(n, w) for n, w in active_adapters(model) if n != name]
    _activate(model, remaining)
    for layer in transform.lora_layers(model):
        if name not in layer.lora_adapter_names:
            continue
        if layer.lora_adapter_names == [name]:
            layer.unadapt(merge=False)
        else:
            layer.remove_lora_adapter(name)
    spec = model._keras_lora_adapters.pop(name)
    model._keras_lora_heads["stored"].pop(name, None)
    if spec is model._keras_lora_spec:
        object.__setattr__(model, "_keras_lora_spec", _first_spec(model))
    model._keras_lora_functions.clear()
    _activate(model, remaining, structure_changed=True)
    return model


def adapter_spec(model, name=None):
    """The spec of adapter `name`; None: the single active one, or the only one."""
    known = list_adapters(model)
    if not known:
        raise ValueError(
            f"Model '{getattr(model, 'name', model)}' is not adapted with LoRA: "
            "call `keras_lora.enable_lora(model, ...)` first."
        )
    if name is None:
        active = active_adapters(model)
        if len(known) == 1:
            name = known[0]
        elif len(active) == 1:
            name = active[0][0]
        else:
            raise ValueError(
                f"Model '{model.name}' has the adapters {known} and "
                f"{len(active)} active: pass `name`."
            )
    if name not in known:
        raise ValueError(
            f"Model '{model.name}' has no adapter {name!r}. Its adapters: {known}"
        )
    return name, model._keras_lora_adapters[name]


def rename_first(model, name):
    """Names the first adapter (applied as "default" by `apply_spec`)."""
    if name == "default":
        return
    spec = model._keras_lora_adapters.pop("default")
    model._keras_lora_adapters[name] = spec
    owners = model._keras_lora_heads["owner"]
    for path, owner in owners.items():
        if owner == "default":
            owners[path] = name
    for layer in transform.lora_layers(model):
        if layer.lora_primary_is_named and layer.lora_primary == "default":
            layer.set_lora_primary(name)


def _first_spec(model):
    return next(iter(model._keras_lora_adapters.values()))


def _activate(model, pairs, structure_changed=False, move_heads=True):
    """Makes `pairs` the active set: layers, heads, trainable flags, functions;
    all or nothing (an interrupt too).

    Args:
        move_heads: swap head values between owners (False when reloading a
            saved model, whose variables get the saved owners' values next).
    """
    adapted_model.check_outside_adapter_ids(model, "Changing the adapters")
    by_path = model_paths.layers_by_path(model)
    specs = model._keras_lora_adapters.values()
    heads = [by_path[p] for spec in specs for p in spec["train_layers"]]
    written = [v for layer in heads for v in transform.head_weights(layer)]
    with atomic.all_or_nothing(model, written):
        _activate_now(model, pairs, structure_changed, move_heads)


def _activate_now(model, pairs, structure_changed, move_heads):
    names = list_adapters(model)
    specs = model._keras_lora_adapters
    owners = {}
    for name, _ in pairs:
        for path in specs[name]["train_layers"]:
            if path in owners:
                raise ValueError(
                    f"Adapters {owners[path]!r} and {name!r} both train layer "
                    f"'{path}': only one of them can be active with it."
                )
            owners[path] = name
    by_path = model_paths.layers_by_path(model)
    heads = model._keras_lora_heads
    all_heads = {p for spec in specs.values() for p in spec["train_layers"]}
    base = model._keras_lora_base_values
    if not move_heads:
        heads["owner"].update({p: owners.get(p) for p in all_heads})
    if base is None and any(heads["owner"].get(p) != owners.get(p) for p in all_heads):
        raise ValueError(
            f"Model '{model.name}' was reloaded with `load_model`, so the base "
            "values of its trained layers are not known and heads cannot be "
            "swapped: keep the active adapter, or load the adapters with "
            "`load_adapter(..., name=...)` onto a fresh base."
        )
    optimizer = trainable_state.fresh_optimizer(model)
    before = [id(v) for v in model.trainable_variables]
    # Heads: park the outgoing owner's values, bring in the incoming ones.
    for path in sorted(all_heads):
        old, new = heads["owner"].get(path), owners.get(path)
        if old == new:
            continue
        variables = transform.head_weights(by_path[path])
        if old is not None:
            heads["stored"].setdefault(old, {}).update(
                {v.path: keras.ops.convert_to_numpy(v) for v in variables}
            )
        source = heads["stored"].get(new, {}) if new is not None else {}
        for variable in variables:
            variable.assign(source.get(variable.path, base[variable.path]))
        heads["owner"][path] = new
    first = names[0]
    active = None if pairs == [(first, 1.0)] else tuple(pairs)
    object.__setattr__(model, "_keras_lora_active", active)
    factors, adapted = [], []
    for layer in transform.lora_layers(model):
        mine = [(n, w) for n, w in pairs if n in layer.lora_adapter_names]
        layer.set_lora_active(mine)  # the layer spots its own fast path
        if mine:
            adapted.append(layer)
            for name, _ in mine:
                if name == layer.lora_primary:  # A, B (and DoRA's magnitude)
                    factors += transform.trainable_lora_variables(layer)
                else:
                    adapter = layer.lora_adapter(name)
                    factors += [adapter.a, adapter.b]
    trainable_state.set_trainable(model, True)
    transform.freeze_all_but(
        model, adapted, [by_path[p] for p in owners], factors=factors
    )
    _swap_functions(model, active, structure_changed)
    after = [id(v) for v in model.trainable_variables]
    changed = after != before
    trainable_state.accept_trainable_change(model, optimizer if changed else None)


def _swap_functions(model, active, structure_changed):
    """Keeps each configuration's compiled predict/evaluate functions."""
    key = ("active", active)
    previous = getattr(model, "_keras_lora_function_key", None)
    swap_functions(model, None if structure_changed else previous, key)
    object.__setattr__(model, "_keras_lora_function_key", key)


def swap_functions(model, old_key, new_key):
    """Parks the compiled inference functions under `old_key` (None: drop
    them) and brings back those of `new_key` (or none: they get traced)."""
    cache = model._keras_lora_functions
    names = [n for n in trainable_state.INFERENCE_FUNCTIONS if hasattr(model, n)]
    if old_key is not None:
        cache[old_key] = {n: getattr(model, n) for n in names}
    kept = cache.get(new_key, {})
    for name in names:
        setattr(model, name, kept.get(name))


def restore_adapters(model, config):
    """Re-creates the named adapters a saved model's config records."""
    names = config.get("names")
    extra = config.get("adapters") or {}
    if names:
        rename_first(model, names[0])
    for name, spec in extra.items():
        add_spec(model, name, spec)
    active = config.get("active")
    if active is not None:
        _activate(model, [(n, float(w)) for n, w in active], move_heads=False)


def saved_config(model):
    """What `AdaptedModel.get_config` records about the named adapters."""
    names = list_adapters(model)
    active = model._keras_lora_active
    return {
        "names": names,
        "adapters": {n: model._keras_lora_adapters[n] for n in names[1:]},
        "active": None if active is None else [list(p) for p in active],
    }
