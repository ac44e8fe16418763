"""keras-lora: LoRA (Hu et al., 2021) for Keras 3 on JAX, PyTorch and TensorFlow."""

from keras_lora.adapters import load_adapter, save_adapter
from keras_lora.callbacks import MergeLoRA
from keras_lora.export import export_merged
from keras_lora.interop import load_peft_adapter, save_peft_adapter
from keras_lora.layers import LoRADense, LoRAEinsumDense, LoRAEmbedding
from keras_lora.report import print_trainable_parameters, trainable_summary
from keras_lora.transform import disable_lora, enable_lora, lora_layers, merge_lora

__version__ = "0.1.0"

__all__ = [
    "LoRADense",
    "LoRAEinsumDense",
    "LoRAEmbedding",
    "MergeLoRA",
    "disable_lora",
    "enable_lora",
    "export_merged",
    "load_adapter",
    "load_peft_adapter",
    "lora_layers",
    "merge_lora",
    "print_trainable_parameters",
    "save_adapter",
    "save_peft_adapter",
    "trainable_summary",
]
