"""The LoRA spec: what `enable_lora` did to a model, as JSON, and its checks.

A spec is recorded on every adapted model and travels in adapter files and in
saved models:

    {"version": 1, "targets": ..., "layers": {path: {"rank", "alpha",
     "dropout", "use_rslora"[, "use_dora"]}}, "train_layers": [path, ...]}

Adapter files come from strangers, so `check_spec` validates every key, type
and value before a model is touched: an unknown key (an initializer injected
into a file, say) is an error, never honoured.
"""

import math

from keras_lora import lora_init
from keras_lora.layers import lora_math
from keras_lora.layers.adapter_set import check_adapter_name

SPEC_VERSION = 1

LAYER_KEYS = ("rank", "alpha", "dropout", "use_rslora")
# Optional per-layer keys: DoRA (absent means False; files written before
# DoRA lack it). `init` (PiSSA/OLoRA) lives only in a model's own config: the
# adapter file of such a model is converted to apply to the original base.
OPTIONAL_KEYS = ("use_dora",)
MODEL_ONLY_KEYS = ("init",)
# Initializers are recorded by `load_peft_adapter` (zeros: the values are
# assigned right after) and travel in a saved model's own config; adapter
# files never carry them.
INITIALIZER_KEYS = ("a_initializer", "b_initializer")
# Written by keras-lora 0.1 (the model's trainable flags at `enable_lora`):
# accepted and ignored, since the flags to restore are the model's own.
LEGACY_KEYS = ("frozen_layers", "frozen_variables")
_KEYS = ("version", "targets", "layers", "train_layers")


def check_spec(spec, source, allow_initializers=False):
    """Returns a clean copy of `spec`, or raises a `ValueError` naming `source`.

    Args:
        spec: the decoded JSON spec.
        source: what it came from, for messages (e.g. "'task.keras'").
        allow_initializers: accept per-layer `a_initializer`/`b_initializer`
            and `init` (a model's own config); adapter files may not carry
            them.

    Returns:
        The spec without legacy keys.
    """

    def fail(field, problem, value):
        raise ValueError(
            f"{source} has an invalid LoRA spec: `{field}` {problem}. "
            f"Received: {field}={value!r}"
        )

    if not isinstance(spec, dict):
        fail("spec", "must be a JSON object", spec)
    unknown = sorted(set(spec) - set(_KEYS) - set(LEGACY_KEYS))
    if unknown:
        fail("spec", f"has unknown keys {unknown}", sorted(spec))
    missing = [key for key in _KEYS if key not in spec]
    if missing:
        fail("spec", f"lacks the keys {missing}", sorted(spec))
    version = spec["version"]
    if isinstance(version, bool) or version != SPEC_VERSION:
        fail("version", f"must be {SPEC_VERSION} (upgrade keras-lora?)", version)
    targets = spec["targets"]
    if not (
        targets is None
        or isinstance(targets, str)
        or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        fail("targets", "must be null, a string or a list of strings", targets)
    for key in LEGACY_KEYS:
        if key in spec and not _is_str_list(spec[key]):
            fail(key, "must be a list of strings", spec[key])
    if not _is_str_list(spec["train_layers"]):
        fail("train_layers", "must be a list of layer paths", spec["train_layers"])
    layers = spec["layers"]
    if not isinstance(layers, dict) or not layers:
        fail("layers", "must be a non-empty object {layer path: settings}", layers)
    # `enable_lora`'s rule: an adapted layer's base weights stay frozen.
    overlap = [path for path in spec["train_layers"] if path in layers]
    if overlap:
        fail("train_layers", f"names the adapted layer '{overlap[0]}'", overlap)
    allowed = LAYER_KEYS + OPTIONAL_KEYS
    if allow_initializers:
        allowed += INITIALIZER_KEYS + MODEL_ONLY_KEYS
    clean_layers = {}
    for path, config in layers.items():
        field = f"layers[{path!r}]"
        if not isinstance(config, dict):
            fail(field, "must be an object", config)
        unknown = sorted(set(config) - set(allowed))
        missing = [key for key in LAYER_KEYS if key not in config]
        if unknown or missing:
            fail(field, f"must have exactly the keys {list(allowed)}", config)
        if not isinstance(config["use_rslora"], bool):
            fail(f"{field}.use_rslora", "must be a bool", config["use_rslora"])
        if not isinstance(config.get("use_dora", False), bool):
            fail(f"{field}.use_dora", "must be a bool", config["use_dora"])
        if config.get("init") not in (None, *lora_init.RESIDUAL_INITS):
            fail(f"{field}.init", "must be null, 'pissa' or 'olora'", config["init"])
        for key in INITIALIZER_KEYS:
            if key in config and not isinstance(config[key], str):
                fail(f"{field}.{key}", "must be an initializer name", config[key])
        try:
            rank = lora_math.check_rank(config["rank"])
            lora_math.check_alpha(config["alpha"], rank)
            lora_math.check_dropout(config["dropout"])
        except ValueError as error:
            fail(field, f"is out of range ({error})", config)
        clean_layers[path] = dict(config)
    clean = {key: spec[key] for key in _KEYS}
    clean["layers"] = clean_layers
    clean["train_layers"] = list(spec["train_layers"])
    return clean


def _is_str_list(value):
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def check_trainable_state(state, source):
    """Validates the trainable flags a saved adapted model carries."""
    if (
        not isinstance(state, dict)
        or set(state) != {"model", *LEGACY_KEYS}
        or not isinstance(state["model"], bool)
        or not all(_is_str_list(state[key]) for key in LEGACY_KEYS)
    ):
        raise ValueError(
            f"{source} has invalid trainable flags: expected an object with a "
            f"bool 'model' and lists of paths {list(LEGACY_KEYS)}. "
            f"Received: trainable={state!r}"
        )
    return state


def check_layer_matches(layer, path, config, adapter="the spec"):
    """Raises unless a LoRA layer (rebuilt from a saved config) has the
    settings its spec records: an edited config whose spec says DoRA for a
    plain LoRA layer would load, then save adapter files nothing can read.

    Args:
        layer: the LoRA layer at `path`.
        path: its path, for the message.
        config: the spec's settings for it.
        adapter: what records them, for the message.
    """
    recorded = {
        "rank": config["rank"],
        "alpha": lora_math.check_alpha(config["alpha"], config["rank"]),
        "use_rslora": config["use_rslora"],
        "use_dora": config.get("use_dora", False),
        "init": config.get("init"),
    }
    for field, value in recorded.items():
        ours = layer.lora_init if field == "init" else getattr(layer, field)
        if ours != value:
            raise ValueError(
                f"Layer '{path}' has LoRA {field}={ours!r}, but {adapter} "
                f"records {field}={value!r}."
            )


def check_named_config(config, source):
    """Validates the named adapters a saved model's config records
    (`named_adapters.saved_config`): names, specs, and an active set of
    distinct names with finite weights (as `set_adapter` requires)."""
    if (
        not isinstance(config, dict)
        or sorted(config) != ["active", "adapters", "names"]
        or not _is_str_list(config["names"])
        or not isinstance(config["adapters"], dict)
        or list(config["adapters"]) != config["names"][1:]
    ):
        raise ValueError(
            f"{source} has invalid named adapters: expected names, adapters "
            f"and active. Received: named={config!r}"
        )
    for name in config["names"]:
        check_adapter_name(name)
    adapters = {
        name: check_spec(spec, f"{source} (adapter {name!r})", True)
        for name, spec in config["adapters"].items()
    }
    active = config["active"]
    if active is not None and not (
        isinstance(active, list)
        and all(
            isinstance(p, list)
            and len(p) == 2
            and p[0] in config["names"]
            and isinstance(p[1], (int, float))
            and not isinstance(p[1], bool)
            and math.isfinite(p[1])
            for p in active
        )
        and len({p[0] for p in active}) == len(active)
    ):
        raise ValueError(
            f"{source} has an invalid active set: pairs [adapter name, finite "
            f"weight] with distinct names. Received: active={active!r}"
        )
    return {"names": config["names"], "adapters": adapters, "active": active}
