import keras
import numpy as np
import pytest

import keras_lora
from keras_lora.layers import lora_math
from keras_lora.layers.einsum_dense import split_einsum_equation


@pytest.mark.parametrize("rank", [0, -1, 2.5, "4", True, None])
def test_rank_must_be_positive_int(rank):
    with pytest.raises(ValueError, match=r"`rank` must be a positive integer.*rank="):
        keras_lora.LoRADense(4, rank=rank)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), "8", True])
def test_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match=r"`alpha` must be a positive number.*alpha="):
        keras_lora.LoRAEinsumDense("ab,bc->ac", output_shape=4, alpha=alpha)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, "0.1"])
def test_dropout_must_be_in_unit_interval(dropout):
    with pytest.raises(
        ValueError, match=r"`dropout` must be a float in \[0, 1\).*dropout="
    ):
        keras_lora.LoRAEmbedding(10, 4, rank=2, dropout=dropout)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (lambda: keras_lora.LoRADense(4, rank=5), (2, 16)),
        (lambda: keras_lora.LoRADense(16, rank=5), (2, 4)),
        (
            lambda: keras_lora.LoRAEinsumDense("abc,cde->abde", (None, 2, 2), rank=5),
            (2, 3, 8),
        ),
        (lambda: keras_lora.LoRAEmbedding(3, 16, rank=4), None),
    ],
)
def test_rank_larger_than_matrix_is_rejected_at_build(layer, shape):
    layer = layer()
    with pytest.raises(
        ValueError, match=r"`rank` must be at most min\(d_in, d_out\).*rank="
    ):
        layer.build(shape)


@pytest.mark.parametrize(
    "equation",
    [
        "abc,cd",
        "abc,cd->abd->x",
        "ab,bc->abc",
        "abc,c->abc",
        "ab,bcd->a",
        "abc,bb->ac",
        42,
    ],
)
def test_unsupported_equation(equation):
    with pytest.raises(ValueError, match=r"`equation`.*Received: equation="):
        keras_lora.LoRAEinsumDense(equation, output_shape=4)


def test_use_rslora_must_be_bool():
    with pytest.raises(ValueError, match="use_rslora"):
        keras_lora.LoRADense(4, use_rslora="yes")


def test_keras_builtin_lora_rank_is_refused():
    with pytest.raises(ValueError, match="lora_rank"):
        keras_lora.LoRADense(4, lora_rank=2)


@pytest.mark.parametrize(
    "rank, alpha, rslora, expected",
    [
        (8, None, False, 1.0),
        (4, 8, False, 2.0),
        (16, 8, True, 2.0),
        (4, None, True, 2.0),
    ],
)
def test_scale(rank, alpha, rslora, expected):
    layer = keras_lora.LoRADense(32, rank=rank, alpha=alpha, use_rslora=rslora)
    assert layer.lora_scale == pytest.approx(expected)


def test_split_grouped_equation():
    split = split_einsum_equation("bnsd,ndh->bnsh")
    assert split["group_axes"] == ["n"]
    assert split["input_axes"] == ["d"]
    assert split["output_axes"] == ["h"]
    assert split["merge"] == "nda,nah->ndh"


def test_merged_kernel_is_float32_maths_cast_to_kernel_dtype():
    kernel = keras.ops.cast(np.ones((4, 3)), "bfloat16")
    a = np.full((4, 2), 0.5, "float32")
    b = np.full((2, 3), 0.25, "float32")
    merged = lora_math.merged_kernel(kernel, a, b, "ir,ro->io", 2.0)
    assert keras.backend.standardize_dtype(merged.dtype) == "bfloat16"
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.ops.cast(merged, "float32")), 1.5
    )
