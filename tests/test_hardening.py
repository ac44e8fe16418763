"""Hostile adapter files and calls that must not fail half-way (issue 10).

Each test names the audit item it covers. The crafted files are built here,
from a real adapter file, by rewriting one of its three members.
"""

import io
import json
import os
import stat
import subprocess
import sys
import zipfile

import h5py
import keras
import numpy as np
import pytest

import keras_lora
from helpers import to_numpy

X = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
Y = np.random.default_rng(1).normal(size=(16, 3)).astype("float32")


def mlp(seed=3):
    """Dense -> BatchNormalization -> Dense, the same 'pretrained' base each call."""
    keras.utils.set_random_seed(seed)
    x = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    h = keras.layers.BatchNormalization(name="norm")(h)
    y = keras.layers.Dense(3, name="head")(h)
    return keras.Model(x, y, name="mlp")


def flags(model):
    return (
        model.trainable,
        [layer.trainable for layer in model._flatten_layers()],
        [v.trainable for v in model.weights],
    )


def values(model):
    return [to_numpy(v).copy() for v in model.weights]


def assert_untouched(model, before_flags, before_values):
    assert not keras_lora.lora_layers(model)
    assert not hasattr(model, "_keras_lora_spec")
    assert flags(model) == before_flags
    for old, variable in zip(before_values, model.weights):
        np.testing.assert_array_equal(old, to_numpy(variable))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A trained adapter of `mlp()` (hidden adapted, head trained)."""
    model = mlp()
    keras_lora.enable_lora(model, rank=2, targets=["hidden"], train_layers=["head"])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(X, Y, epochs=2, batch_size=8, verbose=0)
    path = tmp_path_factory.mktemp("adapter") / "good.keras"
    keras_lora.save_adapter(model, path)
    return path


def rewrite(src, dst, weights=None, config=None, metadata=None):
    """Copies adapter `src` to `dst`, replacing members by the given builders.

    `weights(h5file, arrays)` writes a new HDF5 member; `config(dict)` and
    `metadata(dict)` edit the JSON members in place.
    """
    with zipfile.ZipFile(src) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    if weights is not None:
        with h5py.File(io.BytesIO(members["adapter.weights.h5"]), "r") as old:
            arrays = {name: old[name][()] for name in old}
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as new:
            weights(new, arrays)
        members["adapter.weights.h5"] = buffer.getvalue()
    for name, edit in (("config.json", config), ("metadata.json", metadata)):
        if edit is not None:
            content = json.loads(members[name])
            edit(content)
            members[name] = json.dumps(content).encode()
    with zipfile.ZipFile(dst, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return dst


def refused(path, match):
    """Loading `path` onto a fresh base raises `match` and changes nothing."""
    model = mlp()
    before = flags(model), values(model)
    with pytest.raises(ValueError, match=match) as error:
        keras_lora.load_adapter(model, path)
    assert os.path.basename(path) in str(error.value)
    assert_untouched(model, *before)


# 1. Security: HDF5 features that reach outside the file or expand it.


def test_item1_external_storage_is_refused(adapter, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(4096, dtype="<f4").tobytes())

    def external(h5, arrays):
        n = arrays["float32"].size
        h5.create_dataset("float32", (n,), "<f4", external=[(str(secret), 0, 4 * n)])

    path = rewrite(adapter, tmp_path / "external.keras", weights=external)
    refused(path, "external storage")


def test_item1_compressed_memory_bomb_is_refused(adapter, tmp_path):
    def bomb(h5, arrays):
        # 2**37 floats (512 GiB) declared, a few KB on disk.
        h5.create_dataset(
            "float32", (2**37,), "<f4", chunks=(2**20,), compression="gzip"
        )

    path = rewrite(adapter, tmp_path / "bomb.keras", weights=bomb)
    assert path.stat().st_size < 64 * 1024
    refused(path, "compressed or filtered|declares|is float32")
    # The index may declare the bomb's size too: refused before any read.
    huge = rewrite(
        path,
        tmp_path / "bomb2.keras",
        config=lambda c: c["weights"]["train/head/bias"].update(shape=[2**37]),
    )
    refused(huge, "Shape mismatch for 'train/head/bias'")
    with pytest.raises(ValueError, match="compressed or filtered|declares"):
        keras_lora.adapters.read_adapter(huge)


def test_item1_links_virtual_and_retyped_datasets_are_refused(adapter, tmp_path):
    def soft(h5, arrays):
        h5["real"] = arrays["float32"]
        h5["float32"] = h5py.SoftLink("/real")

    refused(rewrite(adapter, tmp_path / "soft.keras", weights=soft), "SoftLink")

    def virtual(h5, arrays):
        n = arrays["float32"].size
        h5["real"] = arrays["float32"]
        layout = h5py.VirtualLayout(shape=(n,), dtype="<f4")
        layout[:] = h5py.VirtualSource(h5["real"])
        h5.create_virtual_dataset("float32", layout)

    refused(rewrite(adapter, tmp_path / "virtual.keras", weights=virtual), "virtual")

    def float64(h5, arrays):
        h5["float32"] = arrays["float32"].astype("float64")

    refused(rewrite(adapter, tmp_path / "f64.keras", weights=float64), "is float64")

    def unallocated(h5, arrays):
        h5.create_dataset("float32", arrays["float32"].shape, "<f4")

    refused(rewrite(adapter, tmp_path / "empty.keras", weights=unallocated), "stores")


# 2. A model compiled with a plain Python loss and metric.


def my_loss(y_true, y_pred):
    return keras.ops.mean(keras.ops.square(y_true - y_pred))


def test_item2_plain_function_loss_survives_enable_merge_and_load(adapter):
    model = mlp()
    metric = lambda y_true, y_pred: keras.ops.mean(y_pred)  # noqa: E731
    model.compile(optimizer="adam", loss=my_loss, metrics=[metric])
    model.fit(X, Y, epochs=1, verbose=0)
    keras_lora.enable_lora(model, rank=2, targets=["hidden"])
    assert model.loss is my_loss
    history = model.fit(X, Y, epochs=2, verbose=0).history["loss"]
    assert np.isfinite(history).all()
    keras_lora.merge_lora(model)
    assert not keras_lora.lora_layers(model) and model.loss is my_loss
    model.fit(X, Y, epochs=1, verbose=0)
    # load_adapter on a compiled, fitted base: weights assigned, fit runs.
    fresh = mlp()
    fresh.compile(optimizer="adam", loss=my_loss)
    fresh.fit(X, Y, epochs=1, verbose=0)
    keras_lora.load_adapter(fresh, adapter)
    assert len(keras_lora.lora_layers(fresh)) == 1
    assert np.abs(to_numpy(fresh.get_layer("hidden").lora_b)).max() > 0
    fresh.fit(X, Y, epochs=1, verbose=0)


def test_item2_failed_load_keeps_the_optimizer_and_its_state(adapter, tmp_path):
    model = mlp()
    model.compile(optimizer="adam", loss=my_loss)
    model.fit(X, Y, epochs=1, verbose=0)
    optimizer = model.optimizer
    iterations = int(to_numpy(optimizer.iterations))
    bad = rewrite(
        adapter,
        tmp_path / "bad.keras",
        config=lambda c: c["weights"]["train/head/bias"].update(shape=[4]),
    )
    with pytest.raises(ValueError, match="Shape mismatch"):
        keras_lora.load_adapter(model, bad)
    assert model.optimizer is optimizer
    assert int(to_numpy(optimizer.iterations)) == iterations
    model.fit(X, Y, epochs=1, verbose=0)


# 3. A malformed spec is refused before anything changes.


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c["spec"].pop("train_layers"), "lacks the keys"),
        (lambda c: c["spec"].update(version=99), "`version` must be 1"),
        (lambda c: c["spec"].update(layers=["hidden"]), "`layers` must be"),
        (lambda c: c["spec"].update(train_layers=None), "`train_layers` must"),
        (lambda c: c["spec"].update(extra=1), "unknown keys"),
        (
            lambda c: c["spec"]["layers"]["hidden"].update(
                a_initializer={"class_name": "Constant", "config": {"value": 9}}
            ),
            "must have exactly the keys",
        ),
        (
            lambda c: c["spec"]["layers"]["hidden"].update(rank="2"),
            "out of range",
        ),
        (lambda c: c["spec"]["layers"]["hidden"].update(dropout=2), "out of range"),
        (lambda c: c.update(spec=[]), "must be a JSON object"),
    ],
)
def test_item3_malformed_spec_is_refused_untouched(adapter, tmp_path, edit, match):
    refused(rewrite(adapter, tmp_path / "spec.keras", config=edit), match)


def test_item3_metadata_version_and_members(adapter, tmp_path):
    newer = rewrite(
        adapter, tmp_path / "newer.keras", metadata=lambda m: m.update(format_version=2)
    )
    refused(newer, "format_version=2")
    extra = tmp_path / "extra.keras"
    extra.write_bytes(adapter.read_bytes())
    with zipfile.ZipFile(extra, "a") as archive:
        archive.writestr("payload.pkl", b"\x80\x04N.")
    refused(extra, "must hold exactly")


# 4. Trainable flags come back from the model, not from the file.


def test_item4_flags_are_the_models_own(adapter):
    model = mlp()
    model.trainable = False
    before = flags(model), values(model)
    # A failed enable_lora (rank too large for 'head') leaves the flags.
    with pytest.raises(ValueError, match="rank"):
        keras_lora.enable_lora(model, rank=8, targets=["head"])
    assert_untouched(model, *before)
    # A successful load_adapter + merge_lora gives the frozen model back.
    keras_lora.load_adapter(model, adapter)
    assert [v.path for v in model.trainable_weights] == [
        "hidden/lora_a",
        "hidden/lora_b",
        "head/kernel",
        "head/bias",
    ]
    keras_lora.merge_lora(model)
    assert flags(model) == before[0]
    assert model.trainable_weights == []
    # A partly frozen model: 'norm' frozen by the user stays frozen.
    model = mlp()
    model.get_layer("norm").trainable = False
    before = flags(model)
    keras_lora.enable_lora(model, rank=2, targets=["hidden"])
    keras_lora.merge_lora(model)
    assert flags(model) == before


# 5. Frozen BatchNormalization layers run in inference mode.


def test_item5_frozen_batchnorm_keeps_its_statistics(adapter, tmp_path):
    model = mlp()
    norm = model.get_layer("norm")
    stats = [to_numpy(v).copy() for v in norm.weights]
    base = to_numpy(model(X))
    keras_lora.enable_lora(model, rank=2, targets=["hidden"], train_layers=["head"])
    assert not norm.trainable and model.get_layer("hidden").trainable
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(X + 3.0, Y, epochs=2, batch_size=8, verbose=0)
    for old, variable in zip(stats, norm.weights):
        np.testing.assert_array_equal(old, to_numpy(variable))
    with keras_lora.disable_lora(model):
        np.testing.assert_allclose(to_numpy(model(X)), base, atol=1e-6)
    trained = to_numpy(model(X))
    assert np.abs(trained - base).max() > 1e-3
    path = tmp_path / "a.keras"
    keras_lora.save_adapter(model, path)
    fresh = mlp()
    keras_lora.load_adapter(fresh, path)
    np.testing.assert_allclose(to_numpy(fresh(X)), trained, atol=1e-6)


def test_item5_batchnorm_in_train_layers_trains_and_is_saved(tmp_path):
    model = mlp()
    norm = model.get_layer("norm")
    stats = [to_numpy(v).copy() for v in norm.weights]
    keras_lora.enable_lora(model, rank=2, targets=["hidden"], train_layers=["norm"])
    assert norm.trainable
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(X + 3.0, Y, epochs=1, batch_size=8, verbose=0)
    moved = [to_numpy(v) for v in norm.weights]
    assert any(np.abs(a - b).max() > 1e-3 for a, b in zip(stats, moved))
    path = tmp_path / "bn.keras"
    keras_lora.save_adapter(model, path)
    fresh = mlp()
    keras_lora.load_adapter(fresh, path)
    np.testing.assert_allclose(to_numpy(fresh(X)), to_numpy(model(X)), atol=1e-6)


# 6. File modes and symlinks, as `open(path, "w")` would leave them.


def test_item6_modes_and_symlinks(adapter, tmp_path):
    model = mlp()
    keras_lora.load_adapter(model, adapter)
    previous = os.umask(0o022)
    try:
        new = tmp_path / "new.keras"
        keras_lora.save_adapter(model, new)
        assert stat.S_IMODE(new.stat().st_mode) == 0o644
        keras_lora.export_merged(model, tmp_path / "merged.keras")
        assert stat.S_IMODE((tmp_path / "merged.keras").stat().st_mode) == 0o644
        os.chmod(new, 0o640)
        keras_lora.save_adapter(model, new)
        assert stat.S_IMODE(new.stat().st_mode) == 0o640
        os.umask(0o077)
        private = tmp_path / "private.keras"
        keras_lora.save_adapter(model, private)
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        os.umask(previous)
    target = tmp_path / "target" / "real.keras"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "link.keras"
    link.symlink_to(target)
    keras_lora.save_adapter(model, link)
    assert link.is_symlink() and zipfile.is_zipfile(target)
    assert sorted(os.listdir(target.parent)) == ["real.keras"]


# 7. and 8. Offsets and index fields of the adapter's weight index.


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"offset": 1}, "overlapping or gapped"),
        ({"offset": 2.0}, "must be"),
        ({"offset": "0"}, "must be"),
        ({"shape": [-8, 2]}, "must be"),
        ({"shape": "8,2"}, "must be"),
        ({"dtype": "object"}, "must be"),
    ],
)
def test_item7_8_weight_index_is_exact(adapter, tmp_path, entry, match):
    def edit(config):
        first = next(iter(config["weights"].values()))
        first.update(entry)

    path = rewrite(adapter, tmp_path / "index.keras", config=edit)
    refused(path, match)


def test_item7_overlapping_offsets_are_refused(adapter, tmp_path):
    def overlap(config):
        entries = list(config["weights"].values())
        entries[1]["offset"] = entries[0]["offset"]  # both read the same bytes

    refused(rewrite(adapter, tmp_path / "overlap.keras", config=overlap), "overlap")


# 9. Messages.


def test_item9_alpha_none_equals_alpha_rank(adapter):
    model = mlp()
    keras_lora.enable_lora(
        model, rank=2, alpha=2, targets=["hidden"], train_layers=["head"]
    )
    keras_lora.load_adapter(model, adapter)  # saved with alpha=None
    assert np.abs(to_numpy(model.get_layer("hidden").lora_b)).max() > 0


def test_item9_unbuilt_model_says_build_it_first(adapter):
    model = keras.Sequential([keras.layers.Dense(16, name="hidden")])
    with pytest.raises(ValueError, match="must be built"):
        keras_lora.load_adapter(model, adapter)


def test_item9_unwritable_folder_names_the_requested_path(adapter):
    if (
        not os.path.isdir("/sys")
        or os.access("/sys", os.W_OK | os.X_OK)
        and (os.geteuid() != 0)
    ):
        pytest.skip("needs a folder nobody can write to")
    model = mlp()
    keras_lora.load_adapter(model, adapter)
    with pytest.raises(OSError) as error:
        keras_lora.save_adapter(model, "/sys/adapter.keras")
    assert "/sys/adapter.keras" in str(error.value)
    assert ".tmp" not in str(error.value)


LOAD_WITHOUT_IMPORT = """
import sys, keras
try:
    keras.saving.load_model(sys.argv[1])
except Exception as error:
    print(type(error).__name__, error)
"""


def test_item9_loading_without_import_names_keras_lora(tmp_path):
    model = mlp()
    keras_lora.enable_lora(model, rank=2, targets=["hidden"])
    path = tmp_path / "adapted.keras"
    model.save(path)
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_IMPORT, str(path)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "keras_lora" in result.stdout and "imported" in result.stdout
    assert "Functional.__init__" not in result.stdout
    # With keras_lora imported it loads, adapted.
    loaded = keras.saving.load_model(path)
    assert len(keras_lora.lora_layers(loaded)) == 1


def test_disable_lora_after_reload_warns_that_heads_stay_trained(tmp_path):
    model = mlp()
    keras_lora.enable_lora(model, rank=2, targets=["hidden"], train_layers=["head"])
    model.get_layer("head").bias.assign(np.ones(3, "float32"))
    path = tmp_path / "adapted.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    with pytest.warns(UserWarning, match=r"\['head'\].*keep their trained values"):
        with keras_lora.disable_lora(loaded):
            bias = to_numpy(loaded.get_layer("head").bias)
    np.testing.assert_array_equal(bias, np.ones(3, "float32"))
    # The live model knows its base values: the head goes back inside.
    with keras_lora.disable_lora(model):
        assert np.abs(to_numpy(model.get_layer("head").bias) - 1).min() > 0
    np.testing.assert_array_equal(to_numpy(model.get_layer("head").bias), 1.0)


def test_adapted_sequential_model_reloads(tmp_path):
    # A Sequential model built with an Input names its layers "<model>/<layer>"
    # and the reloaded one "<layer>": specs record paths relative to the model.
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, name="hidden"),
            keras.layers.Dense(3, name="head"),
        ],
        name="seq",
    )
    model.get_layer("head").trainable = False
    keras_lora.enable_lora(model, rank=2, targets=["hidden"])
    keras_lora.lora_layers(model)[0].lora_b.assign(np.ones((2, 16), "float32"))
    expected = to_numpy(model(X))
    path = tmp_path / "seq.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(to_numpy(loaded(X)), expected, atol=1e-6)
    keras_lora.save_adapter(model, tmp_path / "a.keras")
    keras_lora.load_adapter(loaded, tmp_path / "a.keras")
    keras_lora.merge_lora(loaded)
    assert not loaded.get_layer("head").trainable  # the user's flag came back
    np.testing.assert_allclose(to_numpy(loaded(X)), expected, atol=1e-5)
