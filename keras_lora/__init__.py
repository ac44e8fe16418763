"""keras-lora: LoRA (Hu et al., 2021) for Keras 3 on JAX, PyTorch and TensorFlow."""

from keras_lora.layers import LoRADense, LoRAEinsumDense, LoRAEmbedding
from keras_lora.report import print_trainable_parameters, trainable_summary
from keras_lora.transform import disable_lora, enable_lora, lora_layers, merge_lora

__version__ = "0.1.0"

__all__ = [
    "LoRADense",
    "LoRAEinsumDense",
    "LoRAEmbedding",
    "disable_lora",
    "enable_lora",
    "lora_layers",
    "merge_lora",
    "print_trainable_parameters",
    "trainable_summary",
]
