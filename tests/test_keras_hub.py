"""`enable_lora` on real KerasHub backbones and task models built from tiny configs."""

import keras
import numpy as np
import pytest

import keras_lora
from helpers import (
    VOCAB,
    bert_batch,
    randomize_factors,
    tiny_bert_classifier,
    tiny_gpt2_causal_lm,
    to_numpy,
    token_batch,
)

keras_hub = pytest.importorskip("keras_hub")
kh = keras_hub.models

H, L, R = 32, 2, 4
COMMON = dict(vocabulary_size=VOCAB, num_layers=L, hidden_dim=H, intermediate_dim=64)
SEQ_LEN = dict(max_sequence_length=32)
# name: (class, config, extra inputs, paths that must be adapted, d_out of q+v)
ARCHITECTURES = {
    "gpt2": ("GPT2Backbone", dict(num_heads=2, **SEQ_LEN), {}, "self_attention/query", 2 * H),
    "bert": ("BertBackbone", dict(num_heads=2, **SEQ_LEN), {"segment_ids": 0}, "self_attention_layer/value", 2 * H),
    "roberta": ("RobertaBackbone", dict(num_heads=2, **SEQ_LEN), {}, "self_attention_layer/query", 2 * H),
    "distilbert": ("DistilBertBackbone", dict(num_heads=2, **SEQ_LEN), {}, "self_attention_layer/query", 2 * H),
    "llama": ("LlamaBackbone", dict(num_query_heads=4, num_key_value_heads=2), {}, "self_attention/value", H + H // 2),
    "mistral": ("MistralBackbone", dict(num_query_heads=4, num_key_value_heads=2), {}, "self_attention/query", H + H // 2),
    "gemma": ("GemmaBackbone", dict(num_query_heads=4, num_key_value_heads=1, head_dim=8), {}, "attention/query", H + 8),
    "qwen": ("QwenBackbone", dict(num_query_heads=4, num_key_value_heads=2), {}, "self_attention/query", H + H // 2),
    "falcon": ("FalconBackbone", dict(num_attention_heads=2), {}, "attention/query_dense", 2 * H),
    "bloom": ("BloomBackbone", dict(num_heads=2), {}, "self_attention/value_dense", 2 * H),
    "gpt_neox": ("GPTNeoXBackbone", dict(num_heads=2, **SEQ_LEN), {}, "self_attention/query_key_value", 3 * H),
}  # fmt: skip


def inputs_for(extra):
    x = token_batch()
    for name, value in extra.items():
        x[name] = np.full_like(x["token_ids"], value)
    return x


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_default_targets_on_backbones(arch):
    cls, config, extra, must_adapt, qv_out = ARCHITECTURES[arch]
    backbone = getattr(kh, cls)(**COMMON, **config)
    x = inputs_for(extra)
    base = to_numpy(backbone(x))
    keras_lora.enable_lora(backbone, rank=R)
    paths = [lyr.path for lyr in keras_lora.lora_layers(backbone)]
    assert any(p.endswith(must_adapt) for p in paths), paths
    # Query and value of every block (or the fused q/k/v matrix), and only them.
    assert len(paths) == L * (1 if arch == "gpt_neox" else 2)
    trainable, _, _ = keras_lora.trainable_summary(backbone)
    # Paper formula: r·(d_in + d_out) per matrix; d_in = hidden for q/k/v.
    n_matrices = 1 if arch == "gpt_neox" else 2
    assert trainable == L * R * (n_matrices * H + qv_out)
    np.testing.assert_array_equal(to_numpy(backbone(x)), base)
    randomize_factors(backbone)
    adapted = to_numpy(backbone(x))
    assert not np.allclose(adapted, base, atol=1e-4)
    keras_lora.merge_lora(backbone)
    np.testing.assert_allclose(to_numpy(backbone(x)), adapted, rtol=1e-4, atol=1e-4)


def test_all_linear_stays_inside_the_backbone():
    model = tiny_bert_classifier()
    keras_lora.enable_lora(model, rank=2, targets="all-linear", train_layers=["logits"])
    paths = [lyr.path for lyr in keras_lora.lora_layers(model)]
    assert "logits" not in paths
    assert len(paths) == L * 6 + 1  # q, k, v, out, ffn in/out per block + pooler
    assert {v.path for v in model.trainable_weights} >= {"logits/kernel", "logits/bias"}


def test_token_embedding_target_adapts_tied_output_projection():
    model = tiny_gpt2_causal_lm()
    x = token_batch()
    keras_lora.enable_lora(model, rank=2, targets=["token_embedding"])
    layer = keras_lora.lora_layers(model)[0]
    assert layer.path == "token_embedding"
    randomize_factors(model)
    adapted = to_numpy(model(x))
    keras_lora.merge_lora(model)
    np.testing.assert_allclose(to_numpy(model(x)), adapted, rtol=1e-4, atol=1e-4)


def lm_data(n=8, seed=0):
    x = token_batch(n, seed=seed)
    y = np.roll(x["token_ids"], -1, axis=1)
    return x, y


def test_gpt2_causal_lm_fit_jit_compile_lowers_loss():
    # One block: torch.compile (jit_compile on torch) is slow on CPU.
    model = tiny_gpt2_causal_lm(num_layers=1)
    keras_lora.enable_lora(model, rank=4)
    x, y = lm_data()
    model.compile(
        optimizer=keras.optimizers.Adam(5e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
    )
    kernel = model.backbone.get_layer("transformer_layer_0")._self_attention_layer
    kernel = to_numpy(kernel._query_dense.kernel).copy()
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    attention = model.backbone.get_layer("transformer_layer_0")._self_attention_layer
    np.testing.assert_array_equal(to_numpy(attention._query_dense.kernel), kernel)


def test_bert_classifier_mixed_bfloat16_fit():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = tiny_bert_classifier()
        keras_lora.enable_lora(model, rank=4, train_layers=["logits"])
        for layer in keras_lora.lora_layers(model):
            assert layer.lora_b.dtype == "float32"
            assert layer.compute_dtype == "bfloat16"
        x = bert_batch(8)
        y = np.array([0, 1] * 4)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        before = to_numpy(keras_lora.lora_layers(model)[0].lora_b).copy()
        history = model.fit(x, y, epochs=3, batch_size=4, verbose=0)
        assert np.isfinite(history.history["loss"]).all()
        after = to_numpy(keras_lora.lora_layers(model)[0].lora_b)
        assert not np.array_equal(before, after)
    finally:
        keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize(
    "name, cls, layers, hidden, heads, rank, expected",
    [
        ("RoBERTa base", "RobertaBackbone", 12, 768, 12, 8, 294_912),
        ("RoBERTa large", "RobertaBackbone", 24, 1024, 16, 8, 786_432),
        ("GPT-2 medium", "GPT2Backbone", 24, 1024, 16, 4, 393_216),
        ("GPT-2 large", "GPT2Backbone", 36, 1280, 20, 4, 737_280),
    ],
)
def test_paper_trainable_counts(name, cls, layers, hidden, heads, rank, expected):
    # Real attention sizes (all that q/v LoRA sees); a tiny vocabulary,
    # sequence and MLP, and bfloat16 weights (the factors stay float32): at
    # real size, GPT-2 large alone took 2.8 GB of the suite's memory.
    backbone = getattr(kh, cls)(
        vocabulary_size=8,
        num_layers=layers,
        num_heads=heads,
        hidden_dim=hidden,
        intermediate_dim=8,
        max_sequence_length=8,
        dtype="bfloat16",
    )
    keras_lora.enable_lora(backbone, rank=rank)
    trainable, _, _ = keras_lora.trainable_summary(backbone)
    assert trainable == expected, name
