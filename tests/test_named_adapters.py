"""Named adapters on one model: add, activate, weight, combine, save, serve."""

import keras
import numpy as np
import pytest

import keras_lora
from helpers import to_numpy

X = np.random.default_rng(0).normal(size=(8, 8)).astype("float32")
TASK_A = np.random.default_rng(1).normal(size=(8, 3)).astype("float32")
TASK_B = np.random.default_rng(2).normal(size=(8, 3)).astype("float32")


def mlp(seed=5):
    keras.utils.set_random_seed(seed)
    x = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    h = keras.layers.Dense(16, name="middle")(h)
    y = keras.layers.Dense(3, name="head")(h)
    return keras.Model(x, y, name="mlp")


def values(model):
    return {v.path: to_numpy(v).copy() for v in model.weights}


def train(model, y, epochs=3):
    model.compile(optimizer=keras.optimizers.Adam(2e-2), loss="mse")
    model.fit(X, y, epochs=epochs, batch_size=8, verbose=0)


@pytest.fixture(scope="module")
def two_tasks():
    """A model with 'a' (hidden+middle, head trained) and 'b' (all-linear, r=2),
    each trained on its own task, and the base outputs."""
    model = mlp()
    base = to_numpy(model(X))
    keras_lora.add_adapter(
        model, "a", rank=4, targets=["hidden", "middle"], train_layers=["head"]
    )
    keras_lora.add_adapter(model, "b", rank=2, targets="all-linear")
    assert keras_lora.list_adapters(model) == ["a", "b"]
    assert keras_lora.active_adapters(model) == [("a", 1.0)]
    train(model, TASK_A)
    out_a = to_numpy(model(X))
    keras_lora.set_adapter(model, "b")
    before_b = values(model)
    train(model, TASK_B)
    out_b = to_numpy(model(X))
    return model, base, out_a, out_b, before_b


def test_each_adapter_gives_its_own_outputs_and_none_gives_the_base(two_tasks):
    model, base, out_a, out_b, _ = two_tasks
    assert np.abs(out_a - base).max() > 1e-2 and np.abs(out_b - out_a).max() > 1e-2
    keras_lora.set_adapter(model, "a")
    np.testing.assert_allclose(to_numpy(model(X)), out_a, atol=1e-6)
    keras_lora.set_adapter(model, None)  # the base, trained head included
    np.testing.assert_array_equal(to_numpy(model(X)), base)
    keras_lora.set_adapter(model, "b")
    np.testing.assert_allclose(to_numpy(model(X)), out_b, atol=1e-6)


def test_training_one_adapter_leaves_the_others_bit_identical(two_tasks):
    model, _, _, _, before_b = two_tasks
    after = values(model)
    changed = sorted(p for p in before_b if not np.array_equal(before_b[p], after[p]))
    assert changed, "training 'b' changed nothing"
    assert all(
        p.split("/")[-1] in ("lora_a_b", "lora_b_b") or p.startswith("head/lora_")
        for p in changed
    ), changed
    # Only 'b's factors were trainable while 'b' was active.
    keras_lora.set_adapter(model, "b")
    assert {v.path for v in model.trainable_weights} == {
        "hidden/lora_a_b", "hidden/lora_b_b", "middle/lora_a_b",
        "middle/lora_b_b", "head/lora_a", "head/lora_b",
    }  # fmt: skip
    keras_lora.set_adapter(model, "a")
    assert {v.path for v in model.trainable_weights} == {
        "hidden/lora_a", "hidden/lora_b", "middle/lora_a", "middle/lora_b",
        "head/kernel", "head/bias",
    }  # fmt: skip


def test_weighted_set_cat_and_svd_are_the_weighted_sum_of_updates(two_tasks):
    model, base, out_a, out_b, _ = two_tasks
    weights = [0.7, -1.3]
    # 'a' trains the head, so the weighted set is taken head-free: compare
    # updates through the layers with the head at its base values.
    keras_lora.set_adapter(model, "b")
    by_layer = {}
    for layer in keras_lora.lora_layers(model):
        total = np.zeros(layer.lora_base_kernel.shape)
        for name, w in zip(["a", "b"], weights):
            if name in layer.lora_adapter_names:
                ad = layer.lora_adapter(name)
                total += w * ad.scale * to_numpy(ad.a) @ to_numpy(ad.b)
        by_layer[layer.path] = total
    keras_lora.combine_adapters(model, ["a", "b"], weights, "cat", "cat")
    keras_lora.combine_adapters(model, ["a", "b"], weights, "full", "svd", rank=6)
    for name in ("cat", "full"):
        for layer in keras_lora.lora_layers(model):
            ad = layer.lora_adapter(name)
            got = ad.scale * to_numpy(ad.a) @ to_numpy(ad.b)
            np.testing.assert_allclose(got, by_layer[layer.path], atol=1e-5)
    assert model.get_layer("hidden").lora_adapter("cat").rank == 6
    keras_lora.combine_adapters(model, ["a", "b"], weights, "low", "svd", rank=1)
    assert model.get_layer("hidden").lora_adapter("low").rank == 1
    with pytest.raises(ValueError, match="one rank"):
        keras_lora.combine_adapters(model, ["a", "b"], weights, "lin", "linear")
    # A weighted active set computes the same as the 'cat' adapter.
    keras_lora.set_adapter(model, None)
    head = {v.path: to_numpy(v) for v in model.get_layer("head").weights}
    keras_lora.set_adapter(model, "cat")
    cat_out = to_numpy(model(X))
    keras_lora.set_adapter(model, ["b", "cat"], [1.0, 0.0])  # weights 0 count too
    np.testing.assert_allclose(to_numpy(model(X)), out_b, atol=1e-5)
    now = {v.path: to_numpy(v) for v in model.get_layer("head").weights}
    for path, value in head.items():  # 'cat' owns no head: base values
        np.testing.assert_array_equal(now[path], value)
    assert np.isfinite(cat_out).all()
    for name in ("cat", "full", "low"):
        keras_lora.delete_adapter(model, name)
    assert keras_lora.list_adapters(model) == ["a", "b"]


def test_switching_keeps_compiled_predict_functions(two_tasks):
    model, _, out_a, out_b, _ = two_tasks
    keras_lora.set_adapter(model, "a")
    np.testing.assert_allclose(model.predict(X, verbose=0), out_a, atol=1e-5)
    predict_a = model.predict_function
    keras_lora.set_adapter(model, "b")
    np.testing.assert_allclose(model.predict(X, verbose=0), out_b, atol=1e-5)
    predict_b = model.predict_function
    keras_lora.set_adapter(model, "a")
    assert model.predict_function is predict_a  # traced once per configuration
    np.testing.assert_allclose(model.predict(X, verbose=0), out_a, atol=1e-5)
    keras_lora.set_adapter(model, "b")
    assert model.predict_function is predict_b


def test_mixed_batch_equals_each_example_alone(two_tasks):
    model, base, _, out_b, _ = two_tasks
    keras_lora.combine_adapters(model, ["b"], [2.0], "b2", "cat")
    keras_lora.set_adapter(model, "b2")
    out_b2 = to_numpy(model(X))
    ids = ["b", "b2", None, "b", "b2", None, "b2", "b"]
    with keras_lora.adapter_ids(model, ids):
        mixed = model.predict(X, batch_size=8, verbose=0)
        eager = to_numpy(model(X))
    expected = np.stack(
        [{"b": out_b, "b2": out_b2, None: base}[n][i] for i, n in enumerate(ids)]
    )
    np.testing.assert_allclose(mixed, expected, atol=1e-5)
    np.testing.assert_allclose(eager, expected, atol=1e-5)
    np.testing.assert_allclose(to_numpy(model(X)), out_b2, atol=1e-6)  # back
    # Entered from another configuration whose trainable factors have the
    # same shapes ('b' instead of 'b2'): its own compiled function, same result.
    keras_lora.set_adapter(model, "b")
    with keras_lora.adapter_ids(model, ids):
        np.testing.assert_allclose(
            model.predict(X, batch_size=8, verbose=0), expected, atol=1e-5
        )
    with pytest.raises(ValueError, match="train heads"):
        with keras_lora.adapter_ids(model, ["a"] * 8):
            pass
    with pytest.raises(ValueError, match="not an adapter"):
        with keras_lora.adapter_ids(model, ["zzz"] * 8):
            pass
    keras_lora.delete_adapter(model, "b2")


def test_files_by_name_round_trip(two_tasks, tmp_path):
    model, base, out_a, out_b, _ = two_tasks
    keras_lora.save_adapter(model, tmp_path / "a.keras", name="a")
    keras_lora.save_adapter(model, tmp_path / "b.keras", name="b")
    # Onto a fresh base: the first file as the model's adapter, the second
    # under a name; a single-adapter file loads as a named adapter.
    fresh = mlp()
    keras_lora.load_adapter(fresh, tmp_path / "a.keras", name="first")
    keras_lora.load_adapter(fresh, tmp_path / "b.keras", name="second")
    assert keras_lora.list_adapters(fresh) == ["first", "second"]
    np.testing.assert_allclose(to_numpy(fresh(X)), out_a, atol=1e-6)
    keras_lora.set_adapter(fresh, "second")
    np.testing.assert_allclose(to_numpy(fresh(X)), out_b, atol=1e-6)
    keras_lora.set_adapter(fresh, None)
    np.testing.assert_array_equal(to_numpy(fresh(X)), base)
    with pytest.raises(ValueError, match="already has an adapter named 'second'"):
        keras_lora.load_adapter(fresh, tmp_path / "b.keras", name="second")
    # enable_lora's adapter is "default" and its file loads under any name.
    single = mlp()
    keras_lora.enable_lora(single, rank=2, targets=["hidden"])
    assert keras_lora.list_adapters(single) == ["default"]
    keras_lora.load_adapter(single, tmp_path / "b.keras", name="b")
    keras_lora.set_adapter(single, "b")
    np.testing.assert_allclose(to_numpy(single(X)), out_b, atol=1e-6)
    # The whole model, with every adapter, through model.save.
    path = tmp_path / "model.keras"
    fresh.save(path)
    loaded = keras.saving.load_model(path)
    assert keras_lora.list_adapters(loaded) == ["first", "second"]
    assert keras_lora.active_adapters(loaded) == []
    np.testing.assert_array_equal(to_numpy(loaded(X)), base)


def test_delete_and_errors(two_tasks):
    model = mlp()
    keras_lora.add_adapter(model, "x", rank=2, targets=["hidden"])
    keras_lora.add_adapter(model, "y", rank=2, targets=["middle"])
    with pytest.raises(ValueError, match="already has an adapter named 'x'"):
        keras_lora.add_adapter(model, "x")
    with pytest.raises(ValueError, match="letters, digits or underscores"):
        keras_lora.add_adapter(model, "no spaces")
    with pytest.raises(ValueError, match="has no adapter 'z'"):
        keras_lora.set_adapter(model, "z")
    with pytest.raises(ValueError, match="one per name"):
        keras_lora.set_adapter(model, ["x", "y"], weights=[1.0])
    keras_lora.delete_adapter(model, "x")
    assert type(model.get_layer("hidden")) is keras.layers.Dense
    assert keras_lora.list_adapters(model) == ["y"]
    keras_lora.delete_adapter(model, "y")
    assert not keras_lora.lora_layers(model) and keras_lora.list_adapters(model) == []
    assert all(v.trainable for v in model.weights)


def test_generate_with_several_adapters_in_one_batch():
    pytest.importorskip("keras_hub")
    from helpers import tiny_gpt2_causal_lm, token_batch

    keras.utils.set_random_seed(3)
    lm = tiny_gpt2_causal_lm(num_layers=1)
    lm.compile(sampler="greedy")  # deterministic: alone and mixed comparable
    prompts = token_batch(batch=3, seq=8)
    prompts["padding_mask"][:, 4:] = 0  # 4 prompt tokens, 4 to generate
    for name, seed in (("x", 1), ("y", 2)):
        keras_lora.add_adapter(lm, name, rank=2)
        rng = np.random.default_rng(seed)
        for layer in keras_lora.lora_layers(lm):
            ad = layer.lora_adapter(name)
            ad.b.assign(rng.normal(0, 2.0, ad.b.shape).astype("float32"))
    alone = {}
    for name in ("x", "y", None):
        keras_lora.set_adapter(lm, name)
        alone[name] = np.asarray(lm.generate(prompts, stop_token_ids=None)["token_ids"])
    assert not np.array_equal(alone["x"], alone[None])
    ids = ["x", "y", None]
    with keras_lora.adapter_ids(lm, ids):
        mixed = np.asarray(lm.generate(prompts, stop_token_ids=None)["token_ids"])
    for i, name in enumerate(ids):
        np.testing.assert_array_equal(mixed[i], alone[name][i])


def test_export_merges_the_chosen_adapter_or_weighted_set(two_tasks, tmp_path):
    model, base, _, out_b, _ = two_tasks
    keras_lora.set_adapter(model, "b")
    keras_lora.export_merged(model, tmp_path / "b.keras")
    plain = keras.saving.load_model(tmp_path / "b.keras")
    assert not keras_lora.lora_layers(plain)
    np.testing.assert_allclose(to_numpy(plain(X)), out_b, atol=1e-5)
    # A weighted set: half of 'b' is half of its update on every layer.
    keras_lora.set_adapter(model, ["b"], weights=[0.5])
    half = to_numpy(model(X))
    keras_lora.export_merged(model, tmp_path / "half.keras")
    plain = keras.saving.load_model(tmp_path / "half.keras")
    np.testing.assert_allclose(to_numpy(plain(X)), half, atol=1e-5)
    assert np.abs(half - out_b).max() > 1e-3 and np.abs(half - base).max() > 1e-3
    keras_lora.set_adapter(model, "b")


def test_an_adapter_with_dropout_trains_and_deletes_like_the_first():
    # A further adapter's dropout seed used to be untracked: deleting it
    # raised `list.remove(x): x not in list` (the first adapter's was tracked).
    model = mlp()
    keras_lora.add_adapter(model, "a", rank=2, dropout=0.1)
    keras_lora.add_adapter(model, "b", rank=2, dropout=0.1)
    hidden = model.get_layer("hidden")
    seeds = list(hidden._seed_generators)
    assert len(seeds) == 2
    keras_lora.set_adapter(model, "b")
    before = values(model)
    train(model, TASK_B, epochs=2)  # A moves once B is not zero
    after = values(model)
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert {"hidden/lora_a_b", "hidden/lora_b_b"} <= changed
    assert not any(p.endswith(("lora_a", "lora_b")) for p in changed)
    keras_lora.delete_adapter(model, "b")
    assert keras_lora.list_adapters(model) == ["a"]
    assert hidden._seed_generators == seeds[:1]
    assert [v.name for v in hidden.weights] == ["kernel", "bias", "lora_a", "lora_b"]


def test_add_adapter_takes_enable_lora_arguments_by_keyword():
    model = mlp()
    with pytest.raises(ValueError, match="use_dora=True"):
        keras_lora.add_adapter(model, "a", use_dora=True)
    with pytest.raises(ValueError, match="rnak=2"):
        keras_lora.add_adapter(model, "a", rnak=2)
    assert keras_lora.list_adapters(model) == []
    keras_lora.add_adapter(model, "a", rank=2, targets=["hidden"])
    assert model.get_layer("hidden").rank == 2
