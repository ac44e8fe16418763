"""Layers of a model by path: how specs, adapter files and flags name them.

Everything keras-lora records about a layer (a spec entry, an adapter file's
keys, a trainable flag) is keyed by the layer's path relative to the model,
so that it means the same layer before and after a reload.
"""

import collections


def sublayers(model):
    """Every layer below `model`, depth first, each once."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def relative_path(model, path):
    """`path` without the model's own name in front.

    A Sequential model built with an `Input` names its layers `"<model>/dense"`,
    and the same model rebuilt by `load_model` names them `"dense"`: specs,
    adapter files and trainable flags record paths relative to the model, so
    that they mean the same layers before and after a reload.
    """
    prefix = f"{model.name}/"
    return path[len(prefix) :] if path and path.startswith(prefix) else path


def layers_by_path(model):
    """{relative path: layer} for the layers whose path is unique (full paths,
    as keras-lora 0.1 recorded them, are accepted too)."""
    by_path = {}
    for layer in sublayers(model):
        if layer.path:
            for path in {relative_path(model, layer.path), layer.path}:
                by_path.setdefault(path, []).append(layer)
    return {path: found[0] for path, found in by_path.items() if len(found) == 1}


def path_checker(model, others=()):
    """Returns `layer -> its relative path`, checked to name that layer only.

    Adapters and specs are keyed by path, so a path shared by two layers (two
    nested models with equally named layers) must be an error, not a guess.

    Args:
        model: the model.
        others: more objects with a `path` and a `name` that specs name like
            layers (raw weights).
    """
    counts = collections.Counter(
        relative_path(model, lyr.path) for lyr in [*sublayers(model), *others]
    )

    def unique_path(layer):
        path = relative_path(model, layer.path)
        if not path or counts[path] != 1:
            raise ValueError(
                f"Layer '{layer.name}' has no unique path in model '{model.name}' "
                f"(path={layer.path!r}); give the layers distinct names."
            )
        return path

    return unique_path
