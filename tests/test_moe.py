"""LoRA on mixture-of-experts backbones: the expert weights are adapted.

Tiny KerasHub Mixtral, Qwen3-MoE and GPT-OSS backbones, built from configs.
Their experts are raw (experts, d_in, d_out) variables of an expert bank,
not Dense layers (issue 23: they used to be skipped silently).
"""

import contextlib

import keras
import keras_hub
import numpy as np
import pytest
from keras.src.initializers import random_initializers

import keras_lora
from helpers import randomize_factors, to_numpy, token_batch
from keras_lora.layers import expert_recipes
from keras_lora.layers.expert_einsum import LoRAExpertEinsum
from keras_lora.layers.expert_recipes import Recipe

EXPERTS, HIDDEN, INTERMEDIATE, RANK = 4, 16, 8, 2
# (architecture, expert weights per block, router Dense name)
ARCHITECTURES = {
    "mixtral": (3, "sparse_feedforward_gate_dense"),
    "qwen3_moe": (2, "sparse_feedforward_gate_dense"),
    "gpt_oss": (2, "router_dense"),
}


@contextlib.contextmanager
def numpy_initial_values(seed):
    """Random initializers draw from NumPy (the same distributions, seeded).

    On JAX each new weight shape would compile its own random sampler: 8 s
    for the first tiny GPT-OSS backbone on CPU, 0.5 s this way.
    """
    module = random_initializers.random  # the backend's `random` module
    rng = np.random.default_rng(seed)

    def tensor(value, dtype):
        return keras.ops.convert_to_tensor(value.astype("float32"), dtype=dtype)

    def normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
        return tensor(rng.normal(mean, stddev, shape), dtype)

    def truncated_normal(shape, mean=0.0, stddev=1.0, dtype=None, seed=None):
        x = rng.normal(0.0, 1.0, shape)
        while (outside := np.abs(x) > 2).any():  # Keras truncates at 2 stddev
            x[outside] = rng.normal(0.0, 1.0, outside.sum())
        return tensor(mean + stddev * x, dtype)

    def uniform(shape, minval=0.0, maxval=1.0, dtype=None, seed=None):
        return tensor(rng.uniform(minval, maxval, shape), dtype)

    samplers = {"normal": normal, "truncated_normal": truncated_normal}
    samplers["uniform"] = uniform
    saved = {name: getattr(module, name) for name in samplers}
    try:
        for name, sampler in samplers.items():
            setattr(module, name, sampler)
        yield
    finally:
        for name, sampler in saved.items():
            setattr(module, name, sampler)


def tiny_moe(kind, seed=0):
    keras.utils.set_random_seed(seed)
    with numpy_initial_values(seed):
        return _tiny_moe(kind)


def _tiny_moe(kind):
    common = dict(
        vocabulary_size=64,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=HIDDEN,
        intermediate_dim=INTERMEDIATE,
        num_experts=EXPERTS,
        top_k=2,
    )
    if kind == "mixtral":
        return keras_hub.models.MixtralBackbone(**common, sliding_window=8)
    if kind == "qwen3_moe":
        return keras_hub.models.Qwen3MoeBackbone(
            **common, moe_intermediate_dim=INTERMEDIATE, head_dim=8
        )
    return keras_hub.models.GptOssBackbone(**common, head_dim=8)


def expert_layers(model):
    return [
        lyr
        for lyr in keras_lora.lora_layers(model)
        if isinstance(lyr, LoRAExpertEinsum)
    ]


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_all_linear_adapts_every_expert_and_round_trips(kind, tmp_path):
    per_block, router = ARCHITECTURES[kind]
    x = token_batch(batch=2, seq=6)
    backbone = tiny_moe(kind)
    base = to_numpy(backbone(x))
    keras_lora.enable_lora(backbone, rank=RANK, targets="all-linear")

    experts = expert_layers(backbone)
    assert len(experts) == per_block
    for layer in experts:  # one pair of factors per expert, computed factored
        assert layer.factored
        e, d_in, d_out = layer.lora_base_kernel.shape
        assert layer.lora_a.shape == (e, d_in, RANK) == (EXPERTS, d_in, RANK)
        assert layer.lora_b.shape == (EXPERTS, RANK, d_out)
    adapted = {lyr.name for lyr in keras_lora.lora_layers(backbone)}
    assert router not in adapted  # routing stays the base model's
    np.testing.assert_array_equal(to_numpy(backbone(x)), base)  # B = 0

    randomize_factors(backbone)
    live = to_numpy(backbone(x))
    assert np.abs(live - base).max() > 1e-2
    keras_lora.save_adapter(backbone, tmp_path / "adapter.keras")
    keras_lora.export_merged(backbone, tmp_path / "merged.keras")
    backbone.save(tmp_path / "model.keras")

    # The adapter onto a fresh backbone (its MoE blocks get other auto names).
    fresh = tiny_moe(kind)
    keras_lora.enable_lora(fresh, rank=RANK, targets="all-linear")
    keras_lora.load_adapter(fresh, tmp_path / "adapter.keras")
    np.testing.assert_allclose(to_numpy(fresh(x)), live, atol=1e-5)
    # The merged file is a plain KerasHub backbone.
    plain = keras.saving.load_model(tmp_path / "merged.keras")
    assert not keras_lora.lora_layers(plain)
    assert type(plain.transformer_layers[0]) is type(backbone.transformer_layers[0])
    np.testing.assert_allclose(to_numpy(plain(x)), live, atol=1e-4)
    # A whole-model save resumes with its factors.
    resumed = keras.saving.load_model(tmp_path / "model.keras")
    assert len(expert_layers(resumed)) == per_block
    np.testing.assert_allclose(to_numpy(resumed(x)), live, atol=1e-5)
    # merge_lora folds the updates into the expert weights and leaves no trace.
    keras_lora.merge_lora(backbone)
    assert not keras_lora.lora_layers(backbone)
    names = [v.name for v in backbone.weights]
    assert not [n for n in names if "lora" in n]
    np.testing.assert_allclose(to_numpy(backbone(x)), live, atol=1e-4)


def test_fit_trains_only_the_expert_factors():
    backbone = tiny_moe("mixtral")
    keras_lora.enable_lora(backbone, rank=RANK, targets="all-linear")
    frozen = {v.path: to_numpy(v) for v in backbone.weights if not v.trainable}
    experts = expert_layers(backbone)
    start = [to_numpy(layer.lora_b) for layer in experts]
    per_expert = (HIDDEN * RANK + RANK * INTERMEDIATE) * 2 + (
        INTERMEDIATE * RANK + RANK * HIDDEN
    )
    sizes = [np.prod(lyr.lora_a.shape) + np.prod(lyr.lora_b.shape) for lyr in experts]
    assert sum(sizes) == (EXPERTS * per_expert)
    model = keras.Model(backbone.input, keras.layers.Dense(1)(backbone.output))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x = token_batch(batch=2, seq=6)
    history = model.fit(x, np.ones((2, 6, 1)), epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    for variable in backbone.weights:
        if variable.path in frozen:  # the expert weights above all
            np.testing.assert_array_equal(to_numpy(variable), frozen[variable.path])
    for layer, b0 in zip(experts, start):
        assert np.abs(to_numpy(layer.lora_b) - b0).max() > 0


def test_named_adapters_and_disable_lora_on_experts():
    x = token_batch(batch=2, seq=6)
    backbone = tiny_moe("qwen3_moe")
    base = to_numpy(backbone(x))
    keras_lora.enable_lora(backbone, rank=RANK, targets=[".*experts/.*"])
    assert len(keras_lora.lora_layers(backbone)) == 2  # named like layers
    keras_lora.add_adapter(backbone, "other", rank=1, targets=[".*experts/.*"])
    randomize_factors(backbone)
    keras_lora.set_adapter(backbone, "other")
    other = to_numpy(backbone(x))
    keras_lora.set_adapter(backbone, "default")
    default = to_numpy(backbone(x))
    assert np.abs(other - default).max() > 1e-3
    with keras_lora.disable_lora(backbone):
        np.testing.assert_allclose(to_numpy(backbone(x)), base, atol=1e-6)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        with keras_lora.adapter_ids(backbone, ["default", "other"]):
            pass


class RawExperts(keras.layers.Layer):
    """A user's expert bank keras-lora does not know: the generic path."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(3, input_shape[-1], 5), name="expert_w")

    def call(self, x):
        return keras.ops.sum(keras.ops.einsum("bh,ehm->bem", x, self.w), axis=1)


def test_generic_path_and_refusals():
    inputs = keras.Input((4,))
    outputs = RawExperts(name="bank")(keras.layers.Dense(4, name="proj")(inputs))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(0).normal(size=(2, 4)).astype("float32")
    with pytest.warns(UserWarning, match="bank/expert_w"):  # never skipped silently
        keras_lora.enable_lora(model, rank=2, targets="all-linear")
    keras_lora.merge_lora(model)
    with pytest.raises(ValueError, match="dropout"):
        keras_lora.enable_lora(model, rank=2, targets=["bank/expert_w"], dropout=0.1)
    assert not keras_lora.lora_layers(model)  # nothing half done
    with pytest.raises(ValueError, match="DoRA"):
        keras_lora.enable_lora(model, rank=2, targets=["bank/expert_w"], use_dora=True)
    keras_lora.enable_lora(model, rank=2, targets=["bank/expert_w"])
    (layer,) = keras_lora.lora_layers(model)
    assert not layer.factored and layer.lora_a.shape == (3, 4, 2)
    randomize_factors(model)
    w = to_numpy(layer.lora_base_kernel)
    update = np.einsum("ehr,erm->ehm", to_numpy(layer.lora_a), to_numpy(layer.lora_b))
    hidden = to_numpy(model.get_layer("proj")(x))
    expected = np.einsum("bh,ehm->bem", hidden, w + layer.lora_scale * update).sum(1)
    np.testing.assert_allclose(to_numpy(model(x)), expected, rtol=1e-5, atol=1e-5)


def test_a_recipe_that_does_not_match_its_bank_falls_back(monkeypatch):
    # A KerasHub release may change a bank's `call`: keras-lora checks its
    # copy first and uses the generic path (still exact) when they differ.
    def wrong_call(bank, x, project):
        return 2.0 * keras.ops.sum(project("w", x), axis=1)

    key = expert_recipes.class_key(RawExperts)
    monkeypatch.setitem(
        expert_recipes.RECIPES, key, Recipe({"w": "bh,ehm->bem"}, wrong_call)
    )
    inputs = keras.Input((4,))
    model = keras.Model(inputs, RawExperts(name="bank")(inputs))
    x = np.ones((2, 4), "float32")
    base = to_numpy(model(x))
    with pytest.warns(UserWarning, match="generic LoRA path"):
        keras_lora.enable_lora(model, rank=2, targets="all-linear")
    (layer,) = keras_lora.lora_layers(model)
    assert not layer.factored
    np.testing.assert_array_equal(to_numpy(model(x)), base)


def test_quantize_names_the_expert_weights_it_leaves_float():
    backbone = tiny_moe("mixtral")
    keras_lora.enable_lora(backbone, rank=RANK, targets="all-linear")
    with pytest.warns(
        UserWarning, match="expert_feedforward_gate_dense' is not quantized"
    ):
        backbone.quantize("int8")
    modes = {
        type(lyr).__name__: lyr.quantization_mode
        for lyr in keras_lora.lora_layers(backbone)
    }
    assert modes == {"LoRAExpertEinsum": None, "LoRAEinsumDense": "int8"}
