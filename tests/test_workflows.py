"""Whole workflows on KerasHub / KerasNLP task models, on the current backend:

enable_lora -> fit lowers the loss -> save_adapter -> load_adapter onto a fresh
model -> export_merged -> reload with plain Keras -> same outputs.
"""

import zipfile

import keras
import numpy as np
import pytest

import keras_lora
from helpers import VOCAB, bert_batch, to_numpy, token_batch

keras_hub = pytest.importorskip("keras_hub")
keras_nlp = pytest.importorskip("keras_nlp")
LIBRARIES = {"keras_hub": keras_hub, "keras_nlp": keras_nlp}
SEED = 11


# Tiny models: one torch thread is faster, much faster on a busy CPU.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gpt2_causal_lm(library):
    models = LIBRARIES[library].models
    keras.utils.set_random_seed(SEED)  # the same "pretrained" base every time
    backbone = models.GPT2Backbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=32,
    )
    return models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def bert_classifier(library):
    models = LIBRARIES[library].models
    keras.utils.set_random_seed(SEED)
    backbone = models.BertBackbone(
        vocabulary_size=VOCAB,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=32,
        dropout=0.0,
    )
    return models.BertTextClassifier(
        backbone=backbone, num_classes=2, preprocessor=None, dropout=0.0
    )


def gpt2_data():
    x = token_batch(batch=8, seed=3)
    return x, np.roll(x["token_ids"], -1, axis=1)


def bert_data():
    return bert_batch(8, seed=3), np.array([0, 1, 1, 0, 1, 0, 0, 1])


TASKS = {
    "gpt2": (gpt2_causal_lm, gpt2_data, {}),
    "bert": (bert_classifier, bert_data, {"train_layers": ["logits"]}),
}


def _outputs(model, x):
    return to_numpy(model(x, training=False))


# KerasHub's GPT-2 and KerasNLP's BERT run the whole workflow; the other two
# pairs are checked more cheaply below (KerasNLP re-exports KerasHub's classes).
@pytest.mark.parametrize("library,task", [("keras_hub", "gpt2"), ("keras_nlp", "bert")])
def test_whole_workflow(library, task, tmp_path):
    build, data, lora_kwargs = TASKS[task]
    x, y = data()
    model = build(library)
    base_outputs = _outputs(model, x)
    keras_lora.enable_lora(model, rank=4, alpha=8, **lora_kwargs)
    np.testing.assert_allclose(_outputs(model, x), base_outputs, atol=1e-6)
    trainable, total, adapted = keras_lora.trainable_summary(model)
    assert adapted and trainable < total / 5

    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, y, batch_size=8, epochs=4, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0], losses
    adapted_outputs = _outputs(model, x)
    assert np.abs(adapted_outputs - base_outputs).max() > 1e-4

    adapter = keras_lora.save_adapter(model, tmp_path / "task.adapter.keras")
    fresh = build(library)
    np.testing.assert_allclose(_outputs(fresh, x), base_outputs, atol=1e-6)
    keras_lora.load_adapter(fresh, adapter)
    np.testing.assert_allclose(_outputs(fresh, x), adapted_outputs, atol=1e-5)

    merged_path = keras_lora.export_merged(fresh, tmp_path / "merged.keras")
    with zipfile.ZipFile(merged_path) as archive:
        config = archive.read("config.json").decode()
    assert "LoRA" not in config and "keras_lora" not in config
    merged = keras.saving.load_model(merged_path)
    assert type(merged) is type(build(library))
    np.testing.assert_allclose(_outputs(merged, x), adapted_outputs, atol=1e-4)
    assert not merged.trainable_weights or all(
        v.trainable for v in merged.trainable_weights
    )
    # The adapted model keeps training after the export.
    assert keras_lora.lora_layers(fresh)


@pytest.mark.parametrize("library,task", [("keras_nlp", "gpt2"), ("keras_hub", "bert")])
def test_enable_lora_on_the_other_names(library, task):
    build, data, lora_kwargs = TASKS[task]
    x, _ = data()
    model = build(library)
    base_outputs = _outputs(model, x)
    keras_lora.enable_lora(model, rank=4, **lora_kwargs)
    paths = [layer.path for layer in keras_lora.lora_layers(model)]
    assert len(paths) == 4  # query and value of both blocks
    assert all(p.endswith(("query", "value")) for p in paths), paths
    np.testing.assert_allclose(_outputs(model, x), base_outputs, atol=1e-6)
    trainable = {v.path for v in model.trainable_weights}
    expected = {f"{p}/{f}" for p in paths for f in ("lora_a", "lora_b")}
    if task == "bert":
        expected |= {"logits/kernel", "logits/bias"}
    assert trainable == expected
