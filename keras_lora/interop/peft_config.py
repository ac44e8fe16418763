"""`adapter_config.json`: PEFT's matching rules, copied.

`peft_config_check.py` checks a config before these rules see it. The rules
here mirror peft 0.21 (`peft.utils.other.get_pattern_key`,
`peft.tuners.tuners_utils.check_target_module_exists`) so that a module gets
the rank, alpha and adapted/not-adapted status PEFT itself would give it.
"""

import re

# One implementation of PEFT's pattern rule, shared with `enable_lora`'s
# `rank_pattern`/`alpha_pattern` (keras_lora/patterns.py).
from keras_lora.patterns import pattern_regex as rank_pattern_regex  # noqa: F401
from keras_lora.patterns import pattern_value  # noqa: F401

# The files of a PEFT adapter folder, and the prefix PEFT gives tensor names.
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
STATE_PREFIX = "base_model.model."

# Config fields that change what a LoRA module computes or adds weights we
# have no place for. Any truthy value is refused with a ValueError.
UNSUPPORTED = {
    "lora_bias": "a trained bias on lora_B",
    "layer_replication": "layers duplicated from the base model",
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


def is_targeted(config, module_name, match=re.match):
    """Whether PEFT's `target_modules` (and exclusions) select `module_name`.

    Args:
        config: the checked `adapter_config.json`.
        module_name: a full module name.
        match: `re.match`, or a `patterns.BoundedMatcher` (the config and
            the name's prefix come from a file).

    Returns None when the config does not say (no `target_modules`, or
    `"all-linear"`, which PEFT resolves against the torch model).
    """
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return None
    excluded = config.get("exclude_modules")
    if excluded:
        if isinstance(excluded, str):
            if match(rf"(?:{excluded})\Z", module_name):  # re.fullmatch
                return False
        elif _in_list(excluded, module_name):
            return False
    for saved in config.get("modules_to_save") or []:
        # PEFT never puts LoRA on a module it saves whole.
        if match(saved_module_regex(saved), module_name):
            return False
    if isinstance(targets, str):
        return match(rf"(?:{targets})\Z", module_name) is not None
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
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
    else:
        if isinstance(layers_pattern, str):
            layers_pattern = [layers_pattern]
        found = None
        for pattern in layers_pattern:
            found = match(layers_pattern_regex(pattern), module_name)
            if found is not None:
                break
    return found is not None and int(found.group("idx")) in indexes


def _in_list(names, module_name):
    return module_name in names or any(module_name.endswith(f".{n}") for n in names)


# The regular expressions PEFT builds from config fields (checked, with these
# same functions, by `peft_config_check.py`).


def saved_module_regex(saved):
    """A `modules_to_save` entry as PEFT matches it against module names."""
    return rf"(^|.*\.){saved}($|\..*)"


def layers_pattern_regex(pattern):
    """A `layers_pattern` entry as PEFT matches it (the layer index follows)."""
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."
