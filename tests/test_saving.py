"""Adapters, full save/resume, merged export and the MergeLoRA callback."""

import json
import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

import keras_lora
from helpers import bert_batch, tiny_bert_classifier, to_numpy

pytest.importorskip("keras_hub")

Y = np.array([0, 1, 0, 1, 1, 0, 1, 0])


def fresh_classifier(hidden=32):
    keras.utils.set_random_seed(7)  # the same "pretrained" base every time
    # No dropout, so that two models given the same steps stay identical.
    return tiny_bert_classifier(dropout=0.0, hidden=hidden)


def trained_classifier(epochs=2):
    model = fresh_classifier()
    keras_lora.enable_lora(model, rank=4, alpha=8, train_layers=["logits"])
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(bert_batch(8), Y, epochs=epochs, batch_size=8, verbose=0)
    return model


@pytest.fixture(scope="module")
def trained():
    """One trained model for the tests that only read it (training is slow)."""
    return trained_classifier()


@pytest.fixture(scope="module")
def adapter_file(trained, tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter") / "task.keras"
    assert keras_lora.save_adapter(trained, path) == str(path)
    return path


def test_adapter_round_trip_onto_a_fresh_model(trained, adapter_file):
    model, path = trained, adapter_file
    x = bert_batch(4, seed=1)
    expected = to_numpy(model(x))
    fresh = fresh_classifier()
    assert keras_lora.load_adapter(fresh, path) is fresh
    np.testing.assert_allclose(to_numpy(fresh(x)), expected, rtol=1e-6, atol=1e-6)
    assert {v.path for v in fresh.trainable_weights} == {
        v.path for v in model.trainable_weights
    }
    # Loading again onto the adapted model works too (same layers).
    keras_lora.load_adapter(fresh, path)
    np.testing.assert_allclose(to_numpy(fresh(x)), expected, rtol=1e-6, atol=1e-6)


def test_adapter_file_contents_and_size(trained, adapter_file):
    model, path = trained, adapter_file
    with zipfile.ZipFile(path) as archive:
        assert sorted(archive.namelist()) == [
            "adapter.weights.h5",
            "config.json",
            "metadata.json",
        ]
        config = json.loads(archive.read("config.json"))
        metadata = json.loads(archive.read("metadata.json"))
    assert metadata["format"] == "keras-lora-adapter"
    assert metadata["keras_version"] == keras.__version__
    spec = config["spec"]
    assert spec["train_layers"] == ["logits"]
    assert all(c["rank"] == 4 and c["alpha"] == 8 for c in spec["layers"].values())
    keys = set(config["weights"])
    assert "train/logits/bias" in keys  # trained biases are kept (keras-hub #2701)
    assert {k for k in keys if k.endswith("/lora_a")} == {
        f"{p}/lora_a" for p in spec["layers"]
    }
    weight_bytes = sum(4 * int(np.prod(v.shape)) for v in model.trainable_weights)
    size = os.path.getsize(path)
    assert weight_bytes < size < weight_bytes + 12_000, (size, weight_bytes)


def test_load_adapter_mismatch_leaves_model_unchanged(adapter_file):
    path = adapter_file
    wider = fresh_classifier(hidden=48)
    before = [to_numpy(v).copy() for v in wider.weights]
    flags = [v.trainable for v in wider.weights]
    with pytest.raises(ValueError, match=r"Shape mismatch for '.*': the file has"):
        keras_lora.load_adapter(wider, path)
    assert not keras_lora.lora_layers(wider)
    assert [v.trainable for v in wider.weights] == flags
    for value, variable in zip(before, wider.weights):
        np.testing.assert_array_equal(value, to_numpy(variable))
    # An adapted model with other ranks is refused before anything changes.
    other_rank = fresh_classifier()
    keras_lora.enable_lora(other_rank, rank=2, train_layers=["logits"])
    with pytest.raises(ValueError, match="rank=2 in model"):
        keras_lora.load_adapter(other_rank, path)


def test_bad_adapter_files(trained, adapter_file, tmp_path):
    model = fresh_classifier()
    with pytest.raises(ValueError, match="must end in '.keras'"):
        keras_lora.load_adapter(model, tmp_path / "a.h5")
    with pytest.raises(ValueError, match="not found.*missing.keras"):
        keras_lora.load_adapter(model, tmp_path / "missing.keras")
    good = adapter_file
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.keras' is not a readable"):
        keras_lora.load_adapter(model, truncated)
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="garbage.keras' is not a readable"):
        keras_lora.load_adapter(model, garbage)
    foreign = tmp_path / "foreign.keras"
    fresh_classifier().save(foreign)  # a whole model, not an adapter
    with pytest.raises(
        ValueError, match="foreign.keras' is not a keras-lora adapter file"
    ):
        keras_lora.load_adapter(model, foreign)
    assert not keras_lora.lora_layers(model)
    with pytest.raises(ValueError, match="not adapted"):
        keras_lora.save_adapter(model, tmp_path / "x.keras")
    with pytest.raises(ValueError, match="must end in '.keras'"):
        keras_lora.save_adapter(trained, tmp_path / "x.zip")


def test_failed_write_keeps_the_existing_file(trained, tmp_path):
    model = trained
    path = tmp_path / "a.keras"
    keras_lora.save_adapter(model, path)
    good = path.read_bytes()
    model._keras_lora_spec["train_layers"].append("no_such_layer")
    try:
        with pytest.raises(KeyError):
            keras_lora.save_adapter(model, path)
    finally:
        model._keras_lora_spec["train_layers"].pop()
    assert path.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == ["a.keras"]  # no temporary left


def test_full_save_and_resume(tmp_path):
    model = trained_classifier()
    x = bert_batch(8)
    expected = to_numpy(model(x))
    path = tmp_path / "full.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(to_numpy(loaded(x)), expected, rtol=1e-6, atol=1e-6)
    assert [v.path for v in loaded.trainable_weights] == [
        v.path for v in model.trainable_weights
    ]
    # The optimizer state came back: one more identical step on both models
    # gives identical weights.
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations)
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-6, atol=1e-7)
    model.fit(x, Y, epochs=1, batch_size=8, verbose=0, shuffle=False)
    loaded.fit(x, Y, epochs=1, batch_size=8, verbose=0, shuffle=False)
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), atol=1e-5)


EXPORT_CHECK = """
import sys, numpy as np, keras
t = np.load(sys.argv[2])
x = {"token_ids": t, "segment_ids": np.zeros_like(t), "padding_mask": np.ones_like(t)}
model = keras.saving.load_model(sys.argv[1])
assert "keras_lora" not in sys.modules
out = keras.ops.convert_to_numpy(model(x))
np.save(sys.argv[3], out)
print(type(model).__name__, sorted({type(l).__name__ for l in model._flatten_layers()}))
"""


def test_export_merged_loads_without_keras_lora(trained, tmp_path):
    model = trained
    x = bert_batch(4)
    expected = to_numpy(model(x))
    classes_before = [type(lyr) for lyr in model._flatten_layers()]
    path = keras_lora.export_merged(model, tmp_path / "merged.keras")
    # The live model is untouched.
    assert [type(lyr) for lyr in model._flatten_layers()] == classes_before
    np.testing.assert_array_equal(to_numpy(model(x)), expected)
    with zipfile.ZipFile(path) as archive:
        config = archive.read("config.json").decode()
        import io

        import h5py  # noqa: E401

        names = []
        h5py.File(io.BytesIO(archive.read("model.weights.h5"))).visit(names.append)
    assert "lora" not in config.lower() and "keras_lora" not in config
    assert "compile_config" not in json.loads(config)
    assert not any("lora" in n for n in names)
    # A fresh optimizer only (iterations, learning rate): a KerasHub task
    # compiles itself on loading and would warn about a missing one.
    assert [n for n in names if n.startswith("optimizer/vars/")] == [
        "optimizer/vars/0",
        "optimizer/vars/1",
    ]
    np.save(tmp_path / "x.npy", x["token_ids"])
    result = subprocess.run(
        [sys.executable, "-c", EXPORT_CHECK, str(path), str(tmp_path / "x.npy"),
         str(tmp_path / "y.npy")],
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA" not in result.stdout and "BertTextClassifier" in result.stdout
    assert "Skipping variable loading" not in result.stderr  # see export.py
    np.testing.assert_allclose(
        np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-5
    )
    # And the live model keeps training.
    model.fit(x, Y[:4], epochs=1, verbose=0)


def test_merge_lora_callback_at_train_end_and_best_only(trained, tmp_path):
    model = trained
    x = bert_batch(8)
    final = tmp_path / "final.keras"
    model.fit(x, Y, epochs=2, verbose=0, callbacks=[keras_lora.MergeLoRA(str(final))])
    loaded = keras.saving.load_model(final)
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), atol=1e-5)

    best = keras_lora.MergeLoRA(
        str(tmp_path / "best-{epoch:02d}-{loss:.3f}.keras"),
        monitor="loss",
        save_best_only=True,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(x, Y, epochs=3, verbose=0, callbacks=[best])
    losses = history.history["loss"]
    improving = [i for i in range(3) if losses[i] == min(losses[: i + 1])]
    assert len(best.exported) == len(improving)
    for path in best.exported:
        assert os.path.isfile(path) and "best-0" in path
    with pytest.raises(ValueError, match="mode="):
        keras_lora.MergeLoRA(str(final), mode="up")
    with pytest.raises(ValueError, match="filepath="):
        keras_lora.MergeLoRA("merged.h5")
