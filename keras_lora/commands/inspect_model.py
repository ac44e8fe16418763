"""`keras-lora inspect` of a `.keras` model: its config, never its weights.

An adapted model saved with `model.save` wraps its own config as
`{"model": ..., "lora": <the enable_lora spec>, ...}` under a registered name
starting with `keras_lora>` (see `keras_lora/adapted_model.py`); LoRA layers
built directly (`LoRADense(...)`) appear as `keras_lora>LoRA...` layers.
"""

import json
import os
import zipfile

from keras_lora.commands.inspect_entry import layer_entry
from keras_lora.spec import check_spec

# config.json of a large KerasHub model is tens of KB; refuse absurd sizes
# before reading (a zip member may declare anything).
_MAX_CONFIG_BYTES = 64 * 2**20
_WEIGHTS = "model.weights.h5"


def describe(path):
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        config = _json_member(archive, "config.json", path)
        metadata = (
            _json_member(archive, "metadata.json", path)
            if "metadata.json" in names
            else {}
        )
        parameters = _parameter_count(archive, path) if _WEIGHTS in names else None
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(
            f"'{path}' is not a .keras model: its config.json has no 'class_name'."
        )
    # The library's own checks: a crafted spec is a ValueError naming the file.
    specs = [
        check_spec(c["config"]["lora"], f"'{path}'", True)
        for c in _walk(config)
        if _is_adapted_model(c)
    ]
    layers, trained = [], []
    for spec in specs:
        for layer_path, settings in (spec.get("layers") or {}).items():
            layers.append(
                layer_entry(
                    layer_path,
                    settings.get("rank"),
                    settings.get("alpha"),
                    settings.get("use_rslora", False),
                    settings.get("dropout"),
                    use_dora=settings.get("use_dora", False),
                    init=settings.get("init"),
                )
            )
        trained += [{"path": p} for p in spec.get("train_layers") or []]
    # An adapted model's inner config holds its LoRA layers too: the spec
    # above already lists them.
    for layer in [] if specs else _walk(config):
        if str(layer.get("registered_name", "")).startswith("keras_lora>LoRA"):
            settings = layer.get("config") or {}
            layers.append(
                layer_entry(
                    settings.get("name"),
                    settings.get("rank"),
                    settings.get("alpha"),
                    settings.get("use_rslora", False),
                    settings.get("dropout"),
                    use_dora=settings.get("use_dora", False),
                    init=settings.get("init"),
                )
            )
    model = config["config"]["model"] if _is_adapted_model(config) else config
    kind = "adapted with keras-lora" if layers else "plain: no LoRA layer"
    return {
        "path": path,
        "format": f".keras model ({kind})",
        "file_bytes": os.path.getsize(path),
        "model": {
            "class": model.get("class_name"),
            "module": model.get("module"),
            "name": (model.get("config") or {}).get("name"),
        },
        "versions": {
            "Keras": metadata.get("keras_version"),
            "saved": metadata.get("date_saved"),
        },
        "targets": specs[0].get("targets") if specs else None,
        "parameters": {"total (all weights)": parameters}
        if parameters is not None
        else None,
        "layers": layers,
        "trained_layers": trained,
    }


def _json_member(archive, name, path):
    info = archive.getinfo(name)
    if info.file_size > _MAX_CONFIG_BYTES:
        raise ValueError(f"'{path}': {name} is {info.file_size:,} bytes, too large.")
    try:
        return json.loads(archive.read(name))
    except (ValueError, RecursionError) as error:  # RecursionError: deep nesting
        raise ValueError(f"'{path}': {name} is not valid JSON ({error}).") from None


def _parameter_count(archive, path):
    """Sums the dataset sizes of the weights file, reading its headers only."""
    import h5py

    total = 0

    def add(_, item):
        nonlocal total
        if isinstance(item, h5py.Dataset):
            total += item.size

    try:
        with archive.open(_WEIGHTS) as member, h5py.File(member, "r") as weights:
            weights.visititems(add)
    except OSError as error:
        raise ValueError(f"'{path}': {_WEIGHTS} is not readable ({error}).") from None
    return int(total)


def _walk(value):
    """Every dict in a JSON tree, depth first."""
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)


def _is_adapted_model(config):
    inner = config.get("config")
    return (
        str(config.get("registered_name", "")).startswith("keras_lora>")
        and isinstance(inner, dict)
        and "lora" in inner
        and "model" in inner
    )
