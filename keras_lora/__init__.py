"""keras-lora: LoRA (Hu et al., 2021) for Keras 3 on JAX, PyTorch and TensorFlow."""

# ruff: noqa: F401  (the TYPE_CHECKING imports name the public API for tools)

import importlib as _importlib
import os as _os
import sys as _sys
import typing as _typing

__version__ = "0.1.0"

# Each public name and the module that defines it. Bound on first use
# (`__getattr__`), and all at once on `import keras_lora` (below).
_PUBLIC = {
    "LoRAConv1D": "keras_lora.layers",
    "LoRAConv2D": "keras_lora.layers",
    "LoRAConv3D": "keras_lora.layers",
    "LoRADense": "keras_lora.layers",
    "LoRAEinsumDense": "keras_lora.layers",
    "LoRAEmbedding": "keras_lora.layers",
    "LoRAPlus": "keras_lora.lora_plus",
    "MergeLoRA": "keras_lora.callbacks",
    "active_adapters": "keras_lora.named_adapters",
    "add_adapter": "keras_lora.named_adapters",
    "adapter_ids": "keras_lora.mixed_batch",
    "analysis": None,  # the subpackage keras_lora.analysis
    "combine_adapters": "keras_lora.combine",
    "delete_adapter": "keras_lora.named_adapters",
    "disable_lora": "keras_lora.disable",
    "enable_lora": "keras_lora.transform",
    "export_merged": "keras_lora.export",
    "export_multi_adapter": "keras_lora.multi_adapter_export",
    "export_preset": "keras_lora.deploy",
    "export_serving": "keras_lora.deploy",
    "list_adapters": "keras_lora.named_adapters",
    "load_adapter": "keras_lora.adapters",
    "load_peft_adapter": "keras_lora.interop",
    "lora_layers": "keras_lora.transform",
    "merge_lora": "keras_lora.transform",
    "print_trainable_parameters": "keras_lora.report",
    "save_adapter": "keras_lora.adapters",
    "save_peft_adapter": "keras_lora.interop",
    "set_adapter": "keras_lora.named_adapters",
    "trainable_summary": "keras_lora.report",
    "use_chunked_loss": "keras_lora.chunked_loss",
}
__all__ = sorted(_PUBLIC)

if _typing.TYPE_CHECKING:  # what static tools and IDEs read
    from keras_lora import analysis
    from keras_lora.adapters import load_adapter, save_adapter
    from keras_lora.callbacks import MergeLoRA
    from keras_lora.chunked_loss import use_chunked_loss
    from keras_lora.combine import combine_adapters
    from keras_lora.deploy import export_preset, export_serving
    from keras_lora.disable import disable_lora
    from keras_lora.export import export_merged
    from keras_lora.interop import load_peft_adapter, save_peft_adapter
    from keras_lora.layers import (
        LoRAConv1D,
        LoRAConv2D,
        LoRAConv3D,
        LoRADense,
        LoRAEinsumDense,
        LoRAEmbedding,
    )
    from keras_lora.lora_plus import LoRAPlus
    from keras_lora.mixed_batch import adapter_ids
    from keras_lora.multi_adapter_export import export_multi_adapter
    from keras_lora.named_adapters import (
        active_adapters,
        add_adapter,
        delete_adapter,
        list_adapters,
        set_adapter,
    )
    from keras_lora.report import print_trainable_parameters, trainable_summary
    from keras_lora.transform import enable_lora, lora_layers, merge_lora


def __getattr__(name):
    """Imports and binds a public name on first use (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'keras_lora' has no attribute {name!r}")
    module = _PUBLIC[name]
    if module is None:
        value = _importlib.import_module(f"keras_lora.{name}")
    else:
        value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _started_as_command():
    """True in a `keras-lora ...` or `python -m keras_lora ...` process."""
    if _sys.argv and _os.path.basename(_sys.argv[0]) == "keras-lora":
        return True
    argv = getattr(_sys, "orig_argv", [])
    return any(a == "-m" and b == "keras_lora" for a, b in zip(argv, argv[1:]))


# `import keras_lora` imports Keras and registers the LoRA layer classes (so
# `keras.saving.load_model` finds them), except in the `keras-lora` command:
# its `--help` must not wait ~20 s for Keras and TensorFlow (issue 16); each
# command imports the library when it runs.
if not _started_as_command():
    for _name in __all__:
        __getattr__(_name)
    _importlib.import_module("keras_lora.saving")  # adapted models' load hook
