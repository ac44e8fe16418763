"""The benchmark models: a GPT-2-shaped KerasHub backbone with a 2-class head.

Every variant is built from the same seed, so all of them start from the same
weights; they differ only in what trains and how.
"""

import keras
import numpy as np

import keras_lora

# The GPT-2-shaped configuration of issue 6; `TINY` keeps the smoke test fast.
DEFAULT = dict(
    vocabulary_size=1000,
    num_layers=4,
    num_heads=12,
    hidden_dim=768,
    intermediate_dim=3072,
    sequence_length=128,
    batch_size=8,
    rank=8,
)
TINY = dict(
    vocabulary_size=100,
    num_layers=1,
    num_heads=2,
    hidden_dim=32,
    intermediate_dim=64,
    sequence_length=16,
    batch_size=2,
    rank=4,
)
# The `enable_lora` / `export_merged` timing model: GPT-2 medium's shape.
LARGE = dict(
    vocabulary_size=1000,
    num_layers=24,
    num_heads=16,
    hidden_dim=1024,
    intermediate_dim=4096,
    sequence_length=128,
    batch_size=8,
    rank=8,
)

# Training variants: (method, targets). "builtin" is Keras's own
# `layer.enable_lora(rank)` on the same layers keras-lora adapts.
TRAIN_VARIANTS = {
    "keras-lora q/v": ("keras_lora", None),
    "keras built-in q/v": ("builtin", None),
    "full fine-tuning": ("full", None),
    "keras-lora all-linear": ("keras_lora", "all-linear"),
    "keras built-in all-linear": ("builtin", "all-linear"),
    "keras-lora DoRA q/v": ("keras_lora_dora", None),
}


def build_backbone(config, seed=0, dropout=0.1):
    """The GPT2Backbone of `config`, from `seed`."""
    import keras_hub

    keras.utils.set_random_seed(seed)
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=config["vocabulary_size"],
        num_layers=config["num_layers"],
        num_heads=config["num_heads"],
        hidden_dim=config["hidden_dim"],
        intermediate_dim=config["intermediate_dim"],
        max_sequence_length=config["sequence_length"],
        dropout=dropout,
    )


def build_classifier(config, seed=0, dropout=0.1):
    """A Functional model: GPT2Backbone -> mean pooling -> Dense(2)."""
    backbone = build_backbone(config, seed, dropout)
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
    sequence = backbone({"token_ids": token_ids, "padding_mask": padding_mask})
    pooled = keras.layers.GlobalAveragePooling1D(name="pool")(sequence)
    logits = keras.layers.Dense(2, name="head")(pooled)
    return keras.Model({"token_ids": token_ids, "padding_mask": padding_mask}, logits)


def make_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    shape = (config["batch_size"], config["sequence_length"])
    x = {
        "token_ids": rng.integers(0, config["vocabulary_size"], shape).astype("int32"),
        "padding_mask": np.ones(shape, "int32"),
    }
    y = rng.integers(0, 2, (config["batch_size"],)).astype("int32")
    return x, y


def target_layers(model, targets):
    """The layers keras-lora adapts for `targets` (used for the built-in too)."""
    from keras_lora import targets as targets_lib

    return targets_lib.match_layers(model, targets, "targets")


def apply_builtin_lora(model, layers, rank):
    """Keras's own LoRA on `layers`; everything else frozen except the head."""
    for layer in layers:
        layer.enable_lora(rank)
    lora_names = ("lora_kernel_a", "lora_kernel_b")
    head = model.get_layer("head")
    head_ids = {id(v) for v in head.weights}
    for variable in model.weights:
        variable.trainable = variable.name in lora_names or id(variable) in head_ids


def make_variant(method, targets, config, seed=0, dropout=0.1, jit_compile=True):
    """Builds one training variant, compiled with Adam (and XLA / torch.compile)."""
    model = build_classifier(config, seed, dropout)
    if method in ("keras_lora", "keras_lora_dora"):
        keras_lora.enable_lora(
            model,
            rank=config["rank"],
            targets=targets,
            train_layers=["head"],
            use_dora=method == "keras_lora_dora",
        )
    elif method == "builtin":
        layers = target_layers(model, targets)
        apply_builtin_lora(model, layers, config["rank"])
    elif method != "full":
        raise ValueError(f"Unknown method {method!r}")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
    )
    return model


def trainable_count(model):
    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


def compile_causal_lm(model, optimizer=None):
    """Compiles a KerasHub causal LM as its `fit` is benchmarked: KerasHub's
    loss (sparse cross-entropy on logits) and no metric.

    Args:
        optimizer: default `AdamW(1e-4)`.
    """
    model.compile(
        optimizer=optimizer or keras.optimizers.AdamW(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    return model
