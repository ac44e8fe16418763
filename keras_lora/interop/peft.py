"""`load_peft_adapter` / `save_peft_adapter`: Hugging Face PEFT LoRA <-> KerasHub.

A PEFT LoRA adapter folder holds `adapter_config.json` and
`adapter_model.safetensors`, whose tensors are named
`base_model.model.<module>.lora_A.weight` `(r, in_features)` and
`...lora_B.weight` `(out_features, r)` (embeddings: `lora_embedding_A/B`).
`architectures.py` says which KerasHub layer each module is, `factors.py`
how the factors are laid out; this file checks everything and applies it all
at once, or nothing.
"""

import collections
import json
import math
import os
import shutil
import tempfile

import keras
import numpy as np

from keras_lora import adapted_model, transform
from keras_lora import targets as targets_lib
from keras_lora.interop import architectures, factors, peft_config, safetensors_io

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
STATE_PREFIX = "base_model.model."
_FACTOR_SUFFIXES = {
    ".lora_A.weight": ("linear", "a"),
    ".lora_B.weight": ("linear", "b"),
    ".lora_embedding_A": ("embedding", "a"),
    ".lora_embedding_B": ("embedding", "b"),
}
# PEFT saves the base table of an adapted embedding next to its factors.
_BASE_TABLE_SUFFIX = ".base_layer.weight"


def load_peft_adapter(model, path):
    """Applies a Hugging Face PEFT LoRA adapter to a KerasHub model, in place.

    The model must come from the same transformers architecture and
    checkpoint as the adapter (e.g. `keras_hub.models.Llama3Backbone
    .from_preset("<transformers folder>")`). Each PEFT module becomes LoRA on
    the KerasHub layer(s) its weight maps onto, with PEFT's rank, alpha and
    scale (`r`, `lora_alpha`, `use_rslora`, `rank_pattern`, `alpha_pattern`),
    so the outputs equal those of transformers + peft. A fused module (GPT-2's
    `c_attn`, which holds q, k and v) becomes LoRA on the separate q, k and v
    layers, sharing its A factor: the same update, exactly. Everything else is
    frozen, as with `enable_lora`; `merge_lora`, `save_adapter` and `fit` work
    as usual. Whole modules the adapter saves (`modules_to_save`, e.g. the
    `classifier` of a sequence-classification adapter) are loaded into their
    KerasHub layers, which then train in full (`train_layers`).

    Args:
        model: a built KerasHub backbone or task model (BERT, GPT-2, Llama,
            Mistral, Gemma, Qwen2) without LoRA layers.
        path: a folder with `adapter_config.json` and
            `adapter_model.safetensors`.

    Returns:
        The same model object, adapted.

    Raises:
        ValueError: for anything that cannot be represented exactly (DoRA,
            `lora_bias`, trained biases, `modules_to_save` for a module with no
            KerasHub layer, an unknown module or architecture, shapes that do
            not fit the model); the model is left untouched.

    Example:

    >>> backbone = keras_hub.models.Backbone.from_preset("./llama-hf")
    >>> keras_lora.load_peft_adapter(backbone, "./my-peft-adapter")
    """
    context = _resolve(model)
    if transform.lora_layers(model) or adapted_model.is_adapted(model):
        raise ValueError(
            f"Model '{model.name}' already has LoRA layers; call "
            "`keras_lora.merge_lora(model)` before loading a PEFT adapter."
        )
    path = os.fspath(path)
    config = _read_config(path)
    settings = peft_config.check(config)
    tensors = _read_weights(path)
    grouped, saved = _group_tensors(tensors, config)
    prefix, named = _match_modules(grouped, context)
    _check_targets(config, prefix, named, context)
    unique_path = _path_checker(model)
    trained = _saved_modules_plan(saved, prefix, context)
    plan = {}  # layer path -> (layer, lora config, A, B)
    for name, module in named.items():
        full = prefix + name
        parts = grouped[full]
        rank = peft_config.pattern_value(settings["rank_pattern"], full, settings["r"])
        alpha = peft_config.pattern_value(
            settings["alpha_pattern"], full, settings["lora_alpha"]
        )
        layouts = [factors.layout(layer) for layer in module.layers]
        a, b = _module_factors(full, parts, layouts, rank)
        if "base" in parts:
            _check_base_table(full, parts["base"], module.layers[0])
        if layouts[0][2] == "embedding":
            _check_untied(module.layers[0], context, full)
        _check_rank_fits(full, rank, layouts)
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
        start = 0
        for layer, (input_shape, output_shape, _) in zip(module.layers, layouts):
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
            )

    spec = {
        "version": transform.SPEC_VERSION,
        "targets": "peft",
        "layers": {p: dict(config) for p, (_, config, _, _) in plan.items()},
        "train_layers": [unique_path(layer) for layer, _ in trained],
        "frozen_layers": [
            unique_path(layer)
            for layer in targets_lib.sublayers(model)
            if not layer.trainable and layer.path
        ],
        "frozen_variables": [v.path for v in model.weights if not v.trainable],
    }
    previous = [
        (variable, keras.ops.convert_to_numpy(variable))
        for layer, _ in trained
        for variable in layer.weights
    ]
    transform.apply_spec(model, spec)
    try:
        for layer, _, a, b in plan.values():
            layer.lora_a.assign(a)
            layer.lora_b.assign(b)
        for layer, values in trained:
            for name, value in values.items():
                getattr(layer, name).assign(value)  # cast to its dtype
    except Exception:
        for variable, value in previous:
            variable.assign(value)
        transform.revert(model, merge=False)
        raise
    return model


def save_peft_adapter(model, path, module_prefix=None):
    """Writes a model's LoRA layers as a Hugging Face PEFT adapter folder.

    `peft.PeftModel.from_pretrained(hf_model, path)` then computes what the
    Keras model computes. LoRA on GPT-2's separate q, k and v layers becomes
    one LoRA module on the fused `c_attn`: with the A factor they share after
    `load_peft_adapter`, or otherwise with the factors stacked along the rank
    (rank r_q + r_k + r_v, each block scaled by its layer's scale), which is
    the same update exactly. Layers whose base weights train
    (`enable_lora(..., train_layers=...)`) are written whole, as PEFT's
    `modules_to_save`, if they are task heads (BERT's classifier) or single
    Dense/EinsumDense modules.

    Args:
        model: a KerasHub backbone or task model with LoRA layers (from
            `enable_lora`, `load_peft_adapter` or `load_adapter`).
        path: the folder to write (created; files of the same name in an
            existing folder are replaced). Everything is written to a
            temporary folder beside it first, so a failure leaves nothing
            half written.
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
            or the update cannot be written exactly.

    Example:

    >>> keras_lora.enable_lora(backbone, rank=8)
    >>> backbone.fit(...)
    >>> keras_lora.save_peft_adapter(backbone, "./my-peft-adapter")
    """
    context = _resolve(model)
    layers = transform.lora_layers(model)
    if not layers:
        raise ValueError(
            f"Model '{model.name}' has no LoRA layer to save. Call "
            "`keras_lora.enable_lora(model)` or `load_peft_adapter` first."
        )
    spec = transform.lora_spec(model) or {}
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
    owner = {}
    for module in context["modules"].values():
        for index, layer in enumerate(module.layers):
            owner[id(layer)] = (module, index)
    unmapped = [layer.path for layer in layers if id(layer) not in owner]
    if unmapped:
        mappable = sorted(
            {layer.path for m in context["modules"].values() for layer in m.layers}
        )
        raise ValueError(
            f"LoRA layers {unmapped} have no Hugging Face PEFT module in "
            f"architecture '{context['architecture'].name}': only these KerasHub "
            f"layers map onto PEFT modules: {mappable[:16]}..."
        )

    by_module = collections.defaultdict(dict)
    for layer in layers:
        module, index = owner[id(layer)]
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
        a, b, record = _fuse(module, adapted)
        names = (
            (".lora_embedding_A", ".lora_embedding_B")
            if kind == "embedding"
            else (".lora_A.weight", ".lora_B.weight")
        )
        tensors[STATE_PREFIX + full + names[0]] = a
        tensors[STATE_PREFIX + full + names[1]] = b
        records[full] = record
    saved = _saved_tensors(model, spec.get("train_layers", []), context, module_prefix)
    for name, values in saved.items():
        for parameter, value in values.items():
            tensors[f"{STATE_PREFIX}{name}.{parameter}"] = value
    config = _write_config(records, context, module_prefix)
    config["modules_to_save"] = sorted(saved) or None
    return _write_folder(path, config, tensors)


# Loading.


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
        "is_task": backbone is not model,
    }


def _path_checker(model):
    """`layer -> layer.path`, checked to name that layer only (specs use paths)."""
    counts = collections.Counter(
        layer.path for layer in targets_lib.sublayers(model) if layer.path
    )

    def unique_path(layer):
        if not layer.path or counts[layer.path] != 1:
            raise ValueError(
                f"Layer '{layer.name}' has no unique path in model '{model.name}' "
                f"(path={layer.path!r}); give the layers distinct names."
            )
        return layer.path

    return unique_path


def _read_config(path):
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise ValueError(
            f"`path` must be a PEFT adapter folder with {CONFIG_FILE}. "
            f"Received: path={path!r}"
        )
    with open(file, encoding="utf-8") as f:
        try:
            return json.load(f)
        except ValueError as error:
            raise ValueError(f"'{file}' is not valid JSON: {error}") from None


def _read_weights(path):
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        pickled = os.path.isfile(os.path.join(path, "adapter_model.bin"))
        raise ValueError(
            f"`path` must hold {WEIGHTS_FILE}"
            + (
                " (adapter_model.bin is a pickle that needs torch to read: "
                "re-save it with `save_pretrained(..., safe_serialization=True)`)"
                if pickled
                else ""
            )
            + f". Received: path={path!r}"
        )
    tensors, _ = safetensors_io.read(file)
    return {k: v.astype("float32") for k, v in tensors.items()}


def _group_tensors(tensors, config):
    """Sorts the tensors by module.

    Returns:
        `(grouped, saved)`: LoRA modules `{name: {"a", "b", "kind", "base"?}}`
        and whole modules (`modules_to_save`) `{name: {"weight", "bias"?}}`.
    """
    grouped = collections.defaultdict(dict)
    saved = collections.defaultdict(dict)
    saved_modules = config.get("modules_to_save") or []
    for key, value in tensors.items():
        rest = key[len(STATE_PREFIX) :] if key.startswith(STATE_PREFIX) else None
        found = None
        if rest is not None:
            for suffix, (kind, factor) in _FACTOR_SUFFIXES.items():
                if rest.endswith(suffix):
                    found = rest[: -len(suffix)], kind, factor
        if found is not None:
            name, kind, factor = found
            if grouped[name].setdefault("kind", kind) != kind:
                raise ValueError(f"Module '{name}' mixes linear and embedding factors.")
            grouped[name][factor] = value
            continue
        if rest is not None and rest.endswith(_BASE_TABLE_SUFFIX):
            grouped[rest[: -len(_BASE_TABLE_SUFFIX)]]["base"] = value
            continue
        module, _, parameter = (rest or "").rpartition(".")
        if parameter in ("weight", "bias") and any(
            module.endswith(m) for m in saved_modules
        ):
            # PEFT's `modules_to_save` rule: a module name ending in an entry.
            saved[module][parameter] = value
            continue
        raise ValueError(
            f"Tensor '{key}' is not a LoRA factor this loader knows (expected "
            f"'{STATE_PREFIX}<module>.lora_A.weight' and the like)."
        )
    for name, parts in grouped.items():
        missing = [f for f in ("a", "b") if f not in parts]
        if missing:
            raise ValueError(
                f"Module '{name}' lacks its lora_{missing[0].upper()} factor in "
                f"{WEIGHTS_FILE}."
            )
    if not grouped:
        raise ValueError(f"{WEIGHTS_FILE} holds no LoRA factor.")
    return grouped, saved


def _match_modules(grouped, context):
    """Finds the common module-name prefix and each module's mapping."""
    known = context["modules"]
    prefixes, named, unknown = set(), {}, []
    for full in grouped:
        matches = [n for n in known if full == n or full.endswith("." + n)]
        if not matches:
            unknown.append(full)
            continue
        name = max(matches, key=len)
        prefixes.add(full[: len(full) - len(name)])
        named[name] = known[name]
    if unknown:
        raise ValueError(
            f"PEFT modules {unknown[:8]} have no KerasHub layer LoRA can adapt in "
            f"architecture '{context['architecture'].name}' (mappable modules "
            f"look like {list(known)[:8]})."
        )
    if len(prefixes) != 1:
        raise ValueError(
            f"The adapter's module names do not share one prefix: {sorted(prefixes)}."
        )
    return prefixes.pop(), named


def _saved_modules_plan(saved, prefix, context):
    """Maps `modules_to_save` weights onto whole Keras layers, checked.

    Returns `[(layer, {"kernel": array, "bias": array?})]`.
    """
    heads = architectures.heads(context["model"], context["architecture"])
    plan = []
    for full, parameters in saved.items():
        name = full[len(prefix) :] if full.startswith(prefix) else None
        module = context["modules"].get(name)
        if full in heads:
            layer, conv1d = heads[full], False
        elif module is not None and len(module.layers) == 1:
            layer, conv1d = module.layers[0], context["architecture"].conv1d
        else:
            layer = None
        if layer is None or not isinstance(
            layer, (keras.layers.Dense, keras.layers.EinsumDense)
        ):
            raise ValueError(
                f"The adapter saves the whole module '{full}' (`modules_to_save`), "
                "which maps onto no KerasHub Dense or EinsumDense layer of this "
                f"model. Mappable: {sorted(heads)} and single-layer modules like "
                f"'{prefix}{next(iter(context['modules']))}'."
            )
        weight = parameters.get("weight")
        input_shape, output_shape, _ = factors.layout(layer)
        expected = (math.prod(output_shape), math.prod(input_shape))
        if weight is not None and conv1d:
            weight = weight.T
        if weight is None or weight.shape != expected:
            raise ValueError(
                f"Saved module '{full}' must have a weight of shape {expected}. "
                f"Received: {None if weight is None else weight.shape}"
            )
        values = {"kernel": factors.weight_to_kernel(layer, weight)}
        bias = parameters.get("bias")
        own_bias = getattr(layer, "bias", None)
        if (bias is None) != (own_bias is None) or (
            bias is not None and bias.size != math.prod(own_bias.shape)
        ):
            raise ValueError(
                f"Saved module '{full}' has a bias of shape "
                f"{None if bias is None else bias.shape}, the KerasHub layer "
                f"'{layer.path}' one of shape "
                f"{None if own_bias is None else tuple(own_bias.shape)}."
            )
        if bias is not None:
            values["bias"] = np.reshape(bias, tuple(own_bias.shape))
        plan.append((layer, values))
    return plan


def _check_targets(config, prefix, named, context):
    """Every module `target_modules` selects has factors, and only those."""
    for name in context["modules"]:
        targeted = peft_config.is_targeted(config, prefix + name)
        if targeted is None:
            return
        if targeted and name not in named:
            raise ValueError(
                f"`target_modules` selects module '{prefix + name}', but "
                f"{WEIGHTS_FILE} has no factors for it (an adapter for another "
                f"model?). Received: target_modules={config['target_modules']!r}"
            )
        if not targeted and name in named:
            raise ValueError(
                f"{WEIGHTS_FILE} has factors for module '{prefix + name}', which "
                "`target_modules` does not select. Received: "
                f"target_modules={config['target_modules']!r}"
            )


def _module_factors(full, parts, layouts, rank):
    """Checks the PEFT factor shapes against the Keras layers'; returns A, B."""
    kind = layouts[0][2]
    if parts["kind"] != kind:
        raise ValueError(
            f"Module '{full}' has {parts['kind']} factors but maps onto a KerasHub "
            f"{kind} layer."
        )
    d_in = math.prod(layouts[0][0])
    d_out = sum(math.prod(output_shape) for _, output_shape, _ in layouts)
    a, b = parts["a"], parts["b"]
    if a.shape != (rank, d_in) or b.shape != (d_out, rank):
        raise ValueError(
            f"Module '{full}' must have lora_A of shape {(rank, d_in)} and lora_B "
            f"of shape {(d_out, rank)} (rank {rank} from `r`/`rank_pattern`, "
            "features from the KerasHub model). Received: lora_A.shape="
            f"{a.shape}, lora_B.shape={b.shape}"
        )
    return a, b


def _check_rank_fits(full, rank, layouts):
    for input_shape, output_shape, _ in layouts:
        d_in, d_out = math.prod(input_shape), math.prod(output_shape)
        if rank > min(d_in, d_out):
            raise ValueError(
                f"Module '{full}' has rank {rank}, above min(d_in, d_out) = "
                f"{min(d_in, d_out)} of its KerasHub layer (d_in={d_in}, "
                f"d_out={d_out}): keras-lora's layers hold ranks up to that only. "
                f"Received: r={rank}"
            )


def _check_base_table(full, table, layer):
    """PEFT saves an adapted embedding's table; it must be the model's own."""
    own = keras.ops.convert_to_numpy(layer.embeddings).astype("float32")
    if table.shape == own.shape:
        # Rounded like the converter rounded it (bf16/fp16 models); a loose
        # tolerance still tells a retrained table from the same one.
        table = keras.ops.cast(table, layer.embeddings.dtype)
        table = keras.ops.convert_to_numpy(table).astype("float32")
    if table.shape != own.shape or not np.allclose(table, own, rtol=1e-3, atol=1e-3):
        raise ValueError(
            f"The adapter carries its own embedding table for '{full}' (shape "
            f"{table.shape}), which differs from the model's (shape {own.shape}): "
            "a resized or retrained vocabulary cannot be loaded as LoRA."
        )


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


# Saving.


def _fuse(module, adapted):
    """PEFT factors of one module from its adapted Keras layers.

    Returns `(A (r, d_in), B (d_out, r), record)`, where record holds
    `rank`, `scale`, `alpha`, `use_rslora` and `dropout`.
    """
    layouts = [factors.layout(layer) for layer in module.layers]
    values = {
        i: [
            keras.ops.convert_to_numpy(v).astype("float32")
            for v in (layer.lora_a, layer.lora_b)
        ]
        for i, layer in adapted.items()
    }
    peft = {i: factors.to_peft(*values[i]) for i in adapted}
    sizes = [math.prod(output_shape) for _, output_shape, _ in layouts]
    starts = np.cumsum([0] + sizes)
    first = adapted[min(adapted)]
    dropout = max(layer.dropout for layer in adapted.values())
    same = all(
        layer.rank == first.rank
        and layer.lora_scale == first.lora_scale
        and np.array_equal(peft[i][0], peft[min(adapted)][0])
        for i, layer in adapted.items()
    )
    if same:
        # One shared A (what loading a fused module gives): rank r, same scale.
        a = peft[min(adapted)][0]
        b = np.zeros((starts[-1], first.rank), "float32")
        for i in adapted:
            b[starts[i] : starts[i + 1]] = peft[i][1]
        record = {
            "rank": first.rank,
            "scale": first.lora_scale,
            "alpha": first.alpha,
            "use_rslora": first.use_rslora,
        }
    else:
        # Stack the factors along the rank: block i of B holds s_i·B_i, so the
        # module's own scale is 1 (alpha = rank).
        ranks = [adapted[i].rank for i in sorted(adapted)]
        total = sum(ranks)
        a = np.concatenate([peft[i][0] for i in sorted(adapted)], axis=0)
        b = np.zeros((starts[-1], total), "float32")
        column = 0
        for i, rank in zip(sorted(adapted), ranks):
            block = peft[i][1] * np.float32(adapted[i].lora_scale)
            b[starts[i] : starts[i + 1], column : column + rank] = block
            column += rank
        record = {
            "rank": total,
            "scale": 1.0,
            "alpha": float(total),
            "use_rslora": False,
        }
    record["dropout"] = dropout
    return np.ascontiguousarray(a), np.ascontiguousarray(b), record


def _saved_tensors(model, train_layers, context, module_prefix):
    """`modules_to_save` tensors for the layers whose base weights train."""
    if not train_layers:
        return {}
    by_path = {layer.path: layer for layer in targets_lib.sublayers(model)}
    names = {
        id(layer): (name, False)
        for name, layer in architectures.heads(model, context["architecture"]).items()
    }
    for module in context["modules"].values():
        if len(module.layers) == 1:
            names.setdefault(
                id(module.layers[0]),
                (module_prefix + module.name, context["architecture"].conv1d),
            )
    saved = {}
    for path in train_layers:
        layer = by_path.get(path)
        if id(layer) not in names or not isinstance(
            layer, (keras.layers.Dense, keras.layers.EinsumDense)
        ):
            raise ValueError(
                f"Layer '{path}' trains its base weights (`train_layers`), but "
                "maps onto no transformers module PEFT can save whole "
                "(`modules_to_save`): only task heads and single Dense/EinsumDense "
                "modules can. Enable LoRA without it to save a PEFT adapter."
            )
        name, conv1d = names[id(layer)]
        kernel = keras.ops.convert_to_numpy(layer.kernel).astype("float32")
        weight = factors.kernel_to_weight(layer, kernel)
        values = {"weight": np.ascontiguousarray(weight.T if conv1d else weight)}
        if getattr(layer, "bias", None) is not None:
            bias = keras.ops.convert_to_numpy(layer.bias).astype("float32")
            values["bias"] = bias.reshape(-1)
        saved[name] = values
    return saved


def _alpha_for(record, use_rslora):
    """The module's alpha under the config's global `use_rslora`."""
    if record["use_rslora"] == use_rslora:
        return record["alpha"]
    root = math.sqrt(record["rank"]) if use_rslora else record["rank"]
    return record["scale"] * root


def _json_number(x):
    return int(x) if float(x).is_integer() else float(x)


def _write_config(records, context, module_prefix):
    use_rslora = all(r["use_rslora"] for r in records.values())
    alphas = {name: _alpha_for(r, use_rslora) for name, r in records.items()}
    ranks = {name: r["rank"] for name, r in records.items()}
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    dropouts = collections.Counter(r["dropout"] for r in records.values())
    architecture = context["architecture"]
    return {
        "peft_type": "LORA",
        # A causal LM task written for its transformers task model can load
        # as PeftModelForCausalLM (`generate`); anything else as PeftModel.
        "task_type": "CAUSAL_LM"
        if context["is_task"]
        and architecture.name != "bert"
        and module_prefix == architecture.task_prefix
        else None,
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": _json_number(alpha),
        "lora_dropout": dropouts.most_common(1)[0][0],
        "use_rslora": use_rslora,
        "target_modules": _target_modules(list(records), context, module_prefix),
        "rank_pattern": {n: r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {n: _json_number(a) for n, a in alphas.items() if a != alpha},
        "bias": "none",
        "fan_in_fan_out": architecture.name == "gpt2",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "use_dora": False,
        "lora_bias": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }


def _target_modules(adapted, context, module_prefix):
    """Short `target_modules`: the shortest name suffix that selects only
    adapted modules (PEFT selects a module if its name ends in `.suffix`)."""
    every = [module_prefix + n for n in context["modules"]]
    every += [module_prefix + n for n in context["architecture"].unmapped]
    adapted_set = set(adapted)
    chosen = []
    for name in adapted:
        components = name.split(".")
        for length in range(1, len(components) + 1):
            suffix = ".".join(components[-length:])
            selected = {m for m in every if m == suffix or m.endswith("." + suffix)}
            if selected <= adapted_set:
                break
        if suffix not in chosen:
            chosen.append(suffix)
    return sorted(chosen)


def _write_folder(path, config, tensors):
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"`path` must be a folder (or not exist yet). Received: path={path!r}"
        )
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    try:
        with open(os.path.join(temporary, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        safetensors_io.write(os.path.join(temporary, WEIGHTS_FILE), tensors)
        if not os.path.exists(path):
            os.rename(temporary, path)
        else:
            # Each replace is atomic; both files are complete before either moves.
            for name in (WEIGHTS_FILE, CONFIG_FILE):
                os.replace(os.path.join(temporary, name), os.path.join(path, name))
    finally:
        if os.path.exists(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
    return path
