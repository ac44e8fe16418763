"""Checks and loaders the `keras-lora` commands share."""

import os
import zipfile


def existing_file(path, what):
    """Returns `path` if it is a file, else raises a ValueError naming `what`."""
    if os.path.isdir(path):
        raise ValueError(f"{what} must be a file, not a folder. Received: {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"{what} not found: {path!r}")
    return path


def new_output(path, inputs, what, force=False):
    """Checks that writing `path` destroys none of the `inputs`, and nothing
    that exists unless `force` (the command's `--force`)."""
    for other in inputs:
        if os.path.exists(other) and os.path.realpath(other) == os.path.realpath(path):
            raise ValueError(f"{what} {path!r} would overwrite an input file.")
    exists = os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path))
    if exists and not force:
        raise ValueError(
            f"{what} {path!r} already exists: pass --force to overwrite it."
        )
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"{what} {path!r}: the folder {parent!r} does not exist.")
    return path


def load_base(path, hub_class="Backbone"):
    """A base model from a `.keras` file or a KerasHub preset folder or name.

    Args:
        path: a `.keras` file, or anything `keras_hub.models.<hub_class>
            .from_preset` accepts (a KerasHub preset folder, a Hugging Face
            transformers folder, a cached preset name).
        hub_class: the `keras_hub.models` class that loads a preset.
    """
    import keras

    if path.endswith(".keras"):
        existing_file(path, "Base model")
        if not zipfile.is_zipfile(path):
            raise ValueError(
                f"Base model {path!r} is not a .keras model (not a zip archive)."
            )
        # LoRA layer classes must be registered before a saved adapted model
        # is deserialized.
        import keras_lora.transform  # noqa: F401

        try:
            return keras.saving.load_model(path, compile=False)
        except Exception as error:  # an edited config: name the file
            raise ValueError(
                f"Base model {path!r} cannot be loaded "
                f"({type(error).__name__}: {error})"
            ) from None
    import keras_hub

    loader = getattr(keras_hub.models, hub_class, None)
    if loader is None or not hasattr(loader, "from_preset"):
        raise ValueError(
            f"--hub-class must name a keras_hub.models class with from_preset "
            f"(Backbone, CausalLM, TextClassifier, ...). Received: {hub_class!r}"
        )
    return loader.from_preset(path)


def add_force_argument(parser):
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite the output if it exists (refused otherwise)",
    )
