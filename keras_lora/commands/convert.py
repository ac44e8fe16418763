"""`keras-lora convert SRC DST --base BASE`: PEFT folder <-> keras-lora file.

The direction follows SRC: a folder is read as a PEFT adapter and written as a
keras-lora adapter file (DST ends in `.keras`); a `.keras` adapter file is
written as a PEFT adapter folder. Both directions need the base model, whose
layers the adapter's modules map onto.
"""

import os

from keras_lora.commands.common import add_force_argument

DESCRIPTION = (
    "Converts a Hugging Face PEFT LoRA adapter folder into a keras-lora adapter "
    "file, or a keras-lora adapter file into a PEFT folder (by SRC: a folder or "
    "a .keras file). The base model (--base) is the KerasHub model the adapter "
    "belongs to: a .keras file, or a KerasHub preset / transformers folder."
)
EPILOG = (
    "Examples: keras-lora convert ./peft-adapter task.adapter.keras --base "
    "./bert-hf-folder;  keras-lora convert task.adapter.keras ./peft-out --base "
    "base.keras"
)


def add_arguments(parser):
    parser.add_argument(
        "source", metavar="SRC", help="a PEFT adapter folder or a .keras adapter file"
    )
    parser.add_argument(
        "destination",
        metavar="DST",
        help="the .keras adapter file (from a PEFT folder) or the PEFT folder "
        "(from a .keras file) to write",
    )
    parser.add_argument(
        "--base",
        required=True,
        metavar="BASE",
        help="the base model: a .keras file, or a folder or name that "
        "keras_hub.models.<--hub-class>.from_preset loads",
    )
    parser.add_argument(
        "--hub-class",
        default="Backbone",
        help="the keras_hub.models class whose from_preset loads a preset "
        "--base (default: %(default)s); an adapter with a trained head needs the "
        "task model: pass it as a .keras file",
    )
    add_force_argument(parser)


def run(args):
    from keras_lora.commands.common import existing_file, new_output

    if os.path.isdir(args.source):
        if not args.destination.endswith(".keras"):
            raise ValueError(
                "From a PEFT folder, DST must be a keras-lora adapter file ending "
                f"in '.keras'. Received: DST={args.destination!r}"
            )
        _peft_to_adapter(args)
        kind = "keras-lora adapter file"
    else:
        existing_file(args.source, "SRC")
        if not args.source.endswith(".keras"):
            raise ValueError(
                "SRC must be a PEFT adapter folder or a keras-lora adapter file "
                f"ending in '.keras'. Received: SRC={args.source!r}"
            )
        if os.path.isfile(args.destination):
            raise ValueError(
                "From an adapter file, DST must be a folder (PEFT's layout). "
                f"Received: DST={args.destination!r}, an existing file"
            )
        new_output(args.destination, [args.source, args.base], "DST", args.force)
        _adapter_to_peft(args)
        kind = "PEFT adapter folder"
    print(f"Converted {args.source} into the {kind} {args.destination}.")


def _peft_to_adapter(args):
    from keras_lora.adapters import save_adapter
    from keras_lora.commands.common import load_base, new_output
    from keras_lora.interop import load_peft_adapter, peft_reading

    peft_reading.read_config(args.source)  # a clear error before loading the base
    new_output(args.destination, [args.source, args.base], "DST", args.force)
    model = load_base(args.base, args.hub_class)
    load_peft_adapter(model, args.source)
    save_adapter(model, args.destination)


def _adapter_to_peft(args):
    from keras_lora.adapters import load_adapter, read_adapter
    from keras_lora.commands.common import load_base
    from keras_lora.interop import save_peft_adapter

    read_adapter(args.source)  # a clear error before loading the base
    model = load_base(args.base, args.hub_class)
    load_adapter(model, args.source)
    save_peft_adapter(model, args.destination)
