"""A layer with LoRA on its raw weights: a mixture-of-experts bank, adapted.

`LoRAExpertEinsum.adapt` attaches one LoRA layer per adapted weight to the
bank and changes the bank's class in place (same object, as for every LoRA
layer) to a subclass of its own class whose `call`:
- for a known KerasHub bank whose recipe matches its `call`
  (`expert_recipes.py`), runs the recipe with a `project` that adds each
  adapted weight's update factored;
- otherwise runs the bank's own `call`, and each adapted weight read inside
  it reads W + s·A·B (the generic path). That is a property of the subclass,
  not an assignment, and it reads so only on the thread running this bank's
  call: a forward pass changes no state (as `base_call.py` for activations).

The LoRA layers are tracked in the bank's layer list only, not in an
attribute, so Keras's saver does not visit them: the bank saves their factors
next to its own variables (under `<weight name>.lora_a`, ...) and a merged
export writes the bank exactly as its original class would.
`merge_lora` folds each update into its weight and detaches the layer; with
the last one gone the bank is its original class again.
"""

import warnings

import numpy as np
from keras import ops

from keras_lora.class_view import ClassViewMixin
from keras_lora.layers import expert_recipes
from keras_lora.layers.base_call import base_call_scope, in_base_call, stored_attribute

_CLASSES = {}  # (bank class, weight attributes) -> its adapted subclass
_RECIPE_CHECKS = {}  # bank class -> does its recipe match its `call`?


class ExpertLayers:
    """The LoRA layers of one bank, by the attribute of their weight.

    A plain object, not a list or dict: Keras's saver walks those and would
    write the factors a second time.
    """

    def __init__(self, by_attribute):
        # Replaced, never changed in place: `atomic.all_or_nothing` then
        # restores it with the bank's other attributes.
        self.by_attribute = by_attribute


class LoRAExpertBank(ClassViewMixin):
    """Mixin of an adapted bank's class (made by `attach`)."""

    _lora_bank_base = None

    def call(self, *args, **kwargs):
        with base_call_scope(self):  # its weights read W + s·A·B (generic)
            recipe = _checked_recipe(self._lora_bank_base)
            if recipe is None:
                return self._lora_bank_base.call(self, *args, **kwargs)
            hidden_states = args[0] if args else kwargs["hidden_states"]
            return recipe.call(self, hidden_states, self.lora_project)

    def lora_project(self, attribute, x):
        """`einsum(x, W)` of the recipe, with W's update if it is adapted."""
        layer = self._lora_experts.by_attribute.get(attribute)
        if layer is not None and layer.factored:
            return layer(x)
        return plain_project(self, self._lora_bank_base, attribute, x)

    def save_own_variables(self, store):
        self._lora_bank_base.save_own_variables(self, store)
        for layer in self._lora_experts.by_attribute.values():
            layer.save_own_variables(_Prefixed(store, f"{layer.name}."))

    def load_own_variables(self, store):
        layers = list(self._lora_experts.by_attribute.values())
        prefixes = tuple(f"{layer.name}." for layer in layers)
        own = {k: store[k] for k in store.keys() if not k.startswith(prefixes)}
        self._lora_bank_base.load_own_variables(self, own)
        for layer in layers:
            layer.load_own_variables(_Prefixed(store, f"{layer.name}."))


class _Prefixed:
    """A view of a weights store whose keys get a prefix."""

    def __init__(self, store, prefix):
        self.store, self.prefix = store, prefix

    def __setitem__(self, key, value):
        self.store[self.prefix + key] = value

    def __getitem__(self, key):
        return self.store[self.prefix + key]


def plain_project(bank, bank_class, attribute, x):
    """The recipe's product of `x` with the weight `attribute`, as the bank's
    own `call` computes it (no update)."""
    equation = expert_recipes.recipe_for(bank_class).weights[attribute]
    return ops.einsum(equation, x, getattr(bank, attribute))


def original_class(bank):
    """The class of `bank` before any weight of it was adapted."""
    return getattr(type(bank), "_lora_bank_base", None) or type(bank)


def has_recipe(layer):
    """True if `layer` is a KerasHub expert bank keras-lora knows."""
    return expert_recipes.recipe_for(original_class(layer)) is not None


def expert_layers(bank):
    """{attribute: LoRA layer} of an adapted bank ({} for any other layer)."""
    holder = bank.__dict__.get("_lora_experts")
    return dict(holder.by_attribute) if holder is not None else {}


def attach(bank, layer):
    """Makes `layer` (a `LoRAExpertEinsum`) part of `bank`."""
    if not isinstance(bank, LoRAExpertBank):
        attributes = tuple(sorted(raw_attributes(bank)))
        bank.__class__ = _adapted_class(type(bank), attributes)
    layers = {**expert_layers(bank), layer.lora_attribute: layer}
    object.__setattr__(bank, "_lora_experts", ExpertLayers(layers))
    locked = bank._tracker.locked
    bank._tracker.unlock()
    try:
        bank._tracker.add_to_store("layers", layer)
    finally:
        if locked:
            bank._tracker.lock()


def detach(bank, layer):
    """Removes `layer` from `bank`; the last one gives the bank its class back."""
    layers = expert_layers(bank)
    layers.pop(layer.lora_attribute)
    bank._layers.remove(layer)
    if layers:
        object.__setattr__(bank, "_lora_experts", ExpertLayers(layers))
    else:
        bank.__class__ = bank._lora_bank_base
        del bank.__dict__["_lora_experts"]


def raw_attributes(layer):
    """{attribute: variable} of the layer's own weights of 2 axes or more."""
    children = layer._flatten_layers(include_self=False)
    inner = {id(v) for child in children for v in child.weights}
    own = {id(v) for v in layer.weights if id(v) not in inner and len(v.shape) >= 2}
    return {
        name: value
        for name, value in vars(layer).items()
        if id(value) in own and not name.startswith("__")
    }


def recipe_verified(bank_class):
    """True if the recipe of `bank_class` computes what its `call` computes.

    Checked once per class on 3 random tokens with the weights of a bank of
    that class (a KerasHub release may change a bank's `call`).
    """
    return bank_class in _RECIPE_CHECKS and _RECIPE_CHECKS[bank_class]


def check_recipe(bank):
    """Runs (once per class) and returns `recipe_verified` for `bank`'s class."""
    cls = original_class(bank)
    recipe = expert_recipes.recipe_for(cls)
    if recipe is None:
        return False
    if cls not in _RECIPE_CHECKS:
        first = next(iter(recipe.weights))
        d_in = getattr(bank, first).shape[1]
        rng = np.random.default_rng(0)
        x = ops.convert_to_tensor(rng.standard_normal((3, d_in)), bank.compute_dtype)

        def project(attribute, inputs):
            return plain_project(bank, cls, attribute, inputs)

        try:
            expected = ops.convert_to_numpy(cls.call(bank, x)).astype("float32")
            got = ops.convert_to_numpy(recipe.call(bank, x, project)).astype("float32")
            same = expected.shape == got.shape and np.allclose(
                expected, got, rtol=1e-5, atol=1e-6
            )
        except Exception:  # a changed `call`: attributes renamed, say
            same = False
        if not same:
            warnings.warn(
                f"keras-lora's recipe for {cls.__name__} does not compute what "
                "its `call` computes in this KerasHub version: its expert "
                "weights use the generic LoRA path (W + s·A·B built in each "
                "call: correct, slower, more memory).",
                stacklevel=2,
            )
        _RECIPE_CHECKS[cls] = bool(same)
    return _RECIPE_CHECKS[cls]


def _checked_recipe(bank_class):
    if not recipe_verified(bank_class):
        return None
    return expert_recipes.recipe_for(bank_class)


def _adapted_class(base, attributes):
    key = (base, attributes)
    if key not in _CLASSES:
        namespace = {
            "_lora_bank_base": base,
            "__module__": __name__,
            **{name: _weight_property(name) for name in attributes},
        }
        _CLASSES[key] = type(f"LoRA{base.__name__}", (LoRAExpertBank, base), namespace)
    return _CLASSES[key]


def _weight_property(attribute):
    """The bank's raw weight: W + s·A·B inside its generic call, else W."""

    def get(self):
        value = stored_attribute(self, attribute)
        if in_base_call(self):
            layer = self._lora_experts.by_attribute.get(attribute)
            if layer is not None and not layer.factored:
                return ops.cast(layer.merged_kernel(), self.compute_dtype)
        return value

    def set(self, value):
        self.__dict__[attribute] = value

    return property(get, set)


def save_merged(bank, store):
    """Writes `bank` as its original class would, each adapted weight merged."""
    entries = {}
    original_class(bank).save_own_variables(bank, entries)
    layers = expert_layers(bank).values()
    merged = {id(layer.lora_base_kernel): layer for layer in layers}
    for key, value in entries.items():
        layer = merged.get(id(value))
        store[key] = value if layer is None else layer.merged_kernel()
