"""keras-lora: LoRA (Hu et al., 2021) for Keras 3 on JAX, PyTorch and TensorFlow."""

# ruff: noqa: F401  (the public names are imported in a function, see below)

import os as _os
import sys as _sys

__version__ = "0.1.0"

__all__ = [
    "LoRAConv1D",
    "LoRAConv2D",
    "LoRAConv3D",
    "LoRADense",
    "LoRAEinsumDense",
    "LoRAEmbedding",
    "LoRAPlus",
    "MergeLoRA",
    "active_adapters",
    "add_adapter",
    "adapter_ids",
    "analysis",
    "combine_adapters",
    "delete_adapter",
    "disable_lora",
    "enable_lora",
    "export_merged",
    "load_adapter",
    "load_peft_adapter",
    "list_adapters",
    "lora_layers",
    "merge_lora",
    "print_trainable_parameters",
    "save_adapter",
    "save_peft_adapter",
    "set_adapter",
    "trainable_summary",
    "use_chunked_loss",
]


def _import_public_names():
    """Imports the library (and so Keras) and binds the public names."""
    # The imports below are bound as module globals by `globals().update`.
    import keras_lora.analysis as analysis
    from keras_lora.adapters import load_adapter, save_adapter
    from keras_lora.callbacks import MergeLoRA
    from keras_lora.chunked_loss import use_chunked_loss
    from keras_lora.combine import combine_adapters
    from keras_lora.export import export_merged
    from keras_lora.interop import load_peft_adapter, save_peft_adapter
    from keras_lora.layers import LoRADense, LoRAEinsumDense, LoRAEmbedding
    from keras_lora.layers.conv import LoRAConv1D, LoRAConv2D, LoRAConv3D
    from keras_lora.lora_plus import LoRAPlus
    from keras_lora.mixed_batch import adapter_ids
    from keras_lora.named_adapters import (
        active_adapters,
        add_adapter,
        delete_adapter,
        list_adapters,
        set_adapter,
    )
    from keras_lora.report import print_trainable_parameters, trainable_summary
    from keras_lora.transform import disable_lora, enable_lora, lora_layers, merge_lora

    globals().update(locals())


def _started_as_command():
    """True in a `keras-lora ...` or `python -m keras_lora ...` process."""
    if _sys.argv and _os.path.basename(_sys.argv[0]) == "keras-lora":
        return True
    argv = getattr(_sys, "orig_argv", [])
    return any(a == "-m" and b == "keras_lora" for a, b in zip(argv, argv[1:]))


def __getattr__(name):
    # Only reached in a command process (below): the public names load on
    # first use there.
    if name in __all__:
        _import_public_names()
        return globals()[name]
    raise AttributeError(f"module 'keras_lora' has no attribute {name!r}")


# `import keras_lora` imports Keras and registers the LoRA layer classes (so
# `keras.saving.load_model` finds them), except in the `keras-lora` command:
# its `--help` must not wait ~20 s for Keras and TensorFlow (issue 16); each
# command imports the library when it runs.
if not _started_as_command():
    _import_public_names()
