"""Every LoRA layer type against its base class and a NumPy reference."""

import math

import keras
import numpy as np
import pytest

import keras_lora
from helpers import randomize_factors, to_numpy
from keras_lora.layers.einsum_dense import split_einsum_equation

# (equation, output_shape, input shape): the KerasHub projections, a grouped
# equation and an ellipsis one.
EQUATIONS = [
    ("abc,cde->abde", (None, 4, 6), (2, 5, 16)),  # GPT-2/BERT q/k/v
    ("abcd,cde->abe", (None, 16), (2, 5, 4, 6)),  # GPT-2/BERT output
    ("btd,ndh->btnh", (None, 4, 6), (2, 5, 16)),  # Gemma query
    ("bsd,kdh->bskh", (None, 2, 6), (2, 5, 16)),  # Gemma key/value
    ("btnh,nhd->btd", (None, 16), (2, 5, 4, 6)),  # Gemma output
    ("btd,df->btf", (None, 24), (2, 5, 16)),  # Gemma FFN
    ("bqm,muh->bquh", (None, 4, 6), (2, 5, 16)),  # Llama query
    ("bquh,uhm->bqm", (None, 16), (2, 5, 4, 6)),  # Llama output
    ("bnsd,ndh->bnsh", (3, None, 6), (2, 3, 5, 16)),  # grouped: per-head pair
    ("...b,bc->...c", 12, (2, 5, 16)),  # ellipsis
]


def einsum_layers(equation, output_shape, rank=3, **kwargs):
    base = keras.layers.EinsumDense(equation, output_shape, bias_axes=None)
    lora = keras_lora.LoRAEinsumDense(equation, output_shape, rank=rank, **kwargs)
    return base, lora


def reference_delta(layer):
    """ΔW in kernel layout, built with NumPy reshapes only (no einsum)."""
    split = split_einsum_equation(layer.equation)
    kernel_axes = split["kernel"]
    a, b = to_numpy(layer.lora_a), to_numpy(layer.lora_b)
    groups = len(split["group_axes"])
    group_shape = a.shape[:groups]
    n_groups = math.prod(group_shape)
    a = a.reshape(n_groups, -1, layer.rank)
    b = b.reshape(n_groups, layer.rank, -1)
    delta = np.matmul(a, b)  # (groups, d_in, d_out)
    in_shape = to_numpy(layer.lora_a).shape[groups:-1]
    out_shape = to_numpy(layer.lora_b).shape[groups + 1 :]
    delta = delta.reshape(*group_shape, *in_shape, *out_shape)
    layout = split["group_axes"] + split["input_axes"] + split["output_axes"]
    return np.transpose(delta, [layout.index(c) for c in kernel_axes])


@pytest.mark.parametrize("equation, output_shape, input_shape", EQUATIONS)
def test_einsum_fresh_layer_equals_base_and_reference(
    equation, output_shape, input_shape
):
    base, lora = einsum_layers(equation, output_shape, alpha=6.0)
    x = np.random.default_rng(0).normal(size=input_shape).astype("float32")
    base.build(input_shape)
    lora.build(input_shape)
    lora.kernel.assign(base.kernel)
    np.testing.assert_array_equal(to_numpy(lora(x)), to_numpy(base(x)))

    randomize_factors(lora)
    w = to_numpy(lora.kernel) + lora.lora_scale * reference_delta(lora)
    expected = np.einsum(equation, x, w)
    np.testing.assert_allclose(to_numpy(lora(x)), expected, rtol=1e-5, atol=1e-5)
    # The shared merge function gives the same kernel.
    np.testing.assert_allclose(to_numpy(lora.merged_kernel()), w, rtol=1e-5, atol=1e-6)
    # Paper parameter count: r·(d_in + d_out) per group.
    split = split_einsum_equation(equation)
    sizes = dict(zip(split["kernel"], lora.kernel.shape))
    d_in = math.prod(sizes[c] for c in split["input_axes"])
    d_out = math.prod(sizes[c] for c in split["output_axes"])
    groups = math.prod(sizes[c] for c in split["group_axes"])
    n_params = math.prod(lora.lora_a.shape) + math.prod(lora.lora_b.shape)
    assert n_params == groups * lora.rank * (d_in + d_out)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
def test_dense_matches_numpy_reference(use_bias, rslora):
    x = np.random.default_rng(1).normal(size=(3, 7, 16)).astype("float32")
    base = keras.layers.Dense(12, activation="tanh", use_bias=use_bias)
    lora = keras_lora.LoRADense(
        12, rank=4, alpha=8, use_rslora=rslora, activation="tanh", use_bias=use_bias
    )
    base.build(x.shape)
    lora.build(x.shape)
    for target, source in zip(lora.weights, base.weights):
        target.assign(source)
    np.testing.assert_array_equal(to_numpy(lora(x)), to_numpy(base(x)))

    randomize_factors(lora)
    w, a, b = (to_numpy(v) for v in (lora.kernel, lora.lora_a, lora.lora_b))
    s = 8 / (2.0 if rslora else 4.0)
    pre = x @ w + s * (x @ a) @ b
    if use_bias:
        bias = np.random.default_rng(2).normal(size=12).astype("float32")
        lora.bias.assign(bias)
        pre = pre + bias
    np.testing.assert_allclose(to_numpy(lora(x)), np.tanh(pre), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        to_numpy(lora.merged_kernel()), w + s * a @ b, rtol=1e-5, atol=1e-6
    )


def test_embedding_matches_numpy_reference():
    ids = np.array([[1, 5, 9], [0, 2, 2]])
    base = keras.layers.Embedding(10, 8)
    lora = keras_lora.LoRAEmbedding(10, 8, rank=3, alpha=6)
    base.build()
    lora.build()
    lora.embeddings.assign(base.embeddings)
    np.testing.assert_array_equal(to_numpy(lora(ids)), to_numpy(base(ids)))
    randomize_factors(lora)
    e, a, b = (to_numpy(v) for v in (lora.embeddings, lora.lora_a, lora.lora_b))
    expected = e[ids] + 2.0 * a[ids] @ b
    np.testing.assert_allclose(to_numpy(lora(ids)), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        to_numpy(lora.merged_kernel()), e + 2.0 * a @ b, rtol=1e-5
    )


@pytest.mark.parametrize("tie_weights", [True, False])
def test_reversible_embedding_tied_projection_uses_the_update(tie_weights):
    keras_hub = pytest.importorskip("keras_hub")
    from keras_lora.transform import lora_class_for

    layer = keras_hub.layers.ReversibleEmbedding(10, 8, tie_weights=tie_weights)
    layer.build()
    ids = np.array([[1, 5, 9]])
    hidden = np.random.default_rng(0).normal(size=(1, 3, 8)).astype("float32")
    base_logits = to_numpy(layer(hidden, reverse=True))
    lora_class_for(layer).adapt(layer, rank=2)
    randomize_factors(layer)
    merged = to_numpy(layer.merged_kernel())
    np.testing.assert_allclose(to_numpy(layer(ids)), merged[ids], rtol=1e-5, atol=1e-6)
    logits = to_numpy(layer(hidden, reverse=True))
    if tie_weights:
        # Exactly the merged table's projection, so merging changes nothing.
        np.testing.assert_allclose(logits, hidden @ merged.T, rtol=1e-5, atol=1e-5)
    else:
        # Untied: the separate output projection is frozen and untouched.
        np.testing.assert_array_equal(logits, base_logits)
    assert [v.name for v in layer.trainable_weights] == ["lora_a", "lora_b"]


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: keras_lora.LoRADense(8, rank=2), np.ones((2, 4), "float32")),
        (
            lambda: keras_lora.LoRAEinsumDense("abc,cd->abd", (None, 8), rank=2),
            np.ones((2, 3, 4), "float32"),
        ),
        (lambda: keras_lora.LoRAEmbedding(10, 4, rank=2), np.array([[1, 2]])),
    ],
)
def test_factors_and_frozen_base(make, x):
    layer = make()
    layer(x)
    assert [v.name for v in layer.trainable_weights] == ["lora_a", "lora_b"]
    assert all(not v.trainable for v in layer.non_trainable_weights)
    assert layer.lora_a.dtype == "float32" and layer.lora_b.dtype == "float32"
    # `kernel` is the frozen base variable itself, never a merged tensor.
    kernel = getattr(layer, "kernel", None)
    if kernel is None:
        kernel = layer.embeddings
    assert isinstance(kernel, keras.Variable) and not kernel.trainable


def test_is_instance_of_base_class():
    assert isinstance(keras_lora.LoRADense(4), keras.layers.Dense)
    assert isinstance(
        keras_lora.LoRAEinsumDense("ab,bc->ac", 4), keras.layers.EinsumDense
    )
    assert isinstance(keras_lora.LoRAEmbedding(4, 4), keras.layers.Embedding)


def test_dropout_only_in_training_and_only_on_the_lora_path():
    layer = keras_lora.LoRADense(16, rank=4, dropout=0.5)
    x = np.random.default_rng(0).normal(size=(64, 16)).astype("float32")
    layer.build(x.shape)
    base_part = x @ to_numpy(layer.kernel) + to_numpy(layer.bias)
    # B = 0: the LoRA path is zero, so training output is the base output
    # exactly; dropout never touches the base path.
    np.testing.assert_allclose(
        to_numpy(layer(x, training=True)), base_part, rtol=1e-5, atol=1e-5
    )
    randomize_factors(layer)
    inference = to_numpy(layer(x))
    np.testing.assert_array_equal(inference, to_numpy(layer(x, training=False)))
    first, second = (to_numpy(layer(x, training=True)) for _ in range(2))
    assert not np.allclose(first, inference, atol=1e-3)
    assert not np.allclose(first, second, atol=1e-3)  # a fresh mask each call
