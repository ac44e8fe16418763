"""`adapter_config.json`: what we check, and PEFT's matching rules, copied.

The rules here mirror peft 0.21 (`peft.utils.other.get_pattern_key`,
`peft.tuners.tuners_utils.check_target_module_exists`) so that a module gets
the rank, alpha and adapted/not-adapted status PEFT itself would give it.
"""

import math
import numbers
import re

# The files of a PEFT adapter folder, and the prefix PEFT gives tensor names.
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
STATE_PREFIX = "base_model.model."

# Config fields that change what a LoRA module computes or adds weights we
# have no place for. Any truthy value is refused with a ValueError.
UNSUPPORTED = {
    "use_dora": "DoRA adds a magnitude vector and normalises the weight",
    "lora_bias": "a trained bias on lora_B",
    "layer_replication": "layers duplicated from the base model",
    "target_parameters": "LoRA on raw parameters (MoE experts)",
    "trainable_token_indices": "trainable rows of the embedding table",
    "alora_invocation_tokens": "activated LoRA (an update that starts at a token)",
    "use_qalora": "QA-LoRA (pooled inputs)",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA (singular-value updates)",
    "monteclora_config": "MonteCLoRA (stochastic factors)",
    "velora_config": "VeLoRA",
    "megatron_config": "Megatron-parallel LoRA layers",
}


def check(config):
    """Raises a `ValueError` for any config LoRA layers here cannot represent.

    Args:
        config: the parsed `adapter_config.json` (a dict).

    Returns:
        A dict with the fields the loader uses: `r`, `lora_alpha`,
        `use_rslora`, `lora_dropout`, `rank_pattern`, `alpha_pattern`.
    """
    if not isinstance(config, dict):
        raise ValueError(
            f"`adapter_config.json` must hold a JSON object. Received: {config!r}"
        )
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(
            "Only LoRA adapters can be loaded (AdaLoRA, IA3, prefix tuning, ... "
            f"compute something else). Received: peft_type={peft_type!r}"
        )
    for field, what in UNSUPPORTED.items():
        if config.get(field):
            raise ValueError(
                f"The adapter uses `{field}` ({what}), which keras-lora's LoRA "
                f"layers cannot represent. Received: {field}={config[field]!r}"
            )
    bias = config.get("bias", "none")
    if bias != "none":
        raise ValueError(
            "The adapter trains biases of the base model (`bias` other than "
            "'none'); only LoRA factors can be loaded. "
            f"Received: bias={bias!r}"
        )
    r = config.get("r", 8)
    _check_positive("r", r, integer=True)
    alpha = config.get("lora_alpha", 8)
    _check_positive("lora_alpha", alpha)
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise ValueError(
            f"`use_rslora` must be a bool. Received: use_rslora={use_rslora!r}"
        )
    dropout = config.get("lora_dropout", 0.0) or 0.0
    if not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(
            "`lora_dropout` must be a float in [0, 1). "
            f"Received: lora_dropout={dropout!r}"
        )
    patterns = {}
    for field, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise ValueError(
                f"`{field}` must be a JSON object. Received: {field}={pattern!r}"
            )
        for key, value in pattern.items():
            _check_positive(f"{field}[{key!r}]", value, integer=integer)
        patterns[field] = pattern
    return {
        "r": int(r),
        "lora_alpha": float(alpha),
        "use_rslora": use_rslora,
        "lora_dropout": float(dropout),
        **patterns,
    }


def _check_positive(name, value, integer=False):
    kind = numbers.Integral if integer else numbers.Real
    if (
        isinstance(value, bool)
        or not isinstance(value, kind)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            f"`{name}` must be a positive {'integer' if integer else 'number'}. "
            f"Received: {name}={value!r}"
        )


def pattern_value(pattern, module_name, default):
    """PEFT's `rank_pattern` / `alpha_pattern` lookup for one module."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return pattern[key]
    return default


def is_targeted(config, module_name):
    """Whether PEFT's `target_modules` (and exclusions) select `module_name`.

    Returns None when the config does not say (no `target_modules`, or
    `"all-linear"`, which PEFT resolves against the torch model).
    """
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return None
    excluded = config.get("exclude_modules")
    if excluded:
        if isinstance(excluded, str):
            if re.fullmatch(excluded, module_name):
                return False
        elif _in_list(excluded, module_name):
            return False
    for saved in config.get("modules_to_save") or []:
        # PEFT never puts LoRA on a module it saves whole.
        if re.match(rf"(^|.*\.){saved}($|\..*)", module_name):
            return False
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    if module_name in targets:
        return True
    if not _in_list(targets, module_name):
        return False
    indexes = config.get("layers_to_transform")
    if indexes is None or indexes == []:
        return True
    indexes = [indexes] if isinstance(indexes, int) else indexes
    layers_pattern = config.get("layers_pattern")
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
    else:
        if isinstance(layers_pattern, str):
            layers_pattern = [layers_pattern]
        match = None
        for pattern in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module_name)
            if match is not None:
                break
    return match is not None and int(match.group("idx")) in indexes


def _in_list(names, module_name):
    return module_name in names or any(module_name.endswith(f".{n}") for n in names)
