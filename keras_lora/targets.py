"""Which layers of a model `enable_lora` adapts, and which ones it leaves trainable.

A target spec is one of:
- `None`: the paper's choice, the query and value projections of every
  attention block (a fused q/k/v projection is adapted as one matrix); a model
  without attention gets every Dense and EinsumDense layer, unless it has
  convolutions: the paper's choice has no convolutional analogue, so there
  `None` is an error asking for `"all-conv"`, `"all-linear"` or names (never
  a silent choice of the Dense head alone);
- `"all-linear"`: every Dense and EinsumDense layer (inside the backbone, when
  the model has a KerasHub backbone, so that task heads stay out), and the
  expert weights of the KerasHub mixture-of-experts banks keras-lora knows,
  not their routers (`_all_linear`);
- `"all-conv"`: every Conv1D, Conv2D and Conv3D layer (same backbone rule);
- a list of layer names or regular expressions, each matched in full against
  `layer.path` (or equal to `layer.name`); raw weights (an expert bank's) are
  matched by `<layer path>/<weight name>`; every entry must match something;
- a callable `layer -> bool`.
"""

import re
import sys
import warnings

import keras

from keras_lora.layers import expert_bank
from keras_lora.layers.conv import LoRAConv1D, LoRAConv2D, LoRAConv3D
from keras_lora.layers.dense import LoRADense
from keras_lora.layers.einsum_dense import LoRAEinsumDense
from keras_lora.layers.embedding import LoRAEmbedding, LoRAReversibleEmbedding
from keras_lora.layers.expert_einsum import LoRAExpertEinsum
from keras_lora.layers.lora_layer import LoRALayer
from keras_lora.model_paths import sublayers
from keras_lora.raw_weights import RawWeight, raw_weights

# The last path component of query / value projections across KerasHub (and
# Hugging Face names, for user models): `query`/`value` (Keras MHA, GPT-2, BERT,
# Llama, Gemma), `query_dense`/`value_dense` (Falcon, Bloom), `q_proj`/`v_proj`,
# and fused projections, adapted as one matrix.
QUERY_VALUE_NAMES = frozenset(
    {
        "query",
        "value",
        "query_dense",
        "value_dense",
        "q_proj",
        "v_proj",
        "wq",
        "wv",
        "query_key_value",
        "qkv",
        "c_attn",
    }
)

LINEAR_TYPES = (keras.layers.Dense, keras.layers.EinsumDense)
CONV_TYPES = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
# The named target sets, and what each selects.
NAMED_SETS = {"all-linear": "Dense or EinsumDense", "all-conv": "Conv1D/2D/3D"}


def adaptable_types():
    """The exact classes enable_lora knows how to adapt."""
    types = [keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding]
    types += CONV_TYPES
    if hasattr(keras.layers, "ReversibleEmbedding"):
        types.append(keras.layers.ReversibleEmbedding)
    hub = sys.modules.get("keras_hub")
    if hub is not None:
        types.append(hub.layers.ReversibleEmbedding)
    return tuple(types)


def is_adaptable(layer):
    return isinstance(layer, RawWeight) or type(layer) in adaptable_types()


def is_lora(layer):
    return isinstance(layer, LoRALayer)


def describe(layer):
    return layer.path or layer.name


def _backbone_layers(model):
    """Layers of the KerasHub backbone inside `model`, or None if it has none."""
    hub = sys.modules.get("keras_hub")
    if hub is None:
        return None
    for layer in [model, *sublayers(model)]:
        if isinstance(layer, hub.models.Backbone):
            return set(map(id, sublayers(layer)))
    return None


def _default_targets(candidates, model, argument):
    attention = [
        layer
        for layer in candidates
        if isinstance(layer, LINEAR_TYPES) and layer.name in QUERY_VALUE_NAMES
    ]
    if attention:
        return attention
    convs = [describe(lyr) for lyr in candidates if _is_conv(lyr)]
    if convs:
        # Adapting only a CNN's Dense head (or nothing) would be a silent
        # surprise: ask which layers.
        raise ValueError(
            f"`{argument}=None` is ambiguous for model '{model.name}': it has "
            f"convolutions ({convs[:5]}) and no attention. Pass "
            f"`{argument}='all-conv'` (every Conv1D/2D/3D), "
            f"`{argument}='all-linear'` (every Dense/EinsumDense) or a list of "
            f"layer names. Received: {argument}=None"
        )
    return [lyr for lyr in candidates if isinstance(lyr, LINEAR_TYPES)]


def _is_conv(layer):
    return type(layer) in CONV_TYPES or (
        is_lora(layer) and issubclass(layer.lora_base_class, CONV_TYPES)
    )


def _entry_matches(entry, layer):
    return entry == layer.name or (
        layer.path is not None and re.fullmatch(entry, layer.path) is not None
    )


def match_layers(model, spec, argument):
    """Returns the layers of `model` that `spec` selects, in model order.

    Args:
        model: a Keras model (or layer).
        spec: a target spec (see the module docstring).
        argument: the argument's name, for error messages (`"targets"`,
            `"train_layers"`).

    Raises:
        ValueError: if the spec is malformed, matches nothing, or (for
            `targets`) selects a layer that cannot be adapted.
    """
    layers = sublayers(model)
    # LoRA layers stay candidates so that adapting them twice is an error.
    candidates = [lyr for lyr in layers if is_adaptable(lyr) or is_lora(lyr)]
    weights = raw_weights(model)
    if spec is None or (isinstance(spec, str) and spec in NAMED_SETS):
        inside = _backbone_layers(model)
        if inside is not None:
            candidates = [lyr for lyr in candidates if id(lyr) in inside]
            weights = [w for w in weights if id(w.layer) in inside]
        if spec is None:
            selected = _default_targets(candidates, model, argument)
        elif spec == "all-conv":
            selected = [lyr for lyr in candidates if _is_conv(lyr)]
        else:
            selected = _all_linear(model, candidates, weights, argument)
        if not selected:
            names = [describe(lyr) for lyr in layers][:20]
            kind = NAMED_SETS.get(spec, NAMED_SETS["all-linear"])
            raise ValueError(
                f"`{argument}={spec!r}` found no {kind} layer in "
                f"model '{model.name}'. Layers: {names}"
            )
        return selected
    if callable(spec):  # layers only: a user's test may read layer attributes
        selected = [layer for layer in layers if spec(layer)]
        unmatched = [] if selected else [getattr(spec, "__name__", repr(spec))]
    elif (
        isinstance(spec, (list, tuple))
        and spec
        and all(isinstance(entry, str) for entry in spec)
    ):
        for entry in spec:
            try:
                re.compile(entry)
            except re.error as error:
                raise ValueError(
                    f"`{argument}` entry {entry!r} is not a valid regular "
                    f"expression ({error}). Received: {argument}={spec!r}"
                ) from None
        layers = [*layers, *weights]  # raw weights are named like layers
        selected = [lyr for lyr in layers if any(_entry_matches(e, lyr) for e in spec)]
        unmatched = [
            e for e in spec if not any(_entry_matches(e, lyr) for lyr in layers)
        ]
    else:
        raise ValueError(
            f"`{argument}` must be None, 'all-linear', 'all-conv', a non-empty "
            "list of layer names or regular expressions, or a callable. Received: "
            f"{argument}={spec!r}"
        )
    if unmatched:
        sample = [describe(lyr) for lyr in (candidates or layers)][:12]
        raise ValueError(
            f"`{argument}` entries {unmatched} matched no layer of model "
            f"'{model.name}' (entries match a layer's name or, in full, its "
            f"path). Some candidate paths: {sample}"
        )
    return selected


def _all_linear(model, candidates, weights, argument):
    """`"all-linear"`: Dense/EinsumDense layers and known expert weights.

    A mixture-of-experts router (and a shared expert's gate) stays out: an
    update there changes which experts each token reaches, so the adapted
    experts would no longer see the tokens they were trained on. Name it to
    adapt it. Raw weights keras-lora does not know are listed in a warning
    rather than skipped silently.
    """
    routers = {id(layer) for layer in moe_routers(model)}
    selected = [
        lyr
        for lyr in candidates
        if isinstance(lyr, LINEAR_TYPES) and id(lyr) not in routers
    ]
    selected += [w for w in weights if w.known]
    unknown = [w.path for w in weights if not w.known and _maybe_linear(w)]
    if unknown:
        warnings.warn(
            f"`{argument}='all-linear'` leaves {len(unknown)} raw weight(s) of "
            f"model '{model.name}' unadapted: {unknown[:10]}. keras-lora does not "
            "know how their layers use them; name them in `targets` (path or "
            "regex) to adapt them with the generic path (W + s·A·B).",
            stacklevel=4,
        )
    return selected


def _maybe_linear(weight):
    """False for lookup tables (position embeddings): not linear maps."""
    return "Embedding" not in type(weight.layer).__name__


def moe_routers(model):
    """The router (and shared-expert gate) Dense layers of each MoE block.

    A block is a layer with a known expert bank among its children; its
    routers are the Dense layers below it (outside the bank) with one unit
    per expert, or one unit (a shared expert's sigmoid gate).
    """
    routers = []
    for block in [model, *sublayers(model)]:
        children = block._flatten_layers(include_self=False, recursive=False)
        banks = [c for c in children if expert_bank.has_recipe(c)]
        if not banks:
            continue
        units = {getattr(bank, "num_experts", None) for bank in banks} | {1}
        inside_banks = {id(x) for b in banks for x in sublayers(b)}
        routers += [
            lyr
            for lyr in sublayers(block)
            if id(lyr) not in inside_banks
            and isinstance(lyr, keras.layers.Dense)
            and (lyr.units in units)
        ]
    return routers


def check_adaptable(layers):
    """Raises a `ValueError` naming the first selected layer LoRA cannot adapt."""
    for layer in layers:
        if not is_adaptable(layer):
            kind = (
                "an already adapted LoRA layer"
                if is_lora(layer)
                else (f"a {type(layer).__name__}")
            )
            raise ValueError(
                f"`targets` selected layer '{describe(layer)}', which is {kind}; "
                "LoRA adapts Dense, EinsumDense, Embedding and Conv1D/2D/3D layers "
                "(groups=1) that are not adapted yet."
            )


def lora_class_for(layer):
    """The LoRA class that adapts `layer` (an exact adaptable type)."""
    if isinstance(layer, RawWeight):
        return LoRAExpertEinsum
    if type(layer) is keras.layers.Dense:
        return LoRADense
    if type(layer) is keras.layers.EinsumDense:
        return LoRAEinsumDense
    if type(layer) is keras.layers.Embedding:
        return LoRAEmbedding
    if isinstance(layer, keras.layers.Embedding) and is_adaptable(layer):
        return LoRAReversibleEmbedding
    conv = {
        keras.layers.Conv1D: LoRAConv1D,
        keras.layers.Conv2D: LoRAConv2D,
        keras.layers.Conv3D: LoRAConv3D,
    }.get(type(layer))
    if conv is not None:
        return conv
    raise ValueError(
        f"Layer '{describe(layer)}' of type {type(layer).__name__} "
        "cannot be adapted: LoRA adapts Dense, EinsumDense, Embedding and "
        "Conv1D/2D/3D layers."
    )
