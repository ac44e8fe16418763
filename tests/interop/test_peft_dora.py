"""DoRA PEFT interop: `use_dora` adapters, both ways, against transformers + peft.

The tiny random transformers models, the PEFT configs and the comparisons
are test_peft.py's; here every adapter is DoRA, with random non-zero B
factors and magnitudes (PEFT's initial magnitude, ‖W + s·ΔW‖, would make
DoRA compute plain LoRA, and a wrong magnitude mapping would pass).
"""

import json
import os

import numpy as np
import pytest

import keras_lora
from keras_lora import targets, transform
from keras_lora.interop import safetensors_io

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
keras_hub = pytest.importorskip("keras_hub")

from hf_models import ARCHITECTURES, make_hf_model, save_base, token_ids  # noqa: E402
from test_peft import (  # noqa: E402, F401 (_no_random_init: an autouse fixture)
    PEFT_CONFIGS,
    SAVE_PLANS,
    _no_random_init,
    _tiny_llama,
    _write_adapter,
    assert_close,
    hf_outputs,
    keras_outputs,
    peft_adapter,
    peft_reference,
)

from helpers import randomize_factors, to_numpy  # noqa: E402

# PEFT's DoRA also adapts embeddings; keras-lora's does not (tested below).
_EMBEDDINGS = {"word_embeddings", "token_type_embeddings", "wte", "embed_tokens"}


def dora_adapter(arch, hf, folder):
    """A PEFT DoRA adapter on the linear modules of PEFT_CONFIGS[arch], with
    random magnitudes, saved to `folder`; returns the wrapped model."""
    targets = [t for t in PEFT_CONFIGS[arch]["target_modules"] if t not in _EMBEDDINGS]
    wrapped = peft_adapter(arch, hf, folder, target_modules=targets, use_dora=True)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_magnitude_vector" in name:
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.mul_(1 + 0.3 * noise)
    wrapped.save_pretrained(folder)
    return wrapped


def randomize_magnitudes(model, seed=4):
    rng = np.random.default_rng(seed)
    for layer in keras_lora.lora_layers(model):
        value = to_numpy(layer.lora_magnitude)
        noise = rng.normal(0, 0.3, value.shape).astype("float32")
        layer.lora_magnitude.assign(value * (1 + noise))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_dora_load_and_save_match_peft(arch, tmp_path):
    ids = token_ids()
    hf = make_hf_model(arch)
    base_folder = save_base(hf, tmp_path / "base")
    wrapped = dora_adapter(arch, hf, tmp_path / "adapter")
    expected = hf_outputs(wrapped.base_model.model.base_model, ids)

    # PEFT -> Keras: DoRA layers whose magnitudes train with the factors.
    backbone = keras_hub.models.Backbone.from_preset(base_folder)
    keras_lora.load_peft_adapter(backbone, tmp_path / "adapter")
    assert_close(keras_outputs(backbone, arch, ids), expected)
    layers = keras_lora.lora_layers(backbone)
    assert layers and all(layer.use_dora for layer in layers)
    spec = transform.lora_spec(backbone)
    assert all(config["use_dora"] for config in spec["layers"].values())
    assert all(v.trainable == ("lora_" in v.path) for v in backbone.weights)

    # Keras -> PEFT after the load: transformers + peft computes the same.
    keras_lora.save_peft_adapter(backbone, tmp_path / "round_trip")
    config = json.loads((tmp_path / "round_trip" / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    assert_close(peft_reference(arch, tmp_path / "round_trip", ids), expected)

    # Keras -> PEFT from our own DoRA layers (GPT-2: q and v of c_attn
    # without k, whose rows keep ‖W‖ as magnitude).
    plan = SAVE_PLANS[arch]
    fresh = keras_hub.models.Backbone.from_preset(base_folder)
    keras_lora.enable_lora(
        fresh,
        targets=list(plan),
        rank_pattern={p: rank for p, (rank, _, _) in plan.items()},
        alpha_pattern={p: alpha for p, (_, alpha, _) in plan.items()},
        use_dora=True,
    )
    randomize_factors(fresh, seed=3)
    randomize_magnitudes(fresh)
    keras_lora.save_peft_adapter(fresh, tmp_path / "own")
    assert_close(
        peft_reference(arch, tmp_path / "own", ids), keras_outputs(fresh, arch, ids)
    )


def _q_proj_dora(use_dora=True, magnitude_shape=(32,)):
    rng = np.random.default_rng(0)
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{name}.lora_A.weight": rng.normal(size=(2, 32)).astype("float32"),
        f"{name}.lora_B.weight": rng.normal(size=(32, 2)).astype("float32"),
    }
    if magnitude_shape is not None:
        tensors[f"{name}.lora_magnitude_vector"] = rng.uniform(
            0.5, 2, magnitude_shape
        ).astype("float32")
    config = {"target_modules": ["q_proj"], "use_dora": use_dora}
    return config, tensors


def test_unrepresentable_dora_adapters_raise_and_change_nothing(tmp_path):
    embedding = "base_model.model.model.embed_tokens"
    rng = np.random.default_rng(1)
    cases = [
        # PEFT's DoRA on an embedding.
        (
            {"target_modules": ["embed_tokens"], "use_dora": True},
            {
                f"{embedding}.lora_embedding_A": rng.normal(size=(2, 64)),
                f"{embedding}.lora_embedding_B": rng.normal(size=(32, 2)),
                f"{embedding}.lora_magnitude_vector": rng.uniform(1, 2, (32,)),
            },
            "DoRA on the embedding",
        ),
        (*_q_proj_dora(magnitude_shape=None), "no `lora_magnitude_vector`"),
        (*_q_proj_dora(magnitude_shape=(1, 32)), "magnitude of shape"),
        (*_q_proj_dora(use_dora=False), "use_dora: false"),
        ({"use_dora": "yes"}, _q_proj_dora()[1], "use_dora"),
    ]
    backbone = _tiny_llama()
    before = [to_numpy(v) for v in backbone.weights]
    for index, (config, tensors, match) in enumerate(cases):
        folder = tmp_path / str(index)
        tensors = {k: np.asarray(v, "float32") for k, v in tensors.items()}
        _write_adapter(folder, config, tensors)
        with pytest.raises(ValueError, match=match):
            keras_lora.load_peft_adapter(backbone, folder)
        assert not keras_lora.lora_layers(backbone), match
        assert all(v.trainable for v in backbone.weights), match
        for value, variable in zip(before, backbone.weights):
            np.testing.assert_array_equal(value, to_numpy(variable))

    # Beside another named adapter: refused, the other adapter kept as is.
    config, tensors = _q_proj_dora()
    _write_adapter(tmp_path / "dora", config, tensors)
    keras_lora.add_adapter(backbone, "mine", rank=2, targets=[".*value.*"])
    with pytest.raises(ValueError, match="DoRA"):
        keras_lora.load_peft_adapter(backbone, tmp_path / "dora", name="peft")
    assert keras_lora.list_adapters(backbone) == ["mine"]


def test_dora_load_onto_fresh_llama_and_save_errors(tmp_path):
    """A valid DoRA adapter loads (magnitudes exactly PEFT's); a model with
    DoRA on some layers only has no PEFT form."""
    config, tensors = _q_proj_dora()
    _write_adapter(tmp_path / "dora", config, tensors)
    backbone = _tiny_llama()
    keras_lora.load_peft_adapter(backbone, tmp_path / "dora")
    (layer,) = keras_lora.lora_layers(backbone)
    magnitude = tensors[next(k for k in tensors if "magnitude" in k)]
    np.testing.assert_array_equal(
        to_numpy(layer.lora_magnitude), magnitude.reshape(layer.lora_magnitude.shape)
    )
    keras_lora.save_peft_adapter(backbone, tmp_path / "out", module_prefix="model.")
    written, _ = safetensors_io.read(tmp_path / "out" / "adapter_model.safetensors")
    for key, value in tensors.items():
        np.testing.assert_allclose(written[key], value, rtol=0, atol=1e-6)

    mixed = _tiny_llama()
    paths = [
        layer.path
        for layer in targets.sublayers(mixed)
        if (layer.path or "").endswith(("/query", "/value"))
    ]
    layers = {
        path: {
            "rank": 2,
            "alpha": 2.0,
            "dropout": 0.0,
            "use_rslora": False,
            "use_dora": path.endswith("/query"),
        }
        for path in paths
    }
    spec = {"version": 1, "targets": "test", "layers": layers, "train_layers": []}
    transform.apply_spec(mixed, spec)
    with pytest.raises(ValueError, match="all of its modules or for none"):
        keras_lora.save_peft_adapter(mixed, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()
