"""PEFT interop for convolutions: PEFT's conv LoRA (and DoRA) <-> keras-lora's.

PEFT adapts `nn.Conv1d/2d/3d` with `lora_A` a convolution like the base's
with `r` output channels and `lora_B` a 1×1 convolution; `factors.py` turns
them into keras-lora's `(*kernel_size, in, r)` and `(r, filters)`. Checked
on a bare layer (strides and dilation) and on a real KerasHub model with a
conv: ViT, whose patch embedding is a `Conv2D`, from a tiny random
transformers `ViTForImageClassification` that KerasHub converts offline.
"""

import json
import os

import keras
import numpy as np
import pytest

import keras_lora
from keras_lora.interop import factors, peft_dora

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
keras_hub = pytest.importorskip("keras_hub")

from test_peft import (  # noqa: E402, F401 (_no_random_init: an autouse fixture)
    _no_random_init,
    assert_close,
    check_module_table,
)

from helpers import randomize_factors, to_numpy  # noqa: E402

IMAGE = 8  # 8×8 images, 4×4 patches: 4 patches and the class token


class _Conv(torch.nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


def _randomize_torch_magnitudes(wrapped, seed=2):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_magnitude_vector" in name:
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.mul_(1 + 0.3 * noise)


@pytest.mark.parametrize("dims, use_dora, strides", [(1, False, 2), (2, True, 1)])
def test_conv_factors_match_peft_layer(dims, use_dora, strides):
    """PEFT's LoRA (DoRA) on an `nn.Conv{1,2}d` equals `LoRAConv{1,2}D` given
    the converted factors, and back."""
    conv_class = getattr(torch.nn, f"Conv{dims}d")
    torch_conv = conv_class(3, 6, 3, stride=strides)
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=2, lora_alpha=3, target_modules=["conv"], init_lora_weights=False
    )
    config.use_dora = use_dora
    wrapped = peft.get_peft_model(_Conv(torch_conv), config).eval()
    _randomize_torch_magnitudes(wrapped)
    state = {k: v.detach().numpy() for k, v in wrapped.state_dict().items()}
    module = "base_model.model.conv"
    a_peft = state[f"{module}.lora_A.default.weight"]
    b_peft = state[f"{module}.lora_B.default.weight"]

    cls = getattr(keras_lora, f"LoRAConv{dims}D")
    layer = cls(6, 3, strides=strides, rank=2, alpha=3, use_dora=use_dora)
    layer.build((None,) + (16,) * dims + (3,))
    weight = state[f"{module}.base_layer.weight"]
    layer.kernel.assign(factors.weight_to_kernel(layer, weight))
    layer.bias.assign(state[f"{module}.base_layer.bias"])
    input_shape, output_shape, kind = factors.layout(layer)
    assert kind == "conv"
    a, b = factors.to_keras(a_peft, b_peft, input_shape, output_shape)
    layer.lora_a.assign(a)
    layer.lora_b.assign(b)
    if use_dora:
        parts = {"m": state[f"{module}.lora_magnitude_vector.default.weight"]}
        (magnitude,) = peft_dora.read_module(
            "conv", parts, [factors.layout(layer)], True
        )
        layer.lora_magnitude.assign(magnitude)

    x = np.random.default_rng(0).normal(size=(2, 3) + (16,) * dims).astype("float32")
    with torch.no_grad():
        expected = wrapped(torch.tensor(x)).numpy()
    channels_last = np.moveaxis(x, 1, -1)
    got = np.moveaxis(to_numpy(layer(channels_last)), -1, 1)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # And back: PEFT's own tensors, exactly.
    np.testing.assert_array_equal(
        factors.kernel_to_weight(layer, to_numpy(layer.kernel)), weight
    )
    a_back, b_back = factors.to_peft(
        to_numpy(layer.lora_a), to_numpy(layer.lora_b), kind
    )
    np.testing.assert_array_equal(a_back, a_peft)
    np.testing.assert_array_equal(b_back, b_peft)


def make_vit(seed=0):
    """A tiny random transformers ViT classifier (KerasHub's converter reads
    the `vit.` weights of a classifier checkpoint), float32, eval mode."""
    config = transformers.ViTConfig(
        image_size=IMAGE,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        layer_norm_eps=1e-6,  # KerasHub's ViT
        num_labels=3,
    )
    torch.manual_seed(seed)
    return transformers.ViTForImageClassification(config).eval()


def vit_outputs(vit_model, images):
    """Last hidden states of a transformers `ViTModel` (images NCHW)."""
    with torch.no_grad():
        return [vit_model(torch.tensor(images)).last_hidden_state.numpy()]


# transformers 5 module names (ViTModel: `layers.{i}.attention.q_proj`, ...).
VIT_TARGETS = ["projection", "q_proj", "v_proj", "o_proj", "fc1"]


@pytest.mark.parametrize("use_dora", [False, True])
def test_vit_load_and_save_match_peft(use_dora, tmp_path):
    images = np.random.default_rng(0).normal(size=(2, 3, IMAGE, IMAGE))
    images = images.astype("float32")
    keras_images = np.transpose(images, (0, 2, 3, 1))
    hf = make_vit()
    hf.save_pretrained(tmp_path / "base", safe_serialization=True)
    backbone = keras_hub.models.Backbone.from_preset(str(tmp_path / "base"))
    assert_close([to_numpy(backbone(keras_images))], vit_outputs(hf.vit, images))
    check_module_table(hf.vit, backbone, "vit")
    patch = backbone.get_layer("vit_patching_and_embedding").patch_embedding

    torch.manual_seed(1)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=VIT_TARGETS,
        rank_pattern={"projection": 2},
        use_dora=use_dora,
    )
    wrapped = peft.get_peft_model(hf, config).eval()
    _randomize_torch_magnitudes(wrapped)
    wrapped.save_pretrained(tmp_path / "adapter")
    expected = vit_outputs(wrapped.base_model.model.vit, images)

    # PEFT -> Keras: LoRA on the patch Conv2D and the attention/MLP layers.
    keras_lora.load_peft_adapter(backbone, tmp_path / "adapter")
    assert_close([to_numpy(backbone(keras_images))], expected)
    adapted = keras_lora.lora_layers(backbone)
    assert patch in adapted and len(adapted) == 1 + 2 * 4
    assert patch.rank == 2 and patch.use_dora == use_dora

    # Keras -> PEFT, after the load and from our own layers.
    keras_lora.save_peft_adapter(backbone, tmp_path / "round_trip")
    written = json.loads((tmp_path / "round_trip" / "adapter_config.json").read_text())
    assert written["use_dora"] is use_dora
    reference = peft.PeftModel.from_pretrained(make_vit().vit, tmp_path / "round_trip")
    assert_close(vit_outputs(reference.eval().base_model.model, images), expected)

    fresh = keras_hub.models.Backbone.from_preset(str(tmp_path / "base"))
    keras_lora.enable_lora(
        fresh,
        rank=2,
        alpha=3,
        targets=["patch_embedding", ".*/key", ".*dense_2"],
        use_dora=use_dora,
    )
    randomize_factors(fresh, seed=3)
    own = to_numpy(fresh(keras_images))
    keras_lora.save_peft_adapter(fresh, tmp_path / "own")
    reference = peft.PeftModel.from_pretrained(make_vit().vit, tmp_path / "own")
    assert_close(vit_outputs(reference.eval().base_model.model, images), [own])
    # Merged into a plain Conv2D, the same outputs.
    keras_lora.merge_lora(fresh)
    merged_patch = fresh.get_layer("vit_patching_and_embedding").patch_embedding
    assert type(merged_patch) is keras.layers.Conv2D
    np.testing.assert_allclose(to_numpy(fresh(keras_images)), own, atol=1e-5, rtol=0)


def test_dilated_conv_has_no_peft_form():
    """PEFT 0.21's conv `lora_A` leaves out the base's dilation (its forward
    fails on a dilated conv), so such a layer maps onto no PEFT module."""
    layer = keras.layers.Conv2D(4, 3, dilation_rate=2)
    layer.build((None, 9, 9, 3))
    with pytest.raises(ValueError, match="dilation_rate"):
        factors.layout(layer)


def test_vit_classifier_with_dora_and_modules_to_save(tmp_path):
    """The KerasHub task: module names with `vit.`, the classifier saved whole,
    logits both ways; written as a plain PeftModel adapter (no task type a
    classifier cannot load as)."""
    images = np.random.default_rng(1).normal(size=(2, 3, IMAGE, IMAGE))
    images = images.astype("float32")
    hf = make_vit()
    hf.save_pretrained(tmp_path / "base", safe_serialization=True)
    torch.manual_seed(1)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=["projection", "q_proj"],
        modules_to_save=["classifier"],
        use_dora=True,
    )
    wrapped = peft.get_peft_model(hf, config).eval()
    _randomize_torch_magnitudes(wrapped)
    with torch.no_grad():
        head = wrapped.base_model.model.classifier.modules_to_save.default
        for parameter in head.parameters():
            parameter.add_(1.0)  # the saved head differs from the base's
        expected = wrapped(torch.tensor(images)).logits.numpy()
    wrapped.save_pretrained(tmp_path / "adapter")

    task = keras_hub.models.ViTImageClassifier.from_preset(
        str(tmp_path / "base"), num_classes=3
    )
    keras_lora.load_peft_adapter(task, tmp_path / "adapter")
    # The task's own call: its preprocessor (rescaling) runs in `predict` only.
    logits = to_numpy(task(np.transpose(images, (0, 2, 3, 1))))
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)

    keras_lora.save_peft_adapter(task, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["modules_to_save"] == ["classifier"]
    assert written["task_type"] is None
    reloaded = peft.PeftModel.from_pretrained(make_vit(), tmp_path / "out").eval()
    with torch.no_grad():
        again = reloaded(torch.tensor(images)).logits.numpy()
    np.testing.assert_allclose(again, logits, atol=1e-4, rtol=0)
