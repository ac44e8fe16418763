"""`keras-lora demo`: the options of `keras_lora.demo.run`.

The option defaults live in `keras_lora.demo`, which imports Keras: only
`keras-lora demo ...` pays for it, not `keras-lora --help`.
"""

import os

from keras_lora.cli import non_negative_int, positive_int

DESCRIPTION = (
    "Offline LoRA walk-through, about a minute on 2 CPU cores: pre-trains a "
    "small KerasHub GPT-2 on a short text shipped with keras-lora (or loads "
    "--preset), adapts it to a second text with enable_lora, then saves the "
    "adapter, exports the merged model, reloads both and checks that the "
    "outputs match. Writes report.md/report.json, base.keras, adapter.keras "
    "and merged.keras into --out."
)
EPILOG = (
    "The backend is Keras's: set KERAS_BACKEND=jax|torch|tensorflow (the report "
    "says which ran). Example: KERAS_BACKEND=torch keras-lora demo --out /tmp/demo"
)


def add_arguments(parser):
    from keras_lora.demo import DEFAULTS, MODEL_CONFIG, TARGETS

    parser.add_argument(
        "--out",
        default=DEFAULTS["out"],
        help="output folder (created if missing; default: %(default)s)",
    )
    parser.add_argument(
        "--preset",
        metavar="NAME_OR_DIR",
        help="a KerasHub causal LM preset folder or name, passed to "
        "keras_hub.models.CausalLM.from_preset, used as the base instead of "
        "the small pre-trained GPT-2 (a name is read from KerasHub's cache, "
        "or downloaded if the network allows; a folder needs no network)",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=DEFAULTS["epochs"],
        help="LoRA training epochs on the target text (default: %(default)s)",
    )
    parser.add_argument(
        "--pretrain-epochs",
        type=non_negative_int,
        default=DEFAULTS["pretrain_epochs"],
        help="pre-training epochs of the small base model on the base text "
        "(ignored with --preset; default: %(default)s)",
    )
    parser.add_argument(
        "--rank",
        type=positive_int,
        default=DEFAULTS["rank"],
        help="LoRA rank (default: %(default)s)",
    )
    parser.add_argument(
        "--targets",
        choices=sorted(TARGETS),
        default=DEFAULTS["targets"],
        help="layers to adapt: every Dense/EinsumDense layer, or the attention "
        "query/value projections only (enable_lora's default; fewer "
        "parameters, slower to adapt a model this small) (default: %(default)s)",
    )
    parser.add_argument(
        "--sequence-length",
        type=positive_int,
        default=DEFAULTS["sequence_length"],
        help="training window in tokens (default: %(default)s)",
    )
    parser.add_argument(
        "--sample-length",
        type=positive_int,
        default=DEFAULTS["sample_length"],
        help="length in tokens of the generated samples, prompt included "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--prompt",
        default=DEFAULTS["prompt"],
        help="prompt of the generated samples (default: %(default)r)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS["seed"],
        help="random seed (default: %(default)s)",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        default=DEFAULTS["quantize"],
        help="quantize the pre-trained base with model.quantize before LoRA "
        "(QLoRA); the merged export is re-quantized the same way (default: float)",
    )
    parser.set_defaults(max_sequence_length=MODEL_CONFIG["max_sequence_length"])


def check(parser, args):
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out {args.out!r} is a file, not a folder")
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        parser.error(f"--out {args.out!r}: cannot write in {parent!r}")
    if not args.preset:
        limit = args.max_sequence_length
        for name in ("sequence_length", "sample_length"):
            if getattr(args, name) > limit:
                parser.error(
                    f"--{name.replace('_', '-')} must be at most {limit} (the "
                    f"demo model's max_sequence_length), got {getattr(args, name)}"
                )
    if not args.prompt.strip():
        parser.error("--prompt must not be empty")


def run(args):
    from keras_lora import demo

    demo.run(args)
