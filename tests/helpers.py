"""Small real models and NumPy helpers shared by the tests."""

import keras
import numpy as np

VOCAB = 64
SEQ = 8


def to_numpy(x):
    """A tensor as NumPy; a dict of outputs (BERT) as its flattened values."""
    if isinstance(x, dict):
        return np.concatenate([to_numpy(x[k]).reshape(-1) for k in sorted(x)])
    return np.asarray(keras.ops.convert_to_numpy(x))


def randomize_factors(model_or_layer, seed=0):
    """Gives every LoRA factor random non-zero values (fresh B is zero)."""
    from keras_lora import lora_layers

    layers = (
        [model_or_layer]
        if hasattr(model_or_layer, "lora_a")
        else lora_layers(model_or_layer)
    )
    rng = np.random.default_rng(seed)
    for layer in layers:
        for factor in (layer.lora_a, layer.lora_b):
            factor.assign(rng.normal(0, 0.2, factor.shape).astype("float32"))


def token_batch(batch=2, seq=SEQ, vocab=VOCAB, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "token_ids": rng.integers(1, vocab, (batch, seq)).astype("int32"),
        "padding_mask": np.ones((batch, seq), "int32"),
    }


def tiny_gpt2_backbone(num_layers=2, hidden=32):
    import keras_hub

    return keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB,
        num_layers=num_layers,
        num_heads=2,
        hidden_dim=hidden,
        intermediate_dim=2 * hidden,
        max_sequence_length=32,
    )


def tiny_llama3_backbone():
    """One block, 4 query and 2 key/value heads, hidden 32 (PEFT interop)."""
    import keras_hub

    return keras_hub.models.Llama3Backbone(
        vocabulary_size=64,
        num_layers=1,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=32,
        intermediate_dim=48,
    )


def tiny_gpt2_causal_lm(num_layers=2):
    import keras_hub

    return keras_hub.models.GPT2CausalLM(
        backbone=tiny_gpt2_backbone(num_layers), preprocessor=None
    )


def tiny_bert_classifier(num_classes=2, dropout=0.1, hidden=32):
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_heads=2,
        hidden_dim=hidden,
        intermediate_dim=64,
        max_sequence_length=32,
        dropout=dropout,
    )
    return keras_hub.models.BertTextClassifier(
        backbone=backbone, num_classes=num_classes, preprocessor=None, dropout=dropout
    )


def bert_batch(batch=4, seed=0):
    x = token_batch(batch, seed=seed)
    x["segment_ids"] = np.zeros_like(x["token_ids"])
    return x
