"""`keras-lora inspect FILE_OR_DIR`: what an adapter or model file holds.

Three kinds of input, each read by the library's own reader where there is one:
- a keras-lora adapter file (`keras_lora.adapters.read_adapter`, every check
  `load_adapter` makes);
- a Hugging Face PEFT adapter folder (`keras_lora.interop.peft_reading`);
- a `.keras` model: its `config.json` and the HDF5 headers of its weights,
  never the weights themselves (a 10 GB model inspects in a second).
"""

import json
import os
import zipfile

DESCRIPTION = (
    "Shows what a keras-lora adapter file, a Hugging Face PEFT adapter folder "
    "or a .keras model holds: format, adapted layers with their ranks and "
    "alphas, targets, trained layers (heads), parameter count, file size and "
    "the versions that wrote it. A .keras model's weights are not loaded."
)
EPILOG = "Example: keras-lora inspect task.adapter.keras --json"


def add_arguments(parser):
    parser.add_argument(
        "path",
        metavar="FILE_OR_DIR",
        help="a keras-lora adapter file, a PEFT adapter folder or a .keras model",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of text"
    )


def run(args):
    info = describe(args.path)
    print(json.dumps(info, indent=2) if args.json else format_text(info))


def describe(path):
    """A JSON-able dict describing an adapter file, PEFT folder or .keras model.

    Raises:
        ValueError: if `path` is missing or none of the three, naming it.
    """
    if os.path.isdir(path):
        from keras_lora.commands import inspect_peft

        return inspect_peft.describe(path)
    if not os.path.isfile(path):
        raise ValueError(f"No such file or folder: {path!r}")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path!r} is not a keras-lora adapter file, a PEFT adapter folder or "
            "a .keras model (it is not a zip archive)."
        )
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
    if "adapter.weights.h5" in names:
        from keras_lora.commands import inspect_adapter

        return inspect_adapter.describe(path)
    if "config.json" in names:
        from keras_lora.commands import inspect_model

        try:
            return inspect_model.describe(path)
        except (
            AttributeError,
            ArithmeticError,
            LookupError,
            TypeError,
            RecursionError,
        ) as error:
            # A crafted config.json: say which file, not where it broke.
            raise ValueError(
                f"'{path}': config.json is not a valid .keras model config "
                f"({type(error).__name__}: {error})."
            ) from None
    raise ValueError(
        f"{path!r} is a zip archive but neither a keras-lora adapter file nor a "
        f".keras model (it holds {sorted(names)[:5]})."
    )


def format_text(info):
    """The dict of `describe` as a few aligned lines."""
    lines = [f"{info['path']}: {info['format']}"]
    keys = ("file_bytes", "model", "base_model", "task", "versions", "targets")
    for key in (*keys, "target_parameters"):
        value = info.get(key)
        if value is None:
            continue
        if key == "file_bytes":
            value = f"{value:,} bytes ({_size(value)})"
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items() if v is not None)
            if not value:
                continue
        lines.append(f"  {key.replace('_', ' ')}: {value}")
    if "parameters" in info:
        counts = info["parameters"]
        lines.append(
            "  parameters: "
            + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in counts.items())
        )
    layers = info.get("layers") or []
    if layers:
        lines.append(f"  adapted layers ({len(layers)}):")
        width = max(len(layer["path"]) for layer in layers)
        for layer in layers:
            shapes = ""
            if "a_shape" in layer:
                shapes = f"  A {tuple(layer['a_shape'])}, B {tuple(layer['b_shape'])}"
            if "experts" in layer:  # PEFT's `target_parameters`: per expert
                shapes += f", {layer['experts']} experts"
            lines.append(
                f"    {layer['path']:<{width}}  rank {layer['rank']:<3} alpha "
                f"{_number(layer['alpha'])} (scale {_number(layer['scale'])})"
                f"{', rsLoRA' if layer.get('use_rslora') else ''}"
                f"{', DoRA' if layer.get('use_dora') else ''}"
                f"{', init ' + layer['init'] if layer.get('init') else ''}{shapes}"
            )
    elif "layers" in info:
        lines.append("  adapted layers: none (a plain model)")
    for trained in info.get("trained_layers") or []:
        count = trained.get("parameters")
        count = f" ({count:,} params)" if count is not None else ""
        lines.append(f"  trained layer: {trained['path']}{count}")
    return "\n".join(lines)


def _number(value):
    return f"{value:g}"


def _size(n):
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "bytes" else f"{n} bytes"
        n /= 1024
