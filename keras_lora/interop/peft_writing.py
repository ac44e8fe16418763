"""Writing a PEFT adapter folder: fused modules, `adapter_config.json`, files."""

import collections
import contextlib
import json
import math
import os
import secrets
import shutil

import keras
import numpy as np

from keras_lora import io_utils, lora_init
from keras_lora import targets as targets_lib
from keras_lora.interop import architectures, factors, safetensors_io
from keras_lora.interop.peft_config import CONFIG_FILE, WEIGHTS_FILE


def saved_form(layer):
    """(A, B, rank, alpha) of a LoRA layer as an adapter file holds them.

    A PiSSA/OLoRA layer's kernel is W - s·A0·B0, so its update relative to the
    original base is s·(A·B - A0·B0): rank-2r LoRA with the same scale, as
    `save_adapter` writes it (`lora_init.original_base_factors`).
    """
    if layer.lora_init is None:
        a, b = (keras.ops.convert_to_numpy(v) for v in (layer.lora_a, layer.lora_b))
        return a.astype("float32"), b.astype("float32"), layer.rank, layer.alpha
    a, b = lora_init.original_base_factors(layer)
    alpha_arg = layer.lora_primary_adapter.alpha_arg  # None: alpha = rank
    settings = lora_init.original_base_settings(
        {"rank": layer.rank, "alpha": alpha_arg, "use_rslora": layer.use_rslora}
    )
    alpha = (
        settings["alpha"] if settings["alpha"] is not None else float(2 * layer.rank)
    )
    return a.astype("float32"), b.astype("float32"), 2 * layer.rank, float(alpha)


def fuse(module, adapted):
    """PEFT factors of one module from its adapted Keras layers.

    Returns `(A (r, d_in), B (d_out, r), record)`, where record holds
    `rank`, `scale`, `alpha`, `use_rslora` and `dropout`.
    """
    layouts = [factors.layout(layer) for layer in module.layers]
    saved = {i: saved_form(layer) for i, layer in adapted.items()}
    values = {i: saved[i][:2] for i in adapted}
    peft = {i: factors.to_peft(*values[i], layouts[i][2]) for i in adapted}
    # A conv module's B has trailing 1×1 kernel axes: (d_out, r, 1, ...).
    b_tail = peft[min(adapted)][1].shape[2:]
    sizes = [math.prod(output_shape) for _, output_shape, _ in layouts]
    starts = np.cumsum([0] + sizes)
    first = adapted[min(adapted)]
    dropout = max(layer.dropout for layer in adapted.values())
    first_rank, first_alpha = saved[min(adapted)][2:]
    same = all(
        saved[i][2] == first_rank
        and layer.lora_scale == first.lora_scale
        and np.array_equal(peft[i][0], peft[min(adapted)][0])
        for i, layer in adapted.items()
    )
    if same:
        # One shared A (what loading a fused module gives): rank r, same scale.
        a = peft[min(adapted)][0]
        b = np.zeros((starts[-1], first_rank, *b_tail), "float32")
        for i in adapted:
            b[starts[i] : starts[i + 1]] = peft[i][1]
        record = {
            "rank": first_rank,
            "scale": first.lora_scale,
            "alpha": first_alpha,
            "use_rslora": first.use_rslora,
        }
    else:
        # Stack the factors along the rank: block i of B holds s_i·B_i, so the
        # module's own scale is 1 (alpha = rank).
        ranks = [saved[i][2] for i in sorted(adapted)]
        total = sum(ranks)
        a = np.concatenate([peft[i][0] for i in sorted(adapted)], axis=0)
        b = np.zeros((starts[-1], total, *b_tail), "float32")
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


def unwrapped(layer):
    """A layer, or the layer behind an `AdapterView`."""
    return layer.__dict__.get("_layer", layer)


def layer_id(layer):
    """The id of a layer, or of the layer behind an `AdapterView`."""
    return id(unwrapped(layer))


class AdapterView:
    """One named adapter of a layer, seen as the layer's own LoRA attributes
    (what `fuse` reads)."""

    def __init__(self, layer, adapter):
        self._layer = layer
        self.lora_a, self.lora_b = adapter.a, adapter.b
        self.rank, self.alpha = adapter.rank, adapter.alpha
        self.lora_scale, self.use_rslora = adapter.scale, adapter.use_rslora
        self.dropout = adapter.dropout

    def __getattr__(self, attribute):
        return getattr(self._layer, attribute)


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


def write_config(records, context, module_prefix, parameters=None):
    """`adapter_config.json` of the module `records` and the expert
    `parameters` records (`target_parameters`, see `peft_experts.py`)."""
    parameters = parameters or {}
    every = {**records, **parameters}
    use_rslora = all(r["use_rslora"] for r in every.values())
    alphas = {name: _alpha_for(r, use_rslora) for name, r in every.items()}
    ranks = {name: r["rank"] for name, r in every.items()}
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    # PEFT refuses dropout with `target_parameters` (`peft_experts.py` warns).
    dropouts = collections.Counter(r["dropout"] for r in every.values())
    architecture = context["architecture"]
    return {
        "peft_type": "LORA",
        # A causal LM task written for its transformers task model can load
        # as PeftModelForCausalLM (`generate`); anything else as PeftModel.
        "task_type": "CAUSAL_LM"
        if _is_causal_lm(context["model"]) and module_prefix == architecture.task_prefix
        else None,
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": _json_number(alpha),
        "lora_dropout": 0.0 if parameters else dropouts.most_common(1)[0][0],
        "use_rslora": use_rslora,
        "target_modules": _target_modules(list(records), context, module_prefix),
        "target_parameters": _target_parameters(
            list(parameters), context, module_prefix
        )
        or None,
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


def _is_causal_lm(model):
    """A KerasHub causal LM task (not a classifier: ViT's, BERT's)."""
    from keras_hub.models import CausalLM  # present: the model is KerasHub's

    return isinstance(model, CausalLM)


def write_folder(path, config, tensors):
    """Writes `adapter_config.json` and `adapter_model.safetensors` to `path`.

    Nothing is half written: a new folder is filled beside its final name and
    renamed into place; in an existing folder both files are written in full
    beside their final names before either replaces the old one. Modes are
    those `os.makedirs` and `open` give under the umask; a file that already
    exists keeps its mode, and a symlink has its target replaced, not itself.

    Returns:
        The folder's absolute path, as a string.
    """
    path = os.path.abspath(os.fspath(path))
    real = os.path.realpath(path)
    if os.path.exists(real) and not os.path.isdir(real):
        raise ValueError(
            f"`path` must be a folder (or not exist yet). Received: path={path!r}"
        )
    contents = {
        CONFIG_FILE: lambda file: _write_json(file, config),
        WEIGHTS_FILE: lambda file: safetensors_io.write(file, tensors),
    }
    if os.path.isdir(real):
        # Each file is written in full beside its final name; only when both
        # are does either replace the old one (the stack exits in reverse).
        with contextlib.ExitStack() as stack:
            for name, write in contents.items():
                file = os.path.join(real, name)
                write(stack.enter_context(io_utils.atomic_write(file)))
        return path
    parent = os.path.dirname(real)
    os.makedirs(parent, exist_ok=True)
    temporary = os.path.join(
        parent, f".{os.path.basename(real)}.{secrets.token_hex(6)}.tmp"
    )
    try:
        # `os.mkdir` (not `tempfile.mkdtemp`, which makes it 0700): the folder
        # gets the mode `os.makedirs` would give it under the umask.
        os.mkdir(temporary)
    except OSError as error:
        # Name the requested path, not the hidden temporary one.
        raise type(error)(error.errno, error.strerror, path) from None
    try:
        for name, write in contents.items():
            write(os.path.join(temporary, name))
        os.rename(temporary, real)
    finally:
        if os.path.exists(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
    return path


def _write_json(file, config):
    with open(file, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)


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
    return shortest_suffixes(adapted, every)


def _target_parameters(adapted, context, module_prefix):
    """Short `target_parameters`, by the same rule over the experts'
    `<module>.<parameter>` names."""
    every = [
        f"{module_prefix}{name}.{parameter}"
        for name, module in context["experts"].items()
        for parameter in module.parameters
    ]
    return shortest_suffixes(adapted, every)


def shortest_suffixes(adapted, every):
    """For each name in `adapted`, its shortest dotted suffix that selects
    names of `adapted` only among `every` (a name equal to it or ending in
    `.suffix`); sorted, each once."""
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
