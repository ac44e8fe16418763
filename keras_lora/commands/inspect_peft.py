"""`keras-lora inspect` of a Hugging Face PEFT LoRA adapter folder."""

import os

from keras_lora.commands.inspect_entry import layer_entry
from keras_lora.patterns import BoundedMatcher


def describe(path):
    # The readers `load_peft_adapter` uses: the same checks, the same errors.
    from keras_lora.interop import peft_config, peft_experts, peft_reading

    loaded = peft_reading.read_config(path)
    # The hardened reader (issue 10) returns (config, checked settings); the
    # first one returned the config alone.
    config = loaded[0] if isinstance(loaded, tuple) else loaded
    if not isinstance(config, dict):
        raise ValueError(f"'{path}/{peft_config.CONFIG_FILE}' is not a JSON object.")
    tensors = peft_reading.read_weights(path)
    # PEFT's defaults (LoraConfig) for fields a config leaves out.
    default_alpha = config.get("lora_alpha", 8)
    # The file supplies both the patterns and the names: bounded matching.
    matcher = BoundedMatcher(os.path.join(path, peft_config.CONFIG_FILE))
    # Mixture-of-experts parameters (`target_parameters`): one pair per expert.
    tensors, experts = peft_experts.describe(tensors, config, matcher)
    grouped, saved = peft_reading.group_tensors(tensors, config, not experts)
    layers = []
    for module, parts in sorted(grouped.items()):
        rank = parts["a"].shape[0]
        alpha = peft_config.pattern_value(
            config.get("alpha_pattern") or {}, module, default_alpha, matcher=matcher
        )
        entry = layer_entry(
            module,
            rank,
            alpha,
            config.get("use_rslora", False),
            config.get("lora_dropout"),
            (parts["a"].shape, parts["b"].shape),  # PEFT's (r, in), (out, r)
            use_dora=bool(config.get("use_dora")),
        )
        layers.append(entry)
    for name, rank, alpha, pair in experts:
        shapes = (pair["a"].shape, pair["b"].shape)  # (experts·r, in), (out, r·experts)
        entry = layer_entry(
            name, rank, alpha, config.get("use_rslora", False), 0.0, shapes
        )
        entry["experts"] = pair["a"].shape[0] // rank
        layers.append(entry)
    # Factors and DoRA's magnitudes ("m").
    lora = sum(p[k].size for p in grouped.values() for k in ("a", "b", "m") if k in p)
    lora += sum(pair[k].size for *_, pair in experts for k in pair)
    trained = [
        {"path": module, "parameters": int(sum(v.size for v in params.values()))}
        for module, params in sorted(saved.items())
    ]
    head = sum(t["parameters"] for t in trained)
    files = [peft_config.CONFIG_FILE, peft_config.WEIGHTS_FILE]
    return {
        "path": path,
        "format": f"PEFT {config.get('peft_type', 'LORA')} adapter folder",
        "file_bytes": sum(os.path.getsize(os.path.join(path, f)) for f in files),
        "base_model": config.get("base_model_name_or_path"),
        "task": config.get("task_type"),
        "versions": {"peft": config.get("peft_version")},
        "targets": config.get("target_modules"),
        "target_parameters": config.get("target_parameters"),
        "parameters": {"LoRA": int(lora), "trained layers": head, "total": lora + head},
        "layers": layers,
        "trained_layers": trained,
    }
