"""PiSSA and OLoRA as a LoRA variant: the factors start from W's principal part.

The maths is `lora_init.py`'s (one layer's residual start); this says where it
enters a layer's life: the starting factors are kept, frozen, as
`lora_a_initial` / `lora_b_initial` (to save adapters for the original base),
and dropping the update puts the original W back.
"""

from keras_lora import lora_init
from keras_lora.layers import layouts
from keras_lora.layers.variant import LoRAVariant


class ResidualStart(LoRAVariant):
    """Starts A and B from W (PiSSA or OLoRA) and freezes W - s·A·B.

    Args:
        init: `"pissa"` or `"olora"`.
    """

    shares_layer = False

    def __init__(self, init):
        self.init = init

    def check(self, layer):
        lora_init.check_layer_init(self.init, layer)

    def build(self, layer):
        primary = layer.lora_primary_adapter
        # Laid out (and sharded) like the factors they copy.
        with layer._lora_unlocked(), layouts.factor_layouts(layer):
            for name, factor in (("a", primary.a), ("b", primary.b)):
                variable = layer._lora_add_float32(
                    f"lora_{name}_initial", factor.shape, "zeros", trainable=False
                )
                setattr(layer, f"lora_{name}_initial", variable)
        lora_init.initialize_layer(layer)

    def state_variables(self, layer):
        return {n: getattr(layer, n) for n in ("lora_a_initial", "lora_b_initial")}

    def base_swaps(self, layer):
        # The kernel holds W_res; the starting factors give W back.
        return lora_init.original_base_swaps(layer)

    def kernel_without_update(self, layer):
        if layer.quantization_mode is not None:
            return None  # the residual stays: its int kernel cannot hold W
        return lora_init.original_kernel(layer)
