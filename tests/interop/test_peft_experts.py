"""PEFT `target_parameters` LoRA on mixture-of-experts experts, both ways.

transformers 5 builds Mixtral, Qwen-MoE, Qwen3-MoE and GPT-OSS with fused expert
parameters (`mlp.experts.gate_up_proj`, `down_proj`), which PEFT adapts with
`LoraConfig(target_parameters=[...])`: one rank-r pair per expert. Tiny
models (1 layer, 4 experts, hidden 16) are built here, converted base to base
(KerasHub `from_preset`; GPT-OSS, whose converter reads MXFP4 blocks only,
weight by weight) and compared with transformers + peft. Nothing is
downloaded.
"""

import json
import os

import numpy as np
import pytest

import keras_lora
from keras_lora.commands import inspect_peft
from keras_lora.interop import safetensors_io
from keras_lora.layers.expert_einsum import LoRAExpertEinsum

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
keras_hub = pytest.importorskip("keras_hub")

from hf_models import save_base, token_ids  # noqa: E402
from test_peft import (  # noqa: E402, F401 (_no_random_init: an autouse fixture)
    TOLERANCE,
    _no_random_init,
    _write_adapter,
)

from helpers import randomize_factors, to_numpy  # noqa: E402

PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
EXPERT_WEIGHTS = ("gate", "intermediate", "output")  # Mixtral's bank
# Expert LoRA layers per block: Mixtral keeps gate and up apart.
EXPERT_LAYERS = {"mixtral": 3, "qwen2_moe": 2, "qwen3_moe": 2, "gpt_oss": 2}


def make_hf_moe(arch):
    """A tiny random transformers MoE causal LM, weights exact in float16."""
    common = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    if arch == "qwen2_moe":  # a shared expert beside the routed ones
        config = transformers.Qwen2MoeConfig(
            **common,
            num_experts=4,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=8,
        )
        cls = transformers.Qwen2MoeForCausalLM
    elif arch == "mixtral":
        config = transformers.MixtralConfig(
            **common, num_local_experts=4, sliding_window=8
        )
        cls = transformers.MixtralForCausalLM
    elif arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **common, num_local_experts=4, head_dim=8, moe_intermediate_size=8
        )
        cls = transformers.Qwen3MoeForCausalLM
    else:  # plain RoPE: KerasHub's converter does not read transformers 5's YaRN
        config = transformers.GptOssConfig(
            **common,
            num_local_experts=4,
            head_dim=8,
            sliding_window=8,
            layer_types=["full_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
        cls = transformers.GptOssForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "bias" in name or "sinks" in name:  # initialized to zeros
                parameter.normal_(0, 0.1)
            parameter.copy_(parameter.half().float())
    return model


def keras_backbone(arch, hf, folder):
    """The KerasHub backbone of `hf`, converted base to base."""
    if arch != "gpt_oss":
        save_base(hf, folder)
        config_file = os.path.join(folder, "config.json")
        with open(config_file) as f:
            config = json.load(f)
        # KerasHub's Qwen3-MoE converter reads transformers 4's name.
        config.setdefault("num_experts", config.get("num_local_experts"))
        with open(config_file, "w") as f:
            json.dump(config, f)
        return keras_hub.models.Backbone.from_preset(str(folder))
    from keras_hub.src.utils.transformers import convert_gpt_oss

    backbone = keras_hub.models.GptOssBackbone(
        **convert_gpt_oss.convert_backbone_config(hf.config.to_dict())
    )
    state = {k: v.numpy() for k, v in hf.state_dict().items()}

    def put(variable, key, transpose=False):
        value = state[key].T if transpose else state[key]
        variable.assign(np.reshape(value, variable.shape))

    put(backbone.token_embedding.embeddings, "model.embed_tokens.weight")
    put(backbone.token_embedding.reverse_embeddings, "lm_head.weight", True)
    put(backbone.layer_norm.scale, "model.norm.weight")
    for i, block in enumerate(backbone.transformer_layers):
        p = f"model.layers.{i}."
        attention = block.self_attention_layer
        for name in ("query", "key", "value", "output"):
            dense = getattr(attention, f"{name}_dense")
            put(dense.kernel, f"{p}self_attn.{name[0]}_proj.weight", True)
            put(dense.bias, f"{p}self_attn.{name[0]}_proj.bias")
        put(attention.sinks, f"{p}self_attn.sinks")
        router = block.sparse_moe_block.router.router_dense
        put(router.kernel, f"{p}mlp.router.weight", True)
        put(router.bias, f"{p}mlp.router.bias")
        experts = block.sparse_moe_block.experts  # the same layout as transformers'
        for name in (
            "gate_up_proj",
            "gate_up_proj_bias",
            "down_proj",
            "down_proj_bias",
        ):
            put(getattr(experts, name), f"{p}mlp.experts.{name}")
        put(block.input_layernorm.scale, f"{p}input_layernorm.weight")
        put(block.post_attention_layernorm.scale, f"{p}post_attention_layernorm.weight")
    return backbone


def hf_hidden(causal_lm, ids):
    with torch.no_grad():
        out = causal_lm.model(torch.tensor(ids, dtype=torch.long))
    return out.last_hidden_state.numpy()


def keras_hidden(backbone, ids):
    return to_numpy(backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)}))


def peft_reference(arch, folder, ids):
    """Outputs of a fresh transformers model with the adapter at `folder`."""
    wrapped = peft.PeftModel.from_pretrained(make_hf_moe(arch), folder).eval()
    return hf_hidden(wrapped.base_model.model, ids)


def read(folder):
    return safetensors_io.read(os.path.join(folder, "adapter_model.safetensors"))[0]


@pytest.mark.parametrize("arch", sorted(EXPERT_LAYERS))
def test_target_parameters_load_and_save_match_peft(arch, tmp_path):
    ids = token_ids()
    hf = make_hf_moe(arch)
    backbone = keras_backbone(arch, hf, tmp_path / "base")
    np.testing.assert_allclose(
        keras_hidden(backbone, ids), hf_hidden(hf, ids), atol=TOLERANCE, rtol=0
    )
    lora = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        init_lora_weights=False,
        # Qwen-MoE: its shared expert's up_proj too (elsewhere PEFT would take
        # "up_proj" for the experts' transformers 4 name and refuse it).
        target_modules=["v_proj", "up_proj"] if arch == "qwen2_moe" else ["v_proj"],
        target_parameters=PARAMETERS,
        rank_pattern={"down_proj": 3},  # per parameter, as PEFT reads it
    )
    torch.manual_seed(1)
    wrapped = peft.get_peft_model(hf, lora).eval()
    wrapped.save_pretrained(tmp_path / "adapter")
    expected = hf_hidden(wrapped.base_model.model, ids)

    # PEFT -> Keras: per-expert factors on the bank's weights, same outputs.
    keras_lora.load_peft_adapter(backbone, tmp_path / "adapter")
    experts = [
        x for x in keras_lora.lora_layers(backbone) if isinstance(x, LoRAExpertEinsum)
    ]
    assert len(experts) == EXPERT_LAYERS[arch]
    assert sorted(x.rank for x in experts)[-1] == 3 and all(x.factored for x in experts)
    assert all(x.lora_a.shape[0] == 4 for x in experts)  # one pair per expert
    got = keras_hidden(backbone, ids)
    assert np.abs(expected - hf_hidden(make_hf_moe(arch), ids)).max() > 0.1
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)

    # Keras -> PEFT after a load: the same tensors, nesting included.
    keras_lora.save_peft_adapter(backbone, tmp_path / "out", module_prefix="model.")
    original, written = read(tmp_path / "adapter"), read(tmp_path / "out")
    assert sorted(original) == sorted(written)
    for key in original:
        np.testing.assert_array_equal(original[key], written[key])
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["down_proj", "gate_up_proj"]
    assert config["rank_pattern"] == {"model.layers.0.mlp.experts.down_proj": 3}
    np.testing.assert_allclose(
        peft_reference(arch, tmp_path / "out", ids), got, atol=TOLERANCE, rtol=0
    )


def test_own_expert_factors_save_for_peft(tmp_path):
    """Mixtral's separate gate and up weights with their own factors (other
    ranks and scales) become one gate_up_proj pair in PEFT, stacked; it loads
    back beside them as a named adapter."""
    ids = token_ids()
    hf = make_hf_moe("mixtral")
    backbone = keras_backbone("mixtral", hf, tmp_path / "base")
    keras_lora.enable_lora(
        backbone,
        rank=2,
        alpha=4,
        targets=[f"expert_feedforward_{n}_dense" for n in EXPERT_WEIGHTS],
        rank_pattern={"expert_feedforward_intermediate_dense": 3},
        alpha_pattern={"expert_feedforward_output_dense": 5},
    )
    randomize_factors(backbone, seed=3)
    got = keras_hidden(backbone, ids)
    keras_lora.save_peft_adapter(backbone, tmp_path / "own", module_prefix="model.")
    config = json.loads((tmp_path / "own" / "adapter_config.json").read_text())
    assert config["target_modules"] == [] and config["lora_dropout"] == 0.0
    assert read(tmp_path / "own")[
        "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"
    ].shape == (4 * 5, 16)  # gate_up_proj: ranks 2 + 3, per expert
    np.testing.assert_allclose(
        peft_reference("mixtral", tmp_path / "own", ids), got, atol=TOLERANCE, rtol=0
    )
    # Loaded back beside the adapter that wrote it: the same outputs.
    keras_lora.load_peft_adapter(backbone, tmp_path / "own", name="peft")
    keras_lora.set_adapter(backbone, "peft")
    np.testing.assert_allclose(keras_hidden(backbone, ids), got, atol=1e-5, rtol=0)
    # `keras-lora inspect` names each parameter with its per-expert rank.
    layers = inspect_peft.describe(str(tmp_path / "own"))["layers"]
    assert [(x["path"], x["rank"], x["experts"]) for x in layers] == [
        ("model.layers.0.mlp.experts.gate_up_proj", 5, 4),
        ("model.layers.0.mlp.experts.down_proj", 2, 4),
    ]


def test_expert_adapters_that_cannot_be_represented_are_refused(tmp_path):
    from test_moe import tiny_moe  # hidden 16, intermediate 8, 4 experts

    backbone = tiny_moe("mixtral")
    rng = np.random.default_rng(0)
    name = "base_model.model.model.layers.0.mlp.experts"
    down = {  # down_proj alone: (E·r, I) and (H, r·E)
        f"{name}.lora_A.weight": rng.normal(size=(8, 8)).astype("float32"),
        f"{name}.lora_B.weight": rng.normal(size=(16, 8)).astype("float32"),
    }
    cases = [
        # Both parameters selected, one pair of factors: which is which?
        ({"target_parameters": PARAMETERS}, down, "pair"),
        (
            {"target_parameters": ["down_proj"]},
            {**down, f"{name}.lora_B.weight": (np.zeros((16, 6), "float32"))},
            "must have lora_A of shape",
        ),
        ({"target_parameters": ["down_proj", "mlp.gate.weight"]}, down, "mlp.gate"),
        ({"target_parameters": ["down_proj"], "lora_dropout": 0.1}, down, "dropout"),
    ]
    weights = [to_numpy(v) for v in backbone.weights]
    for index, (config, tensors, message) in enumerate(cases):
        _write_adapter(tmp_path / str(index), config, tensors)
        with pytest.raises(ValueError, match=message):
            keras_lora.load_peft_adapter(backbone, tmp_path / str(index))
        assert not keras_lora.lora_layers(backbone)
    for before, variable in zip(weights, backbone.weights):
        np.testing.assert_array_equal(to_numpy(variable), before)
    _write_adapter(tmp_path / "ok", {"target_parameters": ["down_proj"]}, down)
    keras_lora.load_peft_adapter(backbone, tmp_path / "ok")
    (layer,) = keras_lora.lora_layers(backbone)
    a = down[f"{name}.lora_A.weight"].reshape(4, 2, 8)
    np.testing.assert_array_equal(to_numpy(layer.lora_a), a.transpose(0, 2, 1))
