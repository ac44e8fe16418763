"""Reading a PEFT adapter folder: every check `load_peft_adapter` makes.

Each function raises a `ValueError` that names what cannot be loaded and why;
none of them changes the model.
"""

import collections
import json
import math
import os

import keras
import numpy as np

from keras_lora import patterns
from keras_lora.interop import (
    architectures,
    factors,
    peft_config,
    peft_config_check,
    peft_dora,
    safetensors_io,
)
from keras_lora.interop.peft_config import CONFIG_FILE, STATE_PREFIX, WEIGHTS_FILE

_FACTOR_SUFFIXES = {
    ".lora_A.weight": ("linear", "a"),
    ".lora_B.weight": ("linear", "b"),
    ".lora_embedding_A": ("embedding", "a"),
    ".lora_embedding_B": ("embedding", "b"),
}
# PEFT saves the base table of an adapted embedding next to its factors.
_BASE_TABLE_SUFFIX = ".base_layer.weight"


# adapter_config.json is a few kilobytes (a `rank_pattern` for every module of
# a large model stays far below this): the bound keeps a hostile file from
# filling memory before it is parsed.
MAX_CONFIG_BYTES = 16 * 2**20
# The dtypes a LoRA factor or a saved weight may have (read as float32).
_FLOAT_DTYPES = ("float64", "float32", "float16")


def read_config(path):
    """Reads and checks `adapter_config.json`.

    Returns:
        `(config, settings)`: the parsed JSON object and the fields
        `peft_config_check.check` returns.
    """
    file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(file):
        raise ValueError(
            f"`path` must be a PEFT adapter folder with {CONFIG_FILE}. "
            f"Received: path={path!r}"
        )
    with open(file, "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(
            f"'{file}' is larger than {MAX_CONFIG_BYTES} bytes, too large for "
            f"an adapter config. Received: size={os.path.getsize(file)}"
        )
    try:
        config = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as error:
        # ValueError covers JSON and UTF-8 errors; RecursionError deep nesting.
        raise ValueError(f"'{file}' is not valid UTF-8 JSON: {error}") from None
    return config, peft_config_check.check(config, file)


def read_weights(path, model=None):
    """Reads `adapter_model.safetensors` (never a pickled `.bin`) as float32.

    With a `model`: a LoRA factor has at most as many values as the kernel
    it adapts (rank <= min(d_in, d_out)), so an adapter holds at most three
    times the model's parameters (A, B and a saved embedding table); a file
    that declares more is refused before its data is read.
    """
    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        pickled = os.path.exists(os.path.join(path, "adapter_model.bin"))
        raise ValueError(
            f"`path` must hold {WEIGHTS_FILE}"
            + (
                ". It holds adapter_model.bin, a pickle, which keras-lora never "
                "reads: unpickling can run any code the file's author chose. "
                "Re-save the adapter with `save_pretrained(..., "
                "safe_serialization=True)`"
                if pickled
                else ""
            )
            + f". Received: path={path!r}"
        )
    limit = None if model is None else 3 * model.count_params()
    tensors, _ = safetensors_io.read(file, max_values=limit)
    for name, value in tensors.items():
        if value.dtype.name not in _FLOAT_DTYPES:
            raise ValueError(
                f"Tensor '{name}' in '{file}' must hold floating point numbers "
                f"(LoRA factors and weights are). Received: dtype={value.dtype.name}"
            )
    return {k: v.astype("float32") for k, v in tensors.items()}


def group_tensors(tensors, config, required=True):
    """Sorts the tensors by module (`required`: at least one LoRA module).

    Returns:
        `(grouped, saved)`: LoRA modules `{name: {"a", "b", "kind", "base"?,
        "m"? (DoRA's magnitude)}}` and whole modules (`modules_to_save`)
        `{name: {"weight", "bias"?}}`.
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
        if rest is not None and rest.endswith(peft_dora.SUFFIX):
            grouped[rest[: -len(peft_dora.SUFFIX)]]["m"] = value
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
    if required and not grouped:
        raise ValueError(f"{WEIGHTS_FILE} holds no LoRA factor.")
    return grouped, saved


def match_modules(grouped, context, prefixes=()):
    """Finds the common module-name prefix and each module's mapping (with
    `prefixes`, those of the experts' names, which must be the same)."""
    known = context["modules"]
    prefixes, named, unknown = set(prefixes), {}, []
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


def saved_modules_plan(saved, prefix, context):
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


def check_targets(config, prefix, named, context):
    """Every module `target_modules` selects has factors, and only those."""
    # The config and the names' prefix come from the folder: bounded matching.
    match = patterns.BoundedMatcher(CONFIG_FILE)
    for name in context["modules"]:
        targeted = peft_config.is_targeted(config, prefix + name, match)
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


def module_factors(full, parts, layouts, rank):
    """Checks the PEFT factor shapes against the Keras layers'; returns A, B."""
    kind = layouts[0][2]
    # Linear and conv modules both name their factors `lora_A.weight`.
    if parts["kind"] != ("embedding" if kind == "embedding" else "linear"):
        raise ValueError(
            f"Module '{full}' has {parts['kind']} factors but maps onto a KerasHub "
            f"{kind} layer."
        )
    d_out = sum(math.prod(output_shape) for _, output_shape, _ in layouts)
    a_shape, b_shape, _ = factors.peft_shapes(layouts[0], rank, d_out)
    a, b = parts["a"], parts["b"]
    if a.shape != a_shape or b.shape != b_shape:
        raise ValueError(
            f"Module '{full}' must have lora_A of shape {a_shape} and lora_B "
            f"of shape {b_shape} (rank {rank} from `r`/`rank_pattern`, "
            "features from the KerasHub model). Received: lora_A.shape="
            f"{a.shape}, lora_B.shape={b.shape}"
        )
    return a, b


def check_rank_fits(full, rank, layouts):
    for input_shape, output_shape, _ in layouts:
        d_in, d_out = math.prod(input_shape), math.prod(output_shape)
        if rank > min(d_in, d_out):
            raise ValueError(
                f"Module '{full}' has rank {rank}, above min(d_in, d_out) = "
                f"{min(d_in, d_out)} of its KerasHub layer (d_in={d_in}, "
                f"d_out={d_out}): keras-lora's layers hold ranks up to that only. "
                f"Received: r={rank}"
            )


def check_base_table(full, table, layer):
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
