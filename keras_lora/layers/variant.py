"""LoRA variants: how one kind of adapter starts, runs, merges and saves.

In the spirit of PEFT's `LoraVariant`. A LoRA layer never branches on
`use_dora` or `init`: it asks its primary adapter's variants
(`LoRASettings.variants`, made by `variants.variants_for`). This base class is
the plain LoRA update of the paper; a variant overrides what differs from it:
DoRA (`dora.py`) how the update runs and merges, PiSSA/OLoRA
(`residual_start.py`) how the factors start and what the base is without the
update. A new variant (VeRA, LoRA-FA) is one new module and one entry in
`variants.variants_for`.

A layer's variants are a tuple: the ones that change the start first, then the
one that runs the update (plain LoRA or DoRA). Each hook below says how the
layer combines them.
"""

import numpy as np

from keras_lora.layers import lora_math, low_rank


class LoRAVariant:
    """The plain LoRA update, and the hooks a variant may override."""

    # False: the update cannot be weighted or summed with others (DoRA's:
    # active at weight 1 or not at all).
    additive = True
    # False: the adapter is its layer's only one (DoRA's update is not
    # additive; PiSSA/OLoRA change the base kernel).
    shares_layer = True

    def check(self, layer):
        """Raises a `ValueError` if `layer`'s type cannot take this variant
        (before any variable is added). Every variant is asked."""

    def build(self, layer):
        """Adds this variant's state once A and B exist; in tuple order."""

    def state_variables(self, layer):
        """{name: variable} of this variant's state, saved beside A and B."""
        return {}

    def trained_variables(self, layer):
        """The variables it trains beside A and B."""
        return []

    def adapter_file_variables(self, layer):
        """{name: variable} an adapter file stores beside A and B."""
        return {}

    def base_swaps(self, layer):
        """[(variable, value)] under which the layer computes its base
        (`disable_lora`); the layer's first variant answers.

        The plain update: every adapter's B at zero."""
        return [
            (adapter.b, np.zeros(adapter.b.shape, "float32"))
            for adapter in map(layer.lora_adapter, layer.lora_adapter_names)
        ]

    def outputs(self, layer, base_call, base_outputs, inputs, training):
        """The layer's output before its activation (the last variant's).

        Args:
            layer: the LoRA layer.
            base_call: the base class's `call` (or `quantized_call`).
            base_outputs: its output on `inputs`, before the activation.
            inputs, training: as the layer received them.
        """
        return low_rank.add(base_outputs, layer._lora_delta(inputs, training))

    def merged_kernel(self, layer, kernel, dtype):
        """W with the update folded in (the last variant's), float32 maths.

        Args:
            layer: the LoRA layer.
            kernel: W as a float tensor (dequantized on a quantized base).
            dtype: the result's dtype, or None for the kernel's.
        """
        return lora_math.layer_merged_kernel(layer, kernel, dtype)

    def kernel_without_update(self, layer):
        """The kernel the base layer gets back when the update is dropped
        (`merge_lora(..., merge=False)`), or None to leave it as it is."""
        return None
