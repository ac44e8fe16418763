"""`load_peft_adapter` / `save_peft_adapter`: Hugging Face PEFT LoRA <-> KerasHub.

A PEFT LoRA adapter folder holds `adapter_config.json` and
`adapter_model.safetensors`, whose tensors are named
`base_model.model.<module>.lora_A.weight` `(r, in_features)` and
`...lora_B.weight` `(out_features, r)` (embeddings: `lora_embedding_A/B`;
convolutions: conv weights, see `factors.py`; DoRA adds
`...lora_magnitude_vector`, see `peft_dora.py`).
`architectures.py` says which KerasHub layer each module is, `factors.py`
how the factors are laid out, `peft_reading.py` checks an adapter before
anything changes and `peft_writing.py` writes one; this file applies it all at
once, or nothing.
"""

import collections
import math
import os
import warnings

import keras

from keras_lora import (
    adapted_model,
    atomic,
    named_adapters,
    patterns,
    transform,
)
from keras_lora.interop import (
    architectures,
    factors,
    peft_config,
    peft_dora,
    peft_experts,
    peft_reading,
    peft_writing,
)
from keras_lora.layers.adapter_set import check_adapter_name


def load_peft_adapter(model, path, name=None):
    """Applies a Hugging Face PEFT LoRA adapter to a KerasHub model, in place.

    The model must come from the same transformers architecture and
    checkpoint as the adapter (e.g. `keras_hub.models.Llama3Backbone
    .from_preset("<transformers folder>")`). Each PEFT module becomes LoRA on
    the KerasHub layer(s) its weight maps onto, with PEFT's rank, alpha and
    scale (`r`, `lora_alpha`, `use_rslora`, `rank_pattern`, `alpha_pattern`),
    so the outputs equal those of transformers + peft. A DoRA adapter
    (`use_dora: true`) gives DoRA layers (`use_dora=True` in the spec) with
    PEFT's magnitudes as `layer.lora_magnitude`; a conv module (ViT's patch
    embedding) LoRA on the KerasHub `Conv2D`. A fused module (GPT-2's
    `c_attn`, which holds q, k and v) becomes LoRA on the separate q, k and v
    layers, sharing its A factor: the same update, exactly. Everything else is
    frozen, as with `enable_lora`; `merge_lora`, `save_adapter` and `fit` work
    as usual. Whole modules the adapter saves (`modules_to_save`, e.g. the
    `classifier` of a sequence-classification adapter) are loaded into their
    KerasHub layers, which then train in full (`train_layers`).

    Args:
        model: a built KerasHub backbone or task model (BERT, RoBERTa,
            GPT-2, Llama, Mistral, Gemma, Gemma 2, Qwen2, Qwen3, ViT; Mixtral,
            Qwen-MoE, Qwen3-MoE and GPT-OSS with PEFT's `target_parameters`
            on their experts, see `peft_experts.py`; `architectures.py`)
            without LoRA layers.
        path: a folder with `adapter_config.json` and
            `adapter_model.safetensors`.
        name: None, or a name to load the adapter under: onto a model with
            named adapters it is added beside them, inactive (activate it
            with `keras_lora.set_adapter`).

    Returns:
        The same model object, adapted.

    Raises:
        ValueError: for anything that cannot be represented exactly (DoRA
            on an embedding, DoRA beside other named adapters, `lora_bias`,
            trained biases, `modules_to_save` for a module with no
            KerasHub layer, an unknown module or architecture, shapes that do
            not fit the model); the model is left untouched.

    Example:

    >>> backbone = keras_hub.models.Backbone.from_preset("./llama-hf")
    >>> keras_lora.load_peft_adapter(backbone, "./my-peft-adapter")
    """
    context = _resolve(model)
    adapter_name = name  # `name` names modules below
    if name is not None:
        check_adapter_name(name)
        if name in named_adapters.list_adapters(model):
            raise ValueError(
                f"Model '{model.name}' already has an adapter named {name!r}."
            )
    beside = name is not None and bool(named_adapters.list_adapters(model))
    if not beside and (transform.lora_layers(model) or adapted_model.is_adapted(model)):
        raise ValueError(
            f"Model '{model.name}' already has LoRA layers; call "
            "`keras_lora.merge_lora(model)` before loading a PEFT adapter."
        )
    path = _check_path(path)
    config, settings = peft_reading.read_config(path)
    tensors = peft_reading.read_weights(path, model)
    tensors, experts = peft_experts.split_tensors(tensors, context)
    grouped, saved = peft_reading.group_tensors(tensors, config, not experts)
    prefixes = peft_experts.prefixes(experts, context)
    prefix, named = peft_reading.match_modules(grouped, context, prefixes)
    peft_reading.check_targets(config, prefix, named, context)
    unique_path = peft_experts.path_checker(model)
    trained = peft_reading.saved_modules_plan(saved, prefix, context)
    plan = {}  # layer path -> (layer, lora config, A, B)
    # The folder supplies both the patterns and the names: bounded matching.
    matcher = patterns.BoundedMatcher(os.path.join(path, peft_config.CONFIG_FILE))
    for name, module in named.items():
        full = prefix + name
        parts = grouped[full]
        rank = peft_config.pattern_value(
            settings["rank_pattern"], full, settings["r"], matcher=matcher
        )
        alpha = peft_config.pattern_value(
            settings["alpha_pattern"], full, settings["lora_alpha"], matcher=matcher
        )
        layouts = [factors.layout(layer) for layer in module.layers]
        a, b = peft_reading.module_factors(full, parts, layouts, rank)
        magnitudes = peft_dora.read_module(full, parts, layouts, settings["use_dora"])
        if magnitudes is not None and beside:
            raise ValueError(
                f"The adapter uses DoRA, which cannot go beside model "
                f"'{model.name}''s other named adapters (its update is not "
                f"additive). Load it onto a fresh base. Received: name={adapter_name!r}"
            )
        if "base" in parts:
            peft_reading.check_base_table(full, parts["base"], module.layers[0])
        if layouts[0][2] == "embedding":
            _check_untied(module.layers[0], context, full)
        peft_reading.check_rank_fits(full, rank, layouts)
        lora_config = {
            "rank": int(rank),
            "alpha": float(alpha),
            "dropout": settings["lora_dropout"],
            "use_rslora": settings["use_rslora"],
            # The factors are assigned right after; zeros skip random draws
            # (on JAX each new shape would compile its own initializer).
            "a_initializer": "zeros",
            "b_initializer": "zeros",
        }
        if magnitudes is not None:
            lora_config["use_dora"] = True
        start = 0
        for index, (layer, (input_shape, output_shape, _)) in enumerate(
            zip(module.layers, layouts)
        ):
            stop = start + math.prod(output_shape)
            layer_a, layer_b = factors.to_keras(
                a, b[start:stop], input_shape, output_shape
            )
            start = stop
            plan[unique_path(layer)] = (
                layer,
                lora_config,
                layer_a,
                layer_b,
                None if magnitudes is None else magnitudes[index],
            )
    plan.update(
        peft_experts.load_plan(
            experts, prefix, config, settings, matcher, context, unique_path
        )
    )

    spec = {
        "version": transform.SPEC_VERSION,
        "targets": "peft",
        "layers": {p: dict(entry[1]) for p, entry in plan.items()},
        "train_layers": [unique_path(layer) for layer, _ in trained],
    }
    written = [v for layer, _ in trained for v in layer.weights]
    with atomic.all_or_nothing(model, written):  # an interrupt too
        if beside:
            _load_beside(model, adapter_name, spec, plan, trained)
            return model
        transform.apply_spec(model, spec)
        for target, _, a, b, magnitude in plan.values():
            layer = peft_experts.lora_layer(target)  # a raw weight's: new
            layer.lora_a.assign(a)
            layer.lora_b.assign(b)
            if magnitude is not None:
                layer.lora_magnitude.assign(magnitude)
        for layer, values in trained:
            for attribute, value in values.items():
                getattr(layer, attribute).assign(value)  # cast to its dtype
        if adapter_name is not None:
            named_adapters.rename_first(model, adapter_name)
    return model


def _load_beside(model, name, spec, plan, trained):
    """Adds the planned adapter as `name` beside the model's other adapters."""
    named_adapters.add_spec(model, name, spec)
    for target, _, a, b, _ in plan.values():
        adapter = peft_experts.lora_layer(target).lora_adapter(name)
        adapter.a.assign(a)
        adapter.b.assign(b)
    stored = model._keras_lora_heads["stored"].setdefault(name, {})
    for layer, values in trained:
        for attribute, value in values.items():
            variable = getattr(layer, attribute)
            stored[variable.path] = keras.ops.convert_to_numpy(
                keras.ops.cast(value, variable.dtype)
            )


def save_peft_adapter(model, path, module_prefix=None, name=None):
    """Writes a model's LoRA layers as a Hugging Face PEFT adapter folder.

    `peft.PeftModel.from_pretrained(hf_model, path)` then computes what the
    Keras model computes. LoRA on GPT-2's separate q, k and v layers becomes
    one LoRA module on the fused `c_attn`: with the A factor they share after
    `load_peft_adapter`, or otherwise with the factors stacked along the rank
    (rank r_q + r_k + r_v, each block scaled by its layer's scale), which is
    the same update exactly. DoRA layers (all of them, or none: PEFT's
    `use_dora` is one flag) write their magnitudes; a layer of a fused module
    without LoRA gets its rows' ‖W‖ there, which leaves them unchanged. Conv
    layers (ViT's patch embedding) write PEFT's conv factors. Layers whose
    base weights train
    (`enable_lora(..., train_layers=...)`) are written whole, as PEFT's
    `modules_to_save`, if they are task heads (BERT's classifier) or single
    Dense/EinsumDense modules.

    Args:
        model: a KerasHub backbone or task model with LoRA layers (from
            `enable_lora`, `load_peft_adapter` or `load_adapter`).
        path: the folder to write (created with the mode `os.makedirs`
            gives; in an existing folder, files of the same name are
            replaced, keeping their modes, through symlinks). Both files are
            written in full beside their final names first, so a failure
            leaves nothing half written.
        module_prefix: the prefix of module names in the transformers model
            the adapter is for. None: the base model (`LlamaModel`, no prefix)
            for a backbone, the task model (`LlamaForCausalLM`: `"model."`)
            for a task model. Pass e.g. `"model."` to write an adapter for
            `LlamaForCausalLM` from a backbone.

    Returns:
        The folder path, as a string.

    Raises:
        ValueError: if a LoRA layer or a trained layer has no PEFT module
            (a position embedding, a head with no transformers counterpart),
            or the update cannot be written exactly (DoRA on some LoRA
            layers only).

    Example:

    >>> keras_lora.enable_lora(backbone, rank=8)
    >>> backbone.fit(...)
    >>> keras_lora.save_peft_adapter(backbone, "./my-peft-adapter")
    """
    path = _check_path(path)
    context = _resolve(model)
    layers = transform.lora_layers(model)
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no LoRA layer to save. Call "
            "`keras_lora.enable_lora(model)` or `load_peft_adapter` first."
        )
    spec = transform.lora_spec(model) or {}
    if named_adapters.list_adapters(model):
        name, spec = named_adapters.adapter_spec(model, name)
        owners = model._keras_lora_heads["owner"]
        if any(owners.get(p) != name for p in spec["train_layers"]):
            raise ValueError(
                f"Adapter {name!r} trains heads {spec['train_layers']} and is not "
                f"active: `keras_lora.set_adapter(model, {name!r})` first."
            )
        layers = [
            peft_writing.AdapterView(layer, layer.lora_adapter(name))
            for layer in layers
            if name in layer.lora_adapter_names
        ]
    elif name is not None:
        raise ValueError(
            f"Model '{model.name}' has no named adapters. Received: name={name!r}"
        )
    if module_prefix is None:
        module_prefix = (
            context["architecture"].task_prefix if context["is_task"] else ""
        )
    if not isinstance(module_prefix, str) or (
        module_prefix and not module_prefix.endswith(".")
    ):
        raise ValueError(
            "`module_prefix` must be None, '' or a module name ending in '.'. "
            f"Received: module_prefix={module_prefix!r}"
        )
    layers, experts = peft_experts.split_layers(layers)
    owner = {}
    for module in context["modules"].values():
        for index, layer in enumerate(module.layers):
            owner[id(layer)] = (module, index)
    unmapped = [
        layer.path for layer in layers if peft_writing.layer_id(layer) not in owner
    ]
    if unmapped:
        mappable = sorted(
            {layer.path for m in context["modules"].values() for layer in m.layers}
        )
        raise ValueError(
            f"LoRA layers {unmapped} have no Hugging Face PEFT module in "
            f"architecture '{context['architecture'].name}': only these KerasHub "
            f"layers map onto PEFT modules: {mappable[:16]}..."
        )

    use_dora = peft_dora.check_uniform(layers)
    residual = [layer.path for layer in layers if layer.lora_init is not None]
    if residual:
        warnings.warn(
            f"save_peft_adapter: {len(residual)} layer(s) started from PiSSA/OLoRA "
            f"(e.g. '{residual[0]}'); the adapter is written for the original "
            "base as plain LoRA of twice the rank (A' = [A, A0], B' = [B; -B0], "
            "same scale), as PEFT's `path_initial_model_for_weight_conversion` "
            "does. Load it onto the original base.",
            stacklevel=2,
        )
    by_module = collections.defaultdict(dict)
    for layer in layers:
        module, index = owner[peft_writing.layer_id(layer)]
        by_module[module.name][index] = layer
    records = {}
    tensors = {}
    for module in context["modules"].values():
        adapted = by_module.get(module.name)
        if not adapted:
            continue
        full = module_prefix + module.name
        kind = factors.layout(module.layers[0])[2]
        if kind == "embedding":
            _check_untied(module.layers[0], context, full)
        a, b, record = peft_writing.fuse(module, adapted)
        names = (
            (".lora_embedding_A", ".lora_embedding_B")
            if kind == "embedding"
            else (".lora_A.weight", ".lora_B.weight")
        )
        tensors[peft_config.STATE_PREFIX + full + names[0]] = a
        tensors[peft_config.STATE_PREFIX + full + names[1]] = b
        if use_dora:
            magnitude = peft_dora.write_module(module, adapted)
            tensors[peft_config.STATE_PREFIX + full + peft_dora.SUFFIX] = magnitude
        records[full] = record
    saved = peft_writing.saved_tensors(
        model, spec.get("train_layers", []), context, module_prefix
    )
    for name, values in saved.items():
        for parameter, value in values.items():
            tensors[f"{peft_config.STATE_PREFIX}{name}.{parameter}"] = value
    expert_tensors, parameters = peft_experts.save_tensors(
        experts, context, module_prefix, use_dora
    )
    tensors.update(expert_tensors)
    config = peft_writing.write_config(records, context, module_prefix, parameters)
    config["modules_to_save"] = sorted(saved) or None
    config["use_dora"] = use_dora
    return peft_writing.write_folder(path, config, tensors)


def _check_path(path):
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(
            f"`path` must be a folder path (a str or os.PathLike). Received: "
            f"path={path!r}"
        )
    return os.fspath(path)


def _resolve(model):
    """Finds the KerasHub backbone of `model` and its architecture's modules."""
    if not isinstance(model, keras.layers.Layer) or not model.built:
        raise ValueError(
            f"`model` must be a built Keras model. Received: model={model!r}"
        )
    try:
        from keras_hub.models import Backbone
    except ImportError:
        Backbone = None
    backbone = None
    if Backbone is not None:
        if isinstance(model, Backbone):
            backbone = model
        elif isinstance(getattr(model, "backbone", None), Backbone):
            backbone = model.backbone
    if backbone is None:
        raise ValueError(
            "PEFT adapters map onto KerasHub backbones and task models only. "
            f"Received: model={model.name!r} of type {type(model).__name__}"
        )
    architecture = architectures.find_architecture(backbone)
    if architecture is None:
        raise ValueError(
            f"No PEFT module mapping for backbone {type(backbone).__name__}. "
            f"Supported architectures: {architectures.supported_names()}."
        )
    return {
        "model": model,
        "backbone": backbone,
        "architecture": architecture,
        "modules": architectures.modules(backbone, architecture),
        "experts": architectures.expert_modules(backbone, architecture),
        "is_task": backbone is not model,
    }


def _uses_reverse_projection(model):
    """Whether a task computes logits with its token embedding's transpose."""
    import keras_hub

    models = keras_hub.models
    return isinstance(model, (models.CausalLM, models.Seq2SeqLM, models.MaskedLM))


def _check_untied(layer, context, full):
    """PEFT's embedding LoRA leaves a tied output projection untouched; ours not."""
    if (
        context["is_task"]
        and getattr(layer, "tie_weights", False)
        and _uses_reverse_projection(context["model"])
    ):
        raise ValueError(
            f"LoRA on the embedding '{full}' of a task model with tied input "
            "and output embeddings cannot be matched exactly: PEFT updates only "
            "the lookup, keras-lora the output projection as well. Use the "
            "backbone (`model.backbone`) instead."
        )
