"""`export_serving`: a LoRA model as a serving artifact, in one call.

Keras's `model.export(path, format=...)` writes the serving formats
(`"tf_saved_model"`, `"onnx"`, `"litert"`, `"openvino"`, `"torch"`, each on
the backends Keras supports it on: see docs/deploy.md). Two things stand
between a LoRA model and that call:

- the merged model is a `.keras` file (`export_merged`); reloaded, it has never
  been called, and Keras's ONNX exporter refuses such a model ("The model
  provided has never called") although its input signature is known;
- a live model's artifact carries the LoRA layers' factors separately, which
  is right only when the adapter must stay swappable.

`export_serving` writes the merged model (or the live one), loads it back the
way a user would, and exports it with the input signature Keras itself reads
from the model, so the model need not be called first.
"""

import contextlib
import os
import shutil
import tempfile

import keras

from keras_lora.export import export_merged
from keras_lora.keras_private import get_input_signature

FORMATS = ("tf_saved_model", "onnx", "litert", "openvino", "torch")


def export_serving(
    model,
    filepath,
    format="tf_saved_model",
    merge=True,
    quantize=None,
    dtype=None,
    input_signature=None,
    verbose=False,
    **kwargs,
):
    """Exports `model` (its LoRA updates merged) with `keras.Model.export`.

    Args:
        model: a Keras model with LoRA layers.
        filepath: the artifact's path, as `model.export` takes it for
            `format` (a folder for `"tf_saved_model"`; a file ending in
            `.tflite`, `.xml` or `.pt2` for LiteRT, OpenVINO and torch).
            Written beside a temporary name and moved into place, so a
            failure leaves no partial artifact and any old one as it was.
        format: one of `"tf_saved_model"`, `"onnx"`, `"litert"`,
            `"openvino"`, `"torch"`, as `model.export` takes it.
        merge: True: the artifact is the plain merged model, exactly what
            `export_merged` writes (no LoRA layer, no added latency).
            False: the live model, factors separate (the update is computed
            as `s·(x·A)·B` at serving time).
        quantize: with `merge=True`, as `export_merged` takes it (for
            example `"int8"`); None keeps a float model.
        dtype: with `merge=True`, as `export_merged` takes it.
        input_signature: as `model.export` takes it; by default the one
            Keras reads from the model's inputs (the batch size left free).
        verbose: passed to `model.export`.
        **kwargs: passed to `model.export` (for example `opset_version`).

    Returns:
        `filepath`.

    Example:

    >>> keras_lora.export_serving(model, "model.onnx", format="onnx")
    >>> keras_lora.export_serving(model, "served", quantize="int8")
    """
    if not merge and (quantize is not None or dtype is not None):
        raise ValueError(
            "`quantize` and `dtype` apply to the merged model only: pass "
            f"`merge=True`. Received: merge=False, quantize={quantize!r}, "
            f"dtype={dtype!r}"
        )
    with staged_export(filepath, format) as (work, staged_path):
        served = model
        if merge:
            merged = export_merged(
                model,
                os.path.join(work, "merged.keras"),
                dtype=dtype,
                quantize=quantize,
            )
            served = keras.saving.load_model(merged)
        if input_signature is None:
            input_signature = get_input_signature(served)
        served.export(
            staged_path,
            format=format,
            input_signature=input_signature,
            verbose=verbose,
            **kwargs,
        )
    return filepath


@contextlib.contextmanager
def staged_export(filepath, format):
    """Checks `filepath` and `format`; yields `(work folder, staged path)`.

    The block exports to the staged path (same base name, in a temporary
    folder beside `filepath`); on success every file it wrote there (OpenVINO
    writes `.xml` and `.bin`) is moved into place, on failure nothing is.
    """
    if format not in FORMATS:
        raise ValueError(
            f"`format` must be one of {FORMATS}. Received: format={format!r}"
        )
    if not isinstance(filepath, (str, os.PathLike)):
        raise ValueError(f"`filepath` must be a path. Received: filepath={filepath!r}")
    filepath = os.fspath(filepath)
    folder = os.path.dirname(os.path.abspath(filepath))
    if not os.path.isdir(folder):
        raise ValueError(
            f"The folder of `filepath` does not exist: {folder}. "
            f"Received: filepath={filepath!r}"
        )
    with tempfile.TemporaryDirectory(prefix=".keras_lora_export.", dir=folder) as work:
        staged = os.path.join(work, "artifact")
        os.mkdir(staged)
        yield work, os.path.join(staged, os.path.basename(os.path.normpath(filepath)))
        for entry in sorted(os.listdir(staged)):
            _replace(os.path.join(staged, entry), os.path.join(folder, entry))


def export_preset(model, preset_dir, dtype=None, quantize=None):
    """Saves a KerasHub model, its LoRA updates merged, as a KerasHub preset.

    The preset loads with KerasHub alone (`keras_hub.models.GPT2CausalLM
    .from_preset(preset_dir)`, no keras-lora): it is `export_merged`'s model,
    loaded back and written by its own `save_to_preset`. (The live model's
    own `save_to_preset` would write its LoRA layers, which plain KerasHub
    cannot load.)

    Args:
        model: a KerasHub task or backbone with LoRA layers.
        preset_dir: the preset folder to write (as `save_to_preset` takes
            it).
        dtype: as `export_merged` takes it.
        quantize: as `export_merged` takes it.

    Returns:
        `preset_dir`.

    Example:

    >>> keras_lora.export_preset(causal_lm, "./gpt2-task")
    >>> keras_hub.models.GPT2CausalLM.from_preset("./gpt2-task")
    """
    if not hasattr(model, "save_to_preset"):
        raise ValueError(
            "`model` must be a KerasHub task or backbone (it has no "
            f"`save_to_preset`). Received: model={type(model).__name__}"
        )
    with tempfile.TemporaryDirectory(prefix=".keras_lora_preset.") as work:
        merged = export_merged(
            model, os.path.join(work, "merged.keras"), dtype=dtype, quantize=quantize
        )
        keras.saving.load_model(merged).save_to_preset(preset_dir)
    return preset_dir


def _replace(source, target):
    """Moves `source` onto `target`; an old folder there is removed after."""
    if not os.path.isdir(target) or os.path.islink(target):
        os.replace(source, target)
        return
    old = tempfile.mkdtemp(prefix=".keras_lora_old.", dir=os.path.dirname(target))
    os.replace(target, os.path.join(old, "artifact"))
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(os.path.join(old, "artifact"), target)
        raise
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)
