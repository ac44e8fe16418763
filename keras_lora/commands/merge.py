"""`keras-lora merge BASE.keras ADAPTER.keras OUT.keras`: one plain model."""

import os

from keras_lora.commands.common import add_force_argument

DESCRIPTION = (
    "Loads the base model, applies the adapter file (load_adapter), folds the "
    "update into the kernels and writes a plain .keras model (export_merged): "
    "no LoRA layer, no custom object, loads with keras.saving.load_model alone."
)
EPILOG = "Example: keras-lora merge base.keras task.adapter.keras merged.keras"


def add_arguments(parser):
    parser.add_argument("base", metavar="BASE.keras", help="the base model")
    parser.add_argument(
        "adapter",
        metavar="ADAPTER.keras",
        help="an adapter file written by save_adapter for that base model",
    )
    parser.add_argument(
        "out", metavar="OUT.keras", help="the merged model to write (.keras)"
    )
    add_force_argument(parser)


def run(args):
    from keras_lora.commands.common import existing_file, load_base, new_output

    existing_file(args.base, "Base model")
    existing_file(args.adapter, "Adapter file")
    if not args.out.endswith(".keras"):
        raise ValueError(f"OUT.keras must end in '.keras'. Received: {args.out!r}")
    new_output(args.out, [args.base, args.adapter], "OUT.keras", args.force)
    from keras_lora.adapters import load_adapter
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
    export_merged(model, args.out)
    print(
        f"Merged {count} LoRA layer{'s' if count != 1 else ''} of {args.adapter} "
        f"into {args.base}: wrote {args.out} ({os.path.getsize(args.out):,} bytes)."
    )
