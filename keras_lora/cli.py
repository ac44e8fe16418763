"""The `keras-lora` command (also `python -m keras_lora`).

Subcommands:
    demo    LoRA end to end on a small GPT-2, offline (see `keras_lora.demo`).

The backend is Keras's: set `KERAS_BACKEND=jax|torch|tensorflow`.
"""

import argparse
import os
import sys

PROG = "keras-lora"


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def build_parser():
    from keras_lora.demo import DEFAULTS, MODEL_CONFIG, TARGETS

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="LoRA for Keras 3 on JAX, PyTorch and TensorFlow. "
        "The backend is chosen with the KERAS_BACKEND environment variable.",
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    demo = commands.add_parser(
        "demo",
        help="fine-tune a small GPT-2 with LoRA, offline, and export it",
        description=(
            "Offline LoRA walk-through in a few minutes on a CPU: pre-trains a "
            "small KerasHub GPT-2 on a short text shipped with keras-lora (or "
            "loads --preset), adapts it to a second text with enable_lora, "
            "then saves the adapter, exports the merged model, reloads both "
            "and checks that the outputs match. Writes report.md/report.json, "
            "base.keras, adapter.keras and merged.keras into --out."
        ),
        epilog="The backend is Keras's: set KERAS_BACKEND=jax|torch|tensorflow "
        "(the report says which ran). Example: KERAS_BACKEND=torch keras-lora "
        "demo --out /tmp/demo",
    )
    demo.add_argument(
        "--out",
        default=DEFAULTS["out"],
        help="output folder (created if missing; default: %(default)s)",
    )
    demo.add_argument(
        "--preset",
        metavar="NAME_OR_DIR",
        help="a KerasHub causal LM preset name or folder, passed to "
        "keras_hub.models.CausalLM.from_preset, used as the base instead of "
        "the small pre-trained GPT-2 (names need the preset cached or network)",
    )
    demo.add_argument(
        "--epochs",
        type=_positive_int,
        default=DEFAULTS["epochs"],
        help="LoRA training epochs on the target text (default: %(default)s)",
    )
    demo.add_argument(
        "--pretrain-epochs",
        type=_non_negative_int,
        default=DEFAULTS["pretrain_epochs"],
        help="pre-training epochs of the small base model on the base text "
        "(ignored with --preset; default: %(default)s)",
    )
    demo.add_argument(
        "--rank",
        type=_positive_int,
        default=DEFAULTS["rank"],
        help="LoRA rank (default: %(default)s)",
    )
    demo.add_argument(
        "--targets",
        choices=sorted(TARGETS),
        default=DEFAULTS["targets"],
        help="layers to adapt: every Dense/EinsumDense layer, or the attention "
        "query/value projections only (enable_lora's default; fewer "
        "parameters, slower to adapt a model this small) (default: %(default)s)",
    )
    demo.add_argument(
        "--sequence-length",
        type=_positive_int,
        default=DEFAULTS["sequence_length"],
        help="training window in tokens (default: %(default)s)",
    )
    demo.add_argument(
        "--sample-length",
        type=_positive_int,
        default=DEFAULTS["sample_length"],
        help="length in tokens of the generated samples, prompt included "
        "(default: %(default)s)",
    )
    demo.add_argument(
        "--prompt",
        default=DEFAULTS["prompt"],
        help="prompt of the generated samples (default: %(default)r)",
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS["seed"],
        help="random seed (default: %(default)s)",
    )
    demo.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error",
    )
    demo.set_defaults(
        handler=_demo, max_sequence_length=MODEL_CONFIG["max_sequence_length"]
    )
    return parser


def _check_demo_args(parser, args):
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


def _demo(args):
    from keras_lora import demo

    demo.run(args)


def _version():
    from keras_lora import __version__

    return f"{PROG} {__version__}"


def main(argv=None):
    """Entry point of the `keras-lora` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        _check_demo_args(parser, args)
    try:
        args.handler(args)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a clear line, not a traceback (unless --debug)
        if getattr(args, "debug", False):
            raise
        print(
            f"{PROG} {args.command}: error: {type(error).__name__}: {error}\n"
            "(run again with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
