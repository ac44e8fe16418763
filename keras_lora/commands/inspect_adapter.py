"""`keras-lora inspect` of a keras-lora adapter file (`save_adapter`'s)."""

import json
import os
import zipfile

from keras_lora.commands.inspect_entry import layer_entry


def describe(path):
    # `read_adapter` makes every check `load_adapter` makes, and names the
    # file in its ValueError.
    from keras_lora.adapters import read_adapter

    config, arrays = read_adapter(path)
    with zipfile.ZipFile(path) as archive:
        metadata = json.loads(archive.read("metadata.json"))  # checked above
    spec = config["spec"]
    layers = []
    for layer_path, settings in spec["layers"].items():
        a = arrays[f"{layer_path}/lora_a"]
        b = arrays[f"{layer_path}/lora_b"]
        layers.append(
            layer_entry(
                layer_path,
                settings["rank"],
                settings["alpha"],
                settings.get("use_rslora", False),
                settings.get("dropout"),
                (a.shape, b.shape),
                use_dora=settings.get("use_dora", False),
            )
        )
    lora = sum(v.size for k, v in arrays.items() if not k.startswith("train/"))
    trained = []
    for layer_path in spec.get("train_layers", []):
        prefix = f"train/{layer_path}/"
        count = sum(v.size for k, v in arrays.items() if k.startswith(prefix))
        trained.append({"path": layer_path, "parameters": int(count)})
    head = sum(t["parameters"] for t in trained)
    return {
        "path": path,
        "format": f"keras-lora adapter (format version {metadata['format_version']})",
        "file_bytes": os.path.getsize(path),
        "versions": {
            "keras-lora": metadata.get("keras_lora_version"),
            "Keras": metadata.get("keras_version"),
            "backend": metadata.get("backend"),
            "saved": metadata.get("date_saved"),
        },
        "targets": spec.get("targets"),
        "parameters": {"LoRA": int(lora), "trained layers": head, "total": lora + head},
        "layers": layers,
        "trained_layers": trained,
    }
