from keras_lora.layers.dense import LoRADense
from keras_lora.layers.einsum_dense import LoRAEinsumDense
from keras_lora.layers.embedding import LoRAEmbedding
from keras_lora.layers.lora_layer import LoRALayer

__all__ = ["LoRADense", "LoRAEinsumDense", "LoRAEmbedding", "LoRALayer"]
