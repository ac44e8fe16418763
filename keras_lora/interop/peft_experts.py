"""PEFT LoRA on mixture-of-experts parameters (`target_parameters`) <-> keras-lora.

transformers 5 keeps a block's experts as raw parameters of one module
(`mlp.experts.gate_up_proj` `(E, 2I, H)` and `down_proj` `(E, H, I)` for
Mixtral, Qwen-MoE and Qwen3-MoE; GPT-OSS stores them `(E, H, 2I)` and `(E, I, H)`,
transposed). PEFT adapts them with `LoraConfig(target_parameters=[...])`
through `ParamWrapper` (peft 0.21, `tuners/lora/layer.py`), with one rank-r
pair per expert, kept in two `nn.Linear` weights:

- `lora_A.weight` `(E·r, d_in)`: rows `e·r .. e·r+r-1` are expert e's A_e;
- `lora_B.weight` `(d_out, r·E)`: column `k·E + e` is column k of expert e's
  B_e (the rank axis first, the experts second, unlike A);
- ΔW_e = s·B_e·A_e `(d_out, d_in)`, s = alpha/r (rsLoRA: alpha/√r), d_in and
  d_out the features the expert's product reads and writes, whichever way
  the parameter is stored.

Several parameters of one module nest one wrapper in another, so their
tensors are named `<module>.lora_A.weight` (the parameter defined last in
the module), `<module>.base_layer.lora_A.weight` (the one before), and so on.

keras-lora's `LoRAExpertEinsum` holds A `(E, d_in, r)` and B `(E, r, d_out)`,
ΔW_e = s·A[e]·B[e]: A[e] = A_eᵀ and B[e] = B_eᵀ, exactly. A parameter that
KerasHub keeps as several weights (Mixtral's gate_up_proj: its bank's gate
and up weights, the converter's w1 and w3) maps onto several LoRA layers
that share A, each taking its rows of B_e, as GPT-2's fused `c_attn` does
(`peft.py`); saving stacks differing factors along the rank.
"""

import warnings

import keras
import numpy as np

from keras_lora import model_paths, raw_weights
from keras_lora.interop import architectures, peft_config, peft_reading, peft_writing
from keras_lora.interop.peft_config import STATE_PREFIX, WEIGHTS_FILE
from keras_lora.layers import expert_bank
from keras_lora.layers.expert_einsum import LoRAExpertEinsum

_FACTORS = {".lora_A.weight": "a", ".lora_B.weight": "b"}
_NESTED = ".base_layer"


def split_tensors(tensors, context):
    """Takes the experts' factors out of an adapter's tensors.

    Returns:
        `(other tensors, {full module name: {nesting depth: {"a", "b"}}})`.
    """
    names = context["experts"]
    rest, found = {}, {}
    for key, value in tensors.items():
        module, factor = _parse(key)
        depth = 0
        while module is not None and module.endswith(_NESTED):
            module, depth = module[: -len(_NESTED)], depth + 1
        if module is None or not any(_ends_with(module, n) for n in names):
            rest[key] = value
            continue
        found.setdefault(module, {}).setdefault(depth, {})[factor] = value
    return rest, found


def prefixes(found, context):
    """The module-name prefixes of the experts' factors."""
    out = set()
    for full in found:
        name = max((n for n in context["experts"] if _ends_with(full, n)), key=len)
        out.add(full[: len(full) - len(name)])
    return out


def load_plan(found, prefix, config, settings, matcher, context, unique_path):
    """`{path: (raw weight or LoRA layer, lora config, A, B, None)}` of the
    experts' factors, checked against the model and `target_parameters`.

    Args:
        found, prefix: from `split_tensors` and `peft_reading.match_modules`.
        config, settings: the adapter config and its checked fields.
        matcher: a `patterns.BoundedMatcher` for the config's patterns.
        context: the model and its mapping, as `load_peft_adapter` found them
            (`"model"`, `"architecture"`, `"experts"`).
        unique_path: `path_checker(model)`.
    """
    if found and (settings["lora_dropout"] or settings["use_dora"]):
        raise ValueError(
            "PEFT's `target_parameters` LoRA (experts) has no dropout and no DoRA, "
            "so this adapter cannot come from PEFT. Received: lora_dropout="
            f"{settings['lora_dropout']}, use_dora={settings['use_dora']}"
        )
    known = [
        f"{prefix}{name}.{parameter}"
        for name, module in context["experts"].items()
        for parameter in module.parameters
    ]
    for entry in config.get("target_parameters") or []:
        if not any(_ends_with(key, entry) for key in known):
            raise ValueError(
                f"`target_parameters` entry {entry!r} selects no expert parameter "
                "keras-lora maps onto a KerasHub expert bank (architecture "
                f"'{context['architecture'].name}' maps {known[:4]}...). Received: "
                f"target_parameters={config['target_parameters']!r}"
            )
    targets = _weights_by_key(context["model"], context["experts"])
    plan = {}
    for name, module in context["experts"].items():
        full = prefix + name
        selected = [p for p in module.parameters if _selected(config, f"{full}.{p}")]
        pairs = _pairs(full, selected, found.get(full, {}), config)
        for parameter, pair in pairs.items():
            plan.update(
                _parameter_plan(
                    f"{full}.{parameter}",
                    pair,
                    [
                        targets[(id(module.bank), a)]
                        for a in module.parameters[parameter]
                    ],
                    settings,
                    matcher,
                    unique_path,
                )
            )
    return plan


def _pairs(full, selected, parts, config):
    """{parameter: its factors} of one module, by PEFT's nesting: the
    parameter defined last in the module is outermost (no `base_layer.`)."""
    if sorted(parts) != list(range(len(selected))):
        raise ValueError(
            f"`target_parameters` selects {selected} of module '{full}', so "
            f"{WEIGHTS_FILE} must hold {len(selected)} pair(s) of factors for "
            f"it (nested `base_layer.` 0..{len(selected) - 1} deep). Received: "
            f"depths {sorted(parts)}; target_parameters="
            f"{config.get('target_parameters')!r}"
        )
    return {p: parts[len(selected) - 1 - i] for i, p in enumerate(selected)}


def describe(tensors, config, matcher):
    """The experts' factors of an adapter as `keras-lora inspect` shows them,
    without a model: parameters in the order transformers 5 defines them.

    Returns:
        `(other tensors, [(parameter name, rank, alpha, {"a", "b"})])`.
    """
    orders = {}
    for architecture in architectures.ARCHITECTURES:
        for name, (_, parameters) in architecture.experts.items():
            orders.setdefault(name, list(parameters))
    rest, found = split_tensors(tensors, {"experts": orders})
    rows = []
    for module, parts in sorted(found.items()):
        order = orders[max((n for n in orders if _ends_with(module, n)), key=len)]
        selected = [p for p in order if _selected(config, f"{module}.{p}")]
        for parameter, pair in _pairs(module, selected, parts, config).items():
            full = f"{module}.{parameter}"
            rank = peft_config.pattern_value(
                config.get("rank_pattern"), full, config.get("r", 8), matcher=matcher
            )
            alpha = peft_config.pattern_value(
                config.get("alpha_pattern"),
                full,
                config.get("lora_alpha", 8),
                matcher=matcher,
            )
            rows.append((full, rank, alpha, pair))
    return rest, rows


def _parameter_plan(full, parts, weights, settings, matcher, unique_path):
    rank = peft_config.pattern_value(
        settings["rank_pattern"], full, settings["r"], matcher=matcher
    )
    alpha = peft_config.pattern_value(
        settings["alpha_pattern"], full, settings["lora_alpha"], matcher=matcher
    )
    shapes = [tuple(_variable(w).shape) for w in weights]
    experts, d_in = shapes[0][:2]
    d_out = sum(shape[2] for shape in shapes)
    expected = ((experts * rank, d_in), (d_out, rank * experts))
    if (
        "a" not in parts
        or "b" not in parts
        or ((parts["a"].shape, parts["b"].shape) != expected)
    ):
        raise ValueError(
            f"Parameter '{full}' ({experts} experts, rank {rank} from `r`/"
            f"`rank_pattern`, {d_in} input and {d_out} output features from the "
            f"KerasHub model) must have lora_A of shape {expected[0]} and lora_B "
            f"of shape {expected[1]}. Received: "
            f"{ {k: v.shape for k, v in parts.items()} }"
        )
    layouts = [((d_in,), (shape[2],), "linear") for shape in shapes]
    peft_reading.check_rank_fits(full, rank, layouts)
    a = np.transpose(np.reshape(parts["a"], (experts, rank, d_in)), (0, 2, 1))
    b = np.transpose(np.reshape(parts["b"], (d_out, rank, experts)), (2, 1, 0))
    lora_config = {
        "rank": int(rank),
        "alpha": float(alpha),
        "dropout": 0.0,
        "use_rslora": settings["use_rslora"],
        "a_initializer": "zeros",
        "b_initializer": "zeros",
    }
    plan, start = {}, 0
    for weight, shape in zip(weights, shapes):
        stop = start + shape[2]
        entry = (weight, lora_config, a, b[:, :, start:stop], None)
        plan[unique_path(weight)] = entry
        start = stop
    return plan


def lora_layer(target):
    """The LoRA layer of a planned target (a raw weight's, once adapted)."""
    if isinstance(target, raw_weights.RawWeight):
        return expert_bank.expert_layers(target.layer)[target.attribute]
    return target


def path_checker(model):
    """`model_paths.path_checker` that also knows the model's raw weights."""
    return model_paths.path_checker(model, raw_weights.raw_weights(model))


def split_layers(layers):
    """`(module layers, expert layers)` of a model's LoRA layers (or views)."""
    unwrapped = peft_writing.unwrapped
    experts = [x for x in layers if isinstance(unwrapped(x), LoRAExpertEinsum)]
    return [x for x in layers if x not in experts], experts


def save_tensors(layers, context, module_prefix, use_dora=False):
    """PEFT tensors and `{full parameter name: record}` of expert LoRA layers.

    Raises:
        ValueError: for an adapted raw weight that is no transformers expert
            parameter (one a user named outside the architecture's table),
            or experts beside DoRA modules (PEFT's `use_dora` is one flag,
            which `target_parameters` refuses).
    """
    if layers and use_dora:
        raise ValueError(
            "PEFT cannot save DoRA modules and LoRA on experts in one adapter "
            "(`use_dora` holds for all of it; `target_parameters` refuses it). "
            f"Received: DoRA layers beside expert LoRA layers "
            f"{[x.path for x in layers[:4]]}"
        )
    by_key = {(id(x.lora_bank), x.lora_attribute): x for x in layers}
    tensors, records, done = {}, {}, set()
    for name, module in context["experts"].items():
        full = module_prefix + name
        adapted = {}
        for parameter, attributes in module.parameters.items():
            keys = [(id(module.bank), a) for a in attributes]
            if any(k in by_key for k in keys):
                adapted[parameter] = {
                    i: by_key[k] for i, k in enumerate(keys) if k in by_key
                }
                done.update(keys)
        for depth, parameter in enumerate(reversed(list(adapted))):
            sizes = [
                getattr(module.bank, a).shape[2] for a in module.parameters[parameter]
            ]
            a, b, record = _fuse(adapted[parameter], sizes)
            nested = STATE_PREFIX + full + _NESTED * depth
            tensors[nested + ".lora_A.weight"] = a
            tensors[nested + ".lora_B.weight"] = b
            records[f"{full}.{parameter}"] = record
    unmapped = [
        x.path for x in layers if (id(x.lora_bank), x.lora_attribute) not in done
    ]
    if unmapped:
        mappable = sorted(
            {
                a
                for m in context["experts"].values()
                for p in m.parameters.values()
                for a in p
            }
        )
        raise ValueError(
            f"LoRA layers {unmapped[:8]} adapt raw weights that are no "
            "transformers expert parameter of architecture "
            f"'{context['architecture'].name}': only the expert weights "
            f"{mappable} map onto PEFT's `target_parameters`."
        )
    if any(x.dropout for x in layers):
        warnings.warn(
            "save_peft_adapter: PEFT's `target_parameters` LoRA has no dropout "
            "(peft 0.21 refuses `lora_dropout` with it), so the adapter is "
            "written with lora_dropout=0.0: the same outputs in inference, no "
            "dropout if trained further in PEFT.",
            stacklevel=3,
        )
    return tensors, records


def _fuse(adapted, sizes):
    """PEFT's `(lora_A, lora_B, record)` of one parameter from its LoRA layers
    (`adapted`: {index of the bank weight: layer}, `sizes`: output features
    of each bank weight of the parameter)."""
    a = {i: _numpy(x.lora_a) for i, x in adapted.items()}  # (E, d_in, r)
    b = {i: _numpy(x.lora_b) for i, x in adapted.items()}  # (E, r, d_out)
    first = adapted[min(adapted)]
    experts, d_in = a[min(adapted)].shape[:2]
    starts = np.cumsum([0] + list(sizes))
    same = all(
        x.rank == first.rank
        and x.lora_scale == first.lora_scale
        and np.array_equal(a[i], a[min(adapted)])
        for i, x in adapted.items()
    )
    if same:  # one shared A (what loading a fused parameter gives)
        rank, scales = first.rank, {i: 1.0 for i in adapted}
        a_all = a[min(adapted)]
        record = {
            "rank": rank,
            "scale": first.lora_scale,
            "alpha": first.alpha,
            "use_rslora": first.use_rslora,
        }
    else:  # stacked along the rank, block i of B scaled by s_i: scale 1
        rank = sum(x.rank for x in adapted.values())
        scales = {i: float(x.lora_scale) for i, x in adapted.items()}
        a_all = np.concatenate([a[i] for i in sorted(adapted)], axis=2)
        record = {"rank": rank, "scale": 1.0, "alpha": float(rank), "use_rslora": False}
    b_all = np.zeros((experts, rank, starts[-1]), "float32")
    column = 0  # the rank columns of layer i: all (shared A), or its block
    for i in sorted(adapted):
        width = rank if same else adapted[i].rank
        block = b[i] * np.float32(scales[i])
        b_all[:, column : column + width, starts[i] : starts[i + 1]] = block
        if not same:
            column += width
    record["dropout"] = 0.0
    a_peft = np.reshape(np.transpose(a_all, (0, 2, 1)), (experts * rank, d_in))
    b_peft = np.reshape(np.transpose(b_all, (2, 1, 0)), (starts[-1], rank * experts))
    return np.ascontiguousarray(a_peft), np.ascontiguousarray(b_peft), record


def _parse(key):
    if not key.startswith(STATE_PREFIX):
        return None, None
    rest = key[len(STATE_PREFIX) :]
    for suffix, factor in _FACTORS.items():
        if rest.endswith(suffix):
            return rest[: -len(suffix)], factor
    return None, None


def _ends_with(full, name):
    return full == name or full.endswith("." + name)


def _selected(config, key):
    """PEFT's rule: a parameter key equal to an entry or ending in `.entry`."""
    return any(_ends_with(key, t) for t in config.get("target_parameters") or [])


def _weights_by_key(model, experts):
    """{(id(bank), attribute): raw weight, or its LoRA layer once adapted}."""
    found = {(id(w.layer), w.attribute): w for w in raw_weights.raw_weights(model)}
    for module in experts.values():
        for attribute, lora in expert_bank.expert_layers(module.bank).items():
            found[(id(module.bank), attribute)] = lora
    return found


def _variable(target):
    return (
        target.variable
        if isinstance(target, raw_weights.RawWeight)
        else target.lora_base_kernel
    )


def _numpy(variable):
    return keras.ops.convert_to_numpy(variable).astype("float32")
