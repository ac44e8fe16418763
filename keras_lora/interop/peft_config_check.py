"""Checks a whole `adapter_config.json` before anything reads it further.

Every field the loader uses is checked for its JSON type, and every field PEFT
treats as a regular expression is compiled exactly as `peft_config.py` will
use it, so that a malformed config is one `ValueError` naming the file and
the field, before the model is touched (never a `TypeError`, a `KeyError` or
an `re.error` half-way through).
"""

import numbers
import re

from keras_lora.interop import peft_config
from keras_lora.layers import lora_math


def check(config, file):
    """Raises a `ValueError` for any config LoRA layers here cannot represent.

    Args:
        config: the parsed `adapter_config.json`.
        file: its path, for the messages.

    Returns:
        A dict with the fields the loader uses: `r`, `lora_alpha`,
        `use_rslora`, `use_dora`, `lora_dropout`, `rank_pattern`,
        `alpha_pattern`.

    Example:

    >>> check({"peft_type": "LORA", "r": 8}, "adapter_config.json")["r"]
    8
    """
    if not isinstance(config, dict):
        raise ValueError(
            f"'{file}' must hold a JSON object. Received: {_short(config)} "
            f"of type {type(config).__name__}"
        )
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(
            f"'{file}': only LoRA adapters can be loaded (AdaLoRA, IA3, prefix "
            f"tuning, ... compute something else). Received: "
            f"peft_type={_short(peft_type)}"
        )
    for field, what in peft_config.UNSUPPORTED.items():
        if config.get(field):
            raise ValueError(
                f"'{file}': the adapter uses `{field}` ({what}), which keras-lora's "
                f"LoRA layers cannot represent. Received: "
                f"{field}={_short(config[field])}"
            )
    bias = config.get("bias", "none")
    if bias != "none":
        raise ValueError(
            f"'{file}': the adapter trains biases of the base model (`bias` other "
            f"than 'none'); only LoRA factors can be loaded. Received: "
            f"bias={_short(bias)}"
        )
    r = _positive(file, "r", config.get("r", 8), integer=True)
    alpha = _positive(file, "lora_alpha", config.get("lora_alpha", 8))
    use_rslora = _bool(file, "use_rslora", config.get("use_rslora", False))
    # null: older PEFT configs leave `use_dora` unset.
    use_dora = _bool(file, "use_dora", config.get("use_dora") or False)
    dropout = config.get("lora_dropout", 0.0)
    if dropout is None:
        dropout = 0.0
    try:
        dropout = lora_math.check_dropout(dropout)
    except ValueError:
        raise ValueError(
            f"'{file}': `lora_dropout` must be a number in [0, 1). Received: "
            f"lora_dropout={_short(dropout)}"
        ) from None
    patterns = {}
    for field, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = _optional(file, config, field, dict, "a JSON object") or {}
        for key, value in pattern.items():
            _regex(file, f"{field}[{key!r}]", key, peft_config.rank_pattern_regex)
            _positive(file, f"{field}[{key!r}]", value, integer=integer)
        patterns[field] = pattern
    _check_selection(config, file)
    return {
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "lora_dropout": dropout,
        **patterns,
    }


def _check_selection(config, file):
    """The fields `peft_config.is_targeted` and `group_tensors` read."""
    for field in ("target_modules", "exclude_modules"):
        value = _optional(file, config, field, (str, list), "a string or a list")
        if isinstance(value, str):
            _regex(file, field, value, lambda x: x)
        elif value is not None:
            _strings(file, field, value)
    # Matched as names, not regular expressions (`peft_experts.py`).
    parameters = _optional(file, config, "target_parameters", list, "a list of names")
    _strings(file, "target_parameters", parameters or [])
    saved = _optional(file, config, "modules_to_save", list, "a list of names")
    for index, name in enumerate(_strings(file, "modules_to_save", saved or [])):
        _regex(file, f"modules_to_save[{index}]", name, peft_config.saved_module_regex)
    indexes = config.get("layers_to_transform")
    if not (
        indexes is None
        or _is_index(indexes)
        or (isinstance(indexes, list) and all(map(_is_index, indexes)))
    ):
        raise ValueError(
            f"'{file}': `layers_to_transform` must be a layer index or a list of "
            f"them. Received: layers_to_transform={_short(indexes)}"
        )
    layers = _optional(file, config, "layers_pattern", (str, list), "a string")
    layers = [layers] if isinstance(layers, str) else layers or []
    for index, pattern in enumerate(_strings(file, "layers_pattern", layers)):
        _regex(
            file, f"layers_pattern[{index}]", pattern, peft_config.layers_pattern_regex
        )


def _bool(file, field, value):
    if not isinstance(value, bool):
        raise ValueError(
            f"'{file}': `{field}` must be true or false. Received: "
            f"{field}={_short(value)}"
        )
    return value


def _optional(file, config, field, types, what):
    value = config.get(field)
    if value is not None and not isinstance(value, types):
        raise ValueError(
            f"'{file}': `{field}` must be null or {what}. Received: "
            f"{field}={_short(value)}"
        )
    return value


def _strings(file, field, values):
    for value in values:
        if not isinstance(value, str):
            raise ValueError(
                f"'{file}': every entry of `{field}` must be a string. Received: "
                f"{field}={_short(values)}"
            )
    return values


def _regex(file, field, text, build):
    """Compiles `build(text)`, the regular expression PEFT makes of a field."""
    try:
        re.compile(build(text))
    except (re.error, RecursionError, OverflowError) as error:
        raise ValueError(
            f"'{file}': `{field}` is not a valid regular expression ({error}). "
            f"Received: {field}={_short(text)}"
        ) from None


def _positive(file, field, value, integer=False):
    kind = numbers.Integral if integer else numbers.Real
    # `not 0 < x <= max` also refuses NaN, infinities and integers too large
    # for a float.
    if isinstance(value, bool) or not isinstance(value, kind) or not 0 < value <= 2**63:
        raise ValueError(
            f"'{file}': `{field}` must be a positive "
            f"{'integer' if integer else 'number'}. Received: {field}={_short(value)}"
        )
    return int(value) if integer else float(value)


def _is_index(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _short(value):
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
