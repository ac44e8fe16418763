"""`keras-lora merge BASE.keras ADAPTER.keras OUT [--format F]`: one plain model.

`--format keras` (the default) writes a `.keras` file (`export_merged`); any
other format is a serving artifact Keras exports (`export_serving`).
"""

import os

from keras_lora.commands.common import add_force_argument

DESCRIPTION = (
    "Loads the base model, applies the adapter file (load_adapter), folds the "
    "update into the kernels and writes a plain .keras model (export_merged): "
    "no LoRA layer, no custom object, loads with keras.saving.load_model alone."
)
EPILOG = (
    "Examples: keras-lora merge base.keras task.adapter.keras merged.keras; "
    "keras-lora merge base.keras task.adapter.keras model.onnx --format onnx"
)
FORMATS = ("keras", "onnx", "tf_saved_model", "litert", "openvino", "torch")


def add_arguments(parser):
    parser.add_argument("base", metavar="BASE.keras", help="the base model")
    parser.add_argument(
        "adapter",
        metavar="ADAPTER.keras",
        help="an adapter file written by save_adapter for that base model",
    )
    parser.add_argument(
        "out",
        metavar="OUT",
        help="the merged model to write (.keras; with --format, the artifact's "
        "path as Keras's model.export takes it)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="keras",
        help="keras: a .keras file; otherwise a serving artifact written by "
        "Keras's model.export (which backends export which: docs/deploy.md)",
    )
    add_force_argument(parser)


def run(args):
    from keras_lora.commands.common import existing_file, load_base, new_output

    existing_file(args.base, "Base model")
    existing_file(args.adapter, "Adapter file")
    if args.format == "keras" and not args.out.endswith(".keras"):
        raise ValueError(f"OUT must end in '.keras'. Received: {args.out!r}")
    new_output(args.out, [args.base, args.adapter], "OUT", args.force)
    from keras_lora.adapters import load_adapter
    from keras_lora.deploy import export_serving
    from keras_lora.export import export_merged
    from keras_lora.transform import lora_layers

    model = load_base(args.base)
    if lora_layers(model):
        raise ValueError(
            f"The base model {args.base!r} already has LoRA layers; merge needs "
            "the plain base model the adapter was trained on."
        )
    load_adapter(model, args.adapter)
    count = len(lora_layers(model))
    if args.format == "keras":
        export_merged(model, args.out)
    else:
        export_serving(model, args.out, format=args.format)
    print(
        f"Merged {count} LoRA layer{'s' if count != 1 else ''} of {args.adapter} "
        f"into {args.base}: wrote {args.out} ({args.format}, "
        f"{_size(args.out):,} bytes)."
    )


def _size(path):
    """Bytes of a file, or of every file under a folder (a SavedModel)."""
    if not os.path.isdir(path):
        return os.path.getsize(path)
    return sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(path)
        for name in names
    )
