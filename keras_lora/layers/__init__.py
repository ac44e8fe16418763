"""The LoRA layer classes: each one an instance of its Keras base class."""

from keras_lora.layers.conv import LoRAConv1D, LoRAConv2D, LoRAConv3D
from keras_lora.layers.dense import LoRADense
from keras_lora.layers.einsum_dense import LoRAEinsumDense
from keras_lora.layers.embedding import LoRAEmbedding
from keras_lora.layers.lora_layer import LoRALayer

__all__ = [
    "LoRAConv1D",
    "LoRAConv2D",
    "LoRAConv3D",
    "LoRADense",
    "LoRAEinsumDense",
    "LoRAEmbedding",
    "LoRALayer",
]

try:  # KerasHub's tied token embedding, where Keras has it (3.14+)
    from keras_lora.layers.embedding import LoRAReversibleEmbedding  # noqa: F401
except ImportError:
    pass
else:
    __all__.append("LoRAReversibleEmbedding")
