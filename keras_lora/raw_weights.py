"""Raw weights: matrices a layer holds and uses itself, outside Dense & co.

Mixture-of-experts banks keep their experts this way (`layers/expert_recipes.py`).
`enable_lora` can adapt such a weight (`layers/expert_einsum.py`); until then
it is named by `RawWeight`, which looks like a layer to target matching and
specs: a `name` (the variable's), a `path` (`<layer path>/<name>`, the path
its LoRA layer will have) and the layer, attribute and variable behind it.
"""

import re

import keras

from keras_lora import keras_private
from keras_lora.layers import expert_bank, expert_recipes
from keras_lora.model_paths import layers_by_path, relative_path


class RawWeight:
    """A raw weight of `layer`, held in its attribute `attribute`."""

    def __init__(self, layer, attribute, variable, layer_path=None):
        self.layer = layer
        self.attribute = attribute
        self.variable = variable
        self.name = variable.name
        self.path = f"{layer_path or layer.path}/{variable.name}"

    @property
    def known(self):
        """True for an expert weight of a KerasHub bank keras-lora knows."""
        recipe = expert_recipes.recipe_for(expert_bank.original_class(self.layer))
        return recipe is not None and self.attribute in recipe.weights

    def __repr__(self):
        return f"RawWeight('{self.path}', shape={tuple(self.variable.shape)})"


def raw_weights(model):
    """Every raw weight (2 axes or more) below `model` not adapted yet.

    Keras's own layers (Dense, Embedding, convolutions, ...) and their
    subclasses hold no raw weight in this sense: their `call` is known, and
    their own LoRA classes adapt them.
    """
    found = []
    for layer, path in stable_paths(model):
        if not layer.path or _is_keras_layer(layer):
            continue
        adapted = expert_bank.expert_layers(layer)
        for attribute, variable in expert_bank.raw_attributes(layer).items():
            if attribute not in adapted:
                found.append(RawWeight(layer, attribute, variable, path))
    return found


def stable_paths(model):
    """(layer, its path with auto-named layers named by their attribute).

    KerasHub creates some MoE blocks without a name (Mixtral's
    `_sparse_moe_block`, Qwen-MoE's `mlp`): Keras names them
    `mixtral_sparse_moe_block_4`, counting the blocks this process made
    before, so their paths differ between a model and the same model built
    again. A raw weight is named through such a block by the attribute that
    holds it (`sparse_moe_block`), so an adapter file loads onto a fresh model.
    """
    renames = {}
    found = []

    def visit(layer):
        for child in layer._flatten_layers(include_self=False, recursive=False):
            attribute = _auto_named_attribute(layer, child)
            if attribute is not None:
                renames[child.name] = attribute
            path = child.path or ""
            found.append((child, "/".join(renames.get(c, c) for c in path.split("/"))))
            visit(child)

    visit(model)
    return found


def _auto_named_attribute(parent, child):
    """The attribute of `parent` holding `child` if Keras named `child`."""
    snake = keras_private.to_snake_case(type(child).__name__)
    if not re.fullmatch(re.escape(snake) + r"(_\d+)?", child.name):
        return None
    # On PyTorch, a sublayer attribute lives in the module's `_modules`.
    attributes = {**vars(parent).get("_modules", {}), **vars(parent)}
    for name, value in attributes.items():
        if value is child:
            return name.lstrip("_") or None
    return None


def _is_keras_layer(layer):
    linear = (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding)
    module = expert_bank.original_class(layer).__module__
    return isinstance(layer, linear) or module.startswith(("keras.", "keras_lora."))


def targets_by_path(model):
    """`layers_by_path`, plus the model's raw weights by their path."""
    by_path = layers_by_path(model)
    for weight in raw_weights(model):
        for path in {relative_path(model, weight.path), weight.path}:
            by_path.setdefault(path, weight)
    return by_path
