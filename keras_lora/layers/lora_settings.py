"""The settings of one low-rank update: declared, checked and documented once.

Every LoRA layer constructor, `LoRALayer.adapt`, `add_lora_adapter` and the
model-level `enable_lora` / `add_adapter` take these settings by keyword and
hand them here; nothing else lists them or checks them.
"""

import keras

from keras_lora.layers import lora_math, variants

# The initializers of A and B, unless a layer type says otherwise (embeddings:
# `embedding.py`).
DEFAULT_INITIALIZERS = {"a_initializer": "he_uniform", "b_initializer": "zeros"}


class LoRASettings:
    """The hyper-parameters of one adapter (its rank, scale, dropout, start).

    Args:
        rank: positive int, the rank r of the update (at most the layer's
            `min(d_in, d_out)`).
        alpha: positive float or None; the update is scaled by `alpha / rank`.
            Defaults to `rank` (scale 1).
        dropout: float in [0, 1), dropout on the LoRA path's input in training.
        use_rslora: bool; scale by `alpha / sqrt(rank)` (rsLoRA) instead.
        a_initializer: initializer of A (`"he_uniform"`; embeddings:
            `"zeros"`).
        b_initializer: initializer of B (`"zeros"`; embeddings: normal with
            stddev 1).
        use_dora: bool; DoRA (weight-decomposed LoRA): a trainable magnitude
            per output unit rescales W + s·ΔW (see `layers/dora.py`).
        init: None, or `"pissa"`/`"olora"` to start the factors from W's
            principal part and freeze the residual (see `lora_init.py`).

    Example:

    >>> settings = LoRASettings(rank=4, alpha=8)
    >>> settings.scale
    2.0
    """

    NAMES = (
        "rank",
        "alpha",
        "dropout",
        "use_rslora",
        "a_initializer",
        "b_initializer",
        "use_dora",
        "init",
    )

    def __init__(self, rank=8, alpha=None, dropout=0.0, use_rslora=False, **rest):
        unknown = sorted(set(rest) - set(self.NAMES))
        if unknown:
            raise ValueError(
                f"Unknown LoRA setting(s) {unknown}; the settings are "
                f"{list(self.NAMES)}. Received: {rest}"
            )
        rest = {**DEFAULT_INITIALIZERS, "use_dora": False, "init": None, **rest}
        self.rank = lora_math.check_rank(rank)
        # `alpha` is kept as given (None means "equal to rank") for configs.
        self.alpha_arg = alpha
        self.alpha = lora_math.check_alpha(alpha, self.rank)
        self.dropout = lora_math.check_dropout(dropout)
        if not isinstance(use_rslora, bool):
            raise ValueError(
                f"`use_rslora` must be a bool. Received: use_rslora={use_rslora!r}"
            )
        self.use_rslora = use_rslora
        self.scale = lora_math.lora_scale(self.rank, self.alpha, use_rslora)
        self.a_initializer = keras.initializers.get(rest["a_initializer"])
        self.b_initializer = keras.initializers.get(rest["b_initializer"])
        self.use_dora = rest["use_dora"]
        self.init = rest["init"]
        # How this adapter starts, runs, merges and saves (`variant.py`);
        # each checks the layer type when the layer takes the settings.
        self.variants = variants.variants_for(self.use_dora, self.init)

    @classmethod
    def pop_from(cls, kwargs, defaults=None, **given):
        """Takes the LoRA settings out of a layer constructor's `kwargs`.

        Args:
            kwargs: the constructor's `**kwargs` (the base class's arguments
                and LoRA settings); the settings are removed from it.
            defaults: settings this layer type starts from (embeddings'
                initializers).
            **given: the settings the constructor names itself (`rank`,
                `alpha`).

        Returns:
            A dict of settings, checked when the layer makes its adapter.
        """
        taken = {n: kwargs.pop(n) for n in cls.NAMES if n in kwargs}
        return {**(defaults or {}), **given, **taken}

    def config(self):
        """The settings as `get_config` and adapter files record them."""
        return {
            "rank": self.rank,
            "alpha": self.alpha_arg,
            "dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "a_initializer": keras.initializers.serialize(self.a_initializer),
            "b_initializer": keras.initializers.serialize(self.b_initializer),
            "use_dora": self.use_dora,
            "init": self.init,
        }
