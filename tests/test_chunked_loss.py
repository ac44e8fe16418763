"""`use_chunked_loss`: the causal-LM loss in chunks of tokens, in `model.fit`."""

import keras
import numpy as np
import pytest

import keras_lora
from helpers import randomize_factors, tiny_gpt2_causal_lm, to_numpy, token_batch


def _model(mode, chunk_size=None, seed=0):
    import keras_hub

    keras.utils.set_random_seed(seed)
    # No dropout: torch draws it from one global generator, so two models
    # would not drop the same units.
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=64,
        num_layers=1,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=32,
        dropout=0.0,
    )
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    if mode:
        model.quantize(mode)
    keras_lora.enable_lora(model, rank=2)
    randomize_factors(model, seed=1)
    # KerasHub's own loss and accuracy metric.
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    if chunk_size:
        keras_lora.use_chunked_loss(model, chunk_size=chunk_size)
    return model


def _batch():
    x = token_batch(batch=2)
    x["padding_mask"][1, -3:] = 0  # weights that are not all one
    y = np.roll(x["token_ids"], -1, axis=1)
    return x, y, x["padding_mask"].astype("float32")


def _factors(model):
    return {v.path: to_numpy(v) for v in model.trainable_weights}


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_same_loss_and_gradients_as_the_plain_loss(mode):
    x, y, weights = _batch()
    plain, chunked = _model(mode), _model(mode, chunk_size=5)  # 8 positions: 5 and 3
    before = _factors(plain)
    assert before.keys() == _factors(chunked).keys()
    logs = plain.train_on_batch(x, y, sample_weight=weights, return_dict=True)
    chunked_logs = chunked.train_on_batch(x, y, sample_weight=weights, return_dict=True)
    np.testing.assert_allclose(chunked_logs["loss"], logs["loss"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        chunked_logs["sparse_categorical_accuracy"],
        logs["sparse_categorical_accuracy"],
        atol=1e-6,
    )
    # SGD: the step is -0.1 x the gradient.
    after, chunked_after = _factors(plain), _factors(chunked)
    for path, value in before.items():
        gradient = (value - after[path]) / 0.1
        chunked_gradient = (value - chunked_after[path]) / 0.1
        assert np.abs(gradient).max() > 0, path
        np.testing.assert_allclose(chunked_gradient, gradient, atol=1e-4, err_msg=path)
    if not mode:
        # Outside `fit`, the model is what it was (`use_chunked_loss` changes
        # the model's `call` alike on every base: checked once, on the float
        # one; an eager call of a quantized GPT-2 costs seconds on JAX).
        np.testing.assert_allclose(to_numpy(chunked(x)), to_numpy(plain(x)), atol=1e-5)
    # On int8/int4 bases the tied quantized logits pass a gradient: every
    # factor's gradient above is non-zero and equals the plain loss's, so LoRA
    # below the logits learns (a further `fit` here cost ~8 s a mode on JAX).


def test_clear_errors():
    model = tiny_gpt2_causal_lm(num_layers=1)
    with pytest.raises(ValueError, match="chunk_size=0"):
        keras_lora.use_chunked_loss(model, chunk_size=0)
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="KerasHub `CausalLM`"):
        keras_lora.use_chunked_loss(dense)
    keras_lora.use_chunked_loss(model)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy())
    x, y, _ = _batch()
    with pytest.raises(ValueError, match="SparseCategoricalCrossentropy"):
        model.train_on_batch(x, y)
