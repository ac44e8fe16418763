"""The `keras-lora` command (also `python -m keras_lora`).

Commands (one module each in `keras_lora/commands/`):
    demo     LoRA end to end on a small GPT-2, offline (see `keras_lora.demo`).
    inspect  what an adapter file, a PEFT adapter folder or a `.keras` model holds.
    merge    a base `.keras` model plus an adapter file -> one plain `.keras` model.
    convert  PEFT adapter folder <-> keras-lora adapter file.
    analyze  the LoRA paper's section 7 measures on two adapters.

Only argparse is imported to build the parser, plus the module of the command
named on the line; Keras is imported when a command runs. So `keras-lora
--help` and `--version` answer at once (importing Keras and TensorFlow takes
10-20 s).

The backend is Keras's: set `KERAS_BACKEND=jax|torch|tensorflow`.
"""

import argparse
import importlib
import os
import sys

PROG = "keras-lora"

# name -> (module, one-line help). The module defines `DESCRIPTION`,
# `add_arguments(parser)`, `run(args)` and, optionally, `check(parser, args)`.
COMMANDS = {
    "demo": (
        "keras_lora.commands.demo",
        "fine-tune a small GPT-2 with LoRA, offline, and export it",
    ),
    "inspect": (
        "keras_lora.commands.inspect_file",
        "show what an adapter file, PEFT adapter folder or .keras model holds",
    ),
    "merge": (
        "keras_lora.commands.merge",
        "fold an adapter into its base model and write one plain .keras model",
    ),
    "convert": (
        "keras_lora.commands.convert",
        "convert a PEFT adapter folder to a keras-lora adapter file, or back",
    ),
    "analyze": (
        "keras_lora.commands.analyze",
        "compare two adapters: subspace similarity, spectrum, amplification",
    ),
}
EPILOG = (
    "The backend is Keras's: set KERAS_BACKEND=jax|torch|tensorflow. "
    "`keras-lora COMMAND --help` describes a command."
)


def build_parser(argv=None):
    """The argument parser; only the command named in `argv` gets its options.

    Args:
        argv: the arguments (default: `sys.argv[1:]`); the first one that is
            not an option names the command whose module is imported.
    """
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="LoRA for Keras 3 on JAX, PyTorch and TensorFlow.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    named = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text, description=help_text)
        if name != named:
            continue
        module = importlib.import_module(module_name)
        command.description = module.DESCRIPTION
        command.epilog = getattr(module, "EPILOG", EPILOG)
        module.add_arguments(command)
        command.add_argument(
            "--debug",
            action="store_true",
            help="show the full traceback of an error",
        )
        command.set_defaults(module=module, parser=command)
    return parser


def positive_int(text):
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text):
    """argparse type: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _version():
    from keras_lora import __version__  # no Keras import in a command process

    return f"{PROG} {__version__}"


def main(argv=None):
    """Entry point of the `keras-lora` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    from keras_lora.quiet import quiet_third_party_logs

    quiet_third_party_logs()  # an application: hide TensorFlow's C++ logs
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    # Every command below loads Keras: adapted models load through this hook.
    from keras_lora import saving  # noqa: F401

    check = getattr(args.module, "check", None)
    if check is not None:
        check(args.parser, args)
    try:
        code = args.module.run(args)
    except BrokenPipeError:  # `keras-lora inspect ... | head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a clear line, not a traceback (unless --debug)
        if args.debug:
            raise
        print(
            f"{PROG} {args.command}: error: {_message(error)}\n"
            "(run again with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    return code or 0


def _message(error):
    # The library's own errors are sentences; others need their type to be
    # understood (e.g. "KeyError: 'lora_a'").
    if isinstance(error, (ValueError, FileNotFoundError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


if __name__ == "__main__":
    sys.exit(main())
