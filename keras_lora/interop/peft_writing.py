"""Writing a PEFT adapter folder: fused modules, `adapter_config.json`, files."""

import collections
import json
import math
import os
import shutil
import tempfile

import keras
import numpy as np

from keras_lora import targets as targets_lib
from keras_lora.interop import architectures, factors, safetensors_io
from keras_lora.interop.peft_config import CONFIG_FILE, WEIGHTS_FILE


def fuse(module, adapted):
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


def saved_tensors(model, train_layers, context, module_prefix):
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


def write_config(records, context, module_prefix):
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


def write_folder(path, config, tensors):
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


def _alpha_for(record, use_rslora):
    """The module's alpha under the config's global `use_rslora`."""
    if record["use_rslora"] == use_rslora:
        return record["alpha"]
    root = math.sqrt(record["rank"]) if use_rslora else record["rank"]
    return record["scale"] * root


def _json_number(x):
    return int(x) if float(x).is_integer() else float(x)


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
