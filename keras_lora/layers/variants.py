"""Which variants an adapter's settings ask for (see `variant.py`)."""

from keras_lora import lora_init
from keras_lora.layers import dora
from keras_lora.layers.residual_start import ResidualStart
from keras_lora.layers.variant import LoRAVariant

_PLAIN = LoRAVariant()
_DORA = dora.DoRA()


def variants_for(use_dora, init):
    """The variants of an adapter: its start (if not the default), then its
    update.

    Args:
        use_dora: bool; DoRA's update instead of the plain one.
        init: None, `"pissa"` or `"olora"`.

    Returns:
        A tuple of `LoRAVariant`s, the one that runs the update last.
    """
    dora.check_use_dora(use_dora)
    lora_init.check_layer_init(init)
    start = () if init is None else (ResidualStart(init),)
    return (*start, _DORA if use_dora else _PLAIN)
