"""`rank_pattern` / `alpha_pattern`: per-layer ranks and alphas with PEFT's rule."""

import os

import numpy as np
import pytest

import keras_lora
from helpers import randomize_factors, tiny_gpt2_backbone, to_numpy, token_batch
from keras_lora import patterns
from keras_lora.interop import peft_config

Q0 = "transformer_layer_0/self_attention/query"
Q1 = "transformer_layer_1/self_attention/query"
V0 = "transformer_layer_0/self_attention/value"
V1 = "transformer_layer_1/self_attention/value"


def _layer(model, path):
    return next(lyr for lyr in keras_lora.lora_layers(model) if lyr.path == path)


def test_per_layer_ranks_and_alphas_in_layers_and_spec():
    backbone = tiny_gpt2_backbone(num_layers=2, hidden=16)
    keras_lora.enable_lora(
        backbone,
        rank=2,
        alpha=4.0,
        # A whole path, a last component, and the first match wins (dict order).
        rank_pattern={Q1: 4, "value": 3, ".*query": 1},
        alpha_pattern={"transformer_layer_0/.*": 8.0},
    )
    got = {
        lyr.path: (lyr.rank, lyr.alpha, tuple(lyr.lora_a.shape))
        for lyr in keras_lora.lora_layers(backbone)
    }
    assert got == {
        Q0: (1, 8.0, (16, 1)),
        V0: (3, 8.0, (16, 3)),
        Q1: (4, 4.0, (16, 4)),
        V1: (3, 4.0, (16, 3)),
    }
    layers = backbone._keras_lora_spec["layers"]
    assert {p: (c["rank"], c["alpha"]) for p, c in layers.items()} == {
        Q0: (1, 8.0),
        V0: (3, 8.0),
        Q1: (4, 4.0),
        V1: (3, 4.0),
    }
    assert _layer(backbone, Q0).lora_scale == 8.0


def test_alpha_none_follows_each_layers_rank():
    backbone = tiny_gpt2_backbone(num_layers=1, hidden=16)
    keras_lora.enable_lora(backbone, rank=2, rank_pattern={"query": 4})
    assert _layer(backbone, Q0).rank == 4
    assert [lyr.lora_scale for lyr in keras_lora.lora_layers(backbone)] == [1.0, 1.0]


def test_a_key_matches_whole_components_only():
    # PEFT's rule: "uery" is not a suffix after a separator, so it matches
    # nothing, and a key that adapts nothing is an error, not silence.
    backbone = tiny_gpt2_backbone(num_layers=1, hidden=16)
    with pytest.raises(ValueError, match="`rank_pattern` key 'uery' matches none"):
        keras_lora.enable_lora(backbone, rank=2, rank_pattern={"uery": 4})
    assert not keras_lora.lora_layers(backbone)
    assert patterns.pattern_value({"uery": 4}, Q0, 2, "/") == 2
    assert patterns.pattern_value({"self_attention/query": 4}, Q0, 2, "/") == 4
    assert patterns.pattern_value({"attention/query": 4}, Q0, 2, "/") == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank_pattern": {"que(ry": 4}}, "`rank_pattern` key 'que\\(ry' is not a"),
        ({"alpha_pattern": {"[": 4.0}}, "`alpha_pattern` key '\\[' is not a"),
        ({"rank_pattern": {"query": 0}}, "rank_pattern\\['query'\\]"),
        ({"rank_pattern": {"query": 2.5}}, "rank_pattern\\['query'\\]"),
        ({"alpha_pattern": {"query": -1}}, "alpha_pattern\\['query'\\]"),
        ({"rank_pattern": ["query"]}, "`rank_pattern` must be a dict"),
        ({"alpha_pattern": {1: 2.0}}, "`alpha_pattern` keys must be strings"),
    ],
)
def test_invalid_patterns_name_the_argument(kwargs, match):
    backbone = tiny_gpt2_backbone(num_layers=1, hidden=16)
    with pytest.raises(ValueError, match=match):
        keras_lora.enable_lora(backbone, rank=2, **kwargs)
    assert not keras_lora.lora_layers(backbone)


def test_peft_reading_uses_the_same_rule():
    assert peft_config.pattern_value is patterns.pattern_value
    name = "model.layers.0.self_attn.q_proj"
    assert peft_config.pattern_value({"q_proj": 4, ".*": 2}, name, 8) == 4
    assert peft_config.pattern_value({"layers.0.self_attn.q_proj": 5}, name, 8) == 5
    assert peft_config.pattern_value({"proj": 4}, name, 8) == 8


def test_adapter_file_keeps_per_layer_ranks(tmp_path):
    backbone = tiny_gpt2_backbone(num_layers=1, hidden=16)
    keras_lora.enable_lora(
        backbone, rank=2, rank_pattern={"value": 4}, alpha_pattern={"query": 6.0}
    )
    randomize_factors(backbone)
    x = token_batch()
    trained = to_numpy(backbone(x))
    path = os.path.join(tmp_path, "patterned.keras")
    keras_lora.save_adapter(backbone, path)
    fresh = tiny_gpt2_backbone(num_layers=1, hidden=16)
    base = {v.path: v for v in backbone.weights}
    for variable in fresh.weights:  # the same base weights
        variable.assign(base[variable.path])
    keras_lora.load_adapter(fresh, path)
    assert {
        lyr.path: (lyr.rank, lyr.alpha) for lyr in keras_lora.lora_layers(fresh)
    } == {
        Q0: (2, 6.0),
        V0: (4, 4.0),
    }
    np.testing.assert_allclose(to_numpy(fresh(x)), trained, atol=1e-5)


def test_named_adapter_with_patterns():
    backbone = tiny_gpt2_backbone(num_layers=1, hidden=16)
    keras_lora.add_adapter(backbone, "first", rank=2)
    keras_lora.add_adapter(backbone, "second", rank=2, rank_pattern={"value": 5})
    value = _layer(backbone, V0)
    assert value.lora_adapter("second").rank == 5
    assert value.lora_adapter("first").rank == 2
    assert _layer(backbone, Q0).lora_adapter("second").rank == 2
