"""`enable_lora` on plain Keras models: targets, freezing, summary, errors."""

import io

import keras
import numpy as np
import pytest

import keras_lora
from helpers import randomize_factors, to_numpy


def functional_mlp():
    x = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    h = keras.layers.BatchNormalization(name="norm")(h)
    y = keras.layers.Dense(3, name="head")(h)
    return keras.Model(x, y, name="mlp")


def sequential_mlp():
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(3, name="head"),
        ],
        name="seq",
    )


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(16, activation="relu", name="hidden")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x):
        return self.head(self.hidden(x))


def subclassed_mlp():
    model = Subclassed(name="sub")
    model(np.zeros((1, 8), "float32"))
    return model


def nested_mlp():
    inner = functional_mlp()
    x = keras.Input((8,))
    y = keras.layers.Dense(2, name="outer_head")(inner(x))
    return keras.Model(x, y, name="outer")


X = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")


@pytest.mark.parametrize(
    "make", [functional_mlp, sequential_mlp, subclassed_mlp, nested_mlp]
)
def test_default_without_attention_adapts_every_dense(make):
    model = make()
    expected = to_numpy(model(X))
    n_dense = sum(
        isinstance(lyr, keras.layers.Dense)
        for lyr in model._flatten_layers(include_self=False)
    )
    assert keras_lora.enable_lora(model, rank=2) is model
    layers = keras_lora.lora_layers(model)
    assert len(layers) == n_dense
    np.testing.assert_array_equal(to_numpy(model(X)), expected)
    names = {v.name for v in model.trainable_weights}
    assert names == {"lora_a", "lora_b"}
    assert len(model.trainable_weights) == 2 * n_dense
    randomize_factors(model)
    assert not np.allclose(to_numpy(model(X)), expected)


def test_targets_names_regex_callable_and_all_linear():
    model = functional_mlp()
    keras_lora.enable_lora(model, rank=2, targets=["head"])
    assert [lyr.name for lyr in keras_lora.lora_layers(model)] == ["head"]

    model = functional_mlp()
    keras_lora.enable_lora(model, rank=2, targets=[r"hid.*"])
    assert [lyr.name for lyr in keras_lora.lora_layers(model)] == ["hidden"]

    model = functional_mlp()
    keras_lora.enable_lora(model, rank=2, targets=lambda lyr: lyr.name == "hidden")
    assert [lyr.name for lyr in keras_lora.lora_layers(model)] == ["hidden"]

    model = functional_mlp()
    keras_lora.enable_lora(model, rank=2, targets="all-linear")
    assert len(keras_lora.lora_layers(model)) == 2


def test_targets_that_match_nothing_raise_with_candidates():
    model = functional_mlp()
    with pytest.raises(ValueError, match=r"\['qeury'\] matched no layer.*hidden"):
        keras_lora.enable_lora(model, targets=["head", "qeury"])
    assert not keras_lora.lora_layers(model)  # nothing half done
    with pytest.raises(ValueError, match="matched no layer"):
        keras_lora.enable_lora(model, targets=lambda lyr: False)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        keras_lora.enable_lora(model, targets=["head["])
    with pytest.raises(
        ValueError, match=r"`targets` must be None.*Received: targets=42"
    ):
        keras_lora.enable_lora(model, targets=42)
    with pytest.raises(ValueError, match="cannot be adapted|LoRA adapts"):
        keras_lora.enable_lora(model, targets=["norm"])


def test_adapting_twice_is_an_error():
    model = functional_mlp()
    keras_lora.enable_lora(model, rank=2)
    with pytest.raises(ValueError, match="already adapted"):
        keras_lora.enable_lora(model, rank=2)
    model = functional_mlp()
    keras_lora.enable_lora(model, rank=2, targets=["head"])
    layer = keras_lora.lora_layers(model)[0]
    with pytest.raises(ValueError, match="already a LoRA layer"):
        type(layer).adapt(layer, rank=2)


def test_bad_arguments_name_the_argument():
    model = functional_mlp()
    with pytest.raises(ValueError, match=r"rank=0"):
        keras_lora.enable_lora(model, rank=0)
    with pytest.raises(ValueError, match=r"alpha=-1"):
        keras_lora.enable_lora(model, alpha=-1)
    with pytest.raises(ValueError, match=r"dropout=1"):
        keras_lora.enable_lora(model, dropout=1)
    with pytest.raises(ValueError, match=r"rank.*at most.*rank=9"):
        keras_lora.enable_lora(model, rank=9)  # head is 16 -> 3
    assert not keras_lora.lora_layers(model)
    assert len(model.trainable_weights) == 6  # untouched after the failure
    with pytest.raises(ValueError, match="must be built"):
        keras_lora.enable_lora(keras.Sequential([keras.layers.Dense(2)]))
    with pytest.raises(ValueError, match="must be a Keras model"):
        keras_lora.enable_lora("model")


def test_train_layers_stay_trainable_and_summary_counts():
    model = functional_mlp()
    keras_lora.enable_lora(model, rank=2, targets=["hidden"], train_layers=["head"])
    trainable = {v.path for v in model.trainable_weights}
    assert trainable == {
        keras_lora.lora_layers(model)[0].lora_a.path,
        keras_lora.lora_layers(model)[0].lora_b.path,
        "head/kernel",
        "head/bias",
    }
    lines = []
    model.summary(print_fn=lambda line, **kwargs: lines.append(line))
    text = "\n".join(lines)
    expected = 2 * (8 + 16) + 16 * 3 + 3
    assert f"Trainable params: {expected}" in text.replace(",", "")
    out = io.StringIO()
    line = keras_lora.print_trainable_parameters(
        model, print_fn=lambda s: out.write(s + "\n")
    )
    total = sum(int(np.prod(v.shape)) for v in model.weights)
    assert line == (
        f"trainable params: {expected:,} || all params: {total:,} || "
        f"trainable%: {100 * expected / total:.4f}"
    )
    assert out.getvalue() == line + "\n"  # PEFT's line only, by default
    out = io.StringIO()
    keras_lora.print_trainable_parameters(
        model, print_fn=lambda s: out.write(s + "\n"), verbose=True
    )
    assert out.getvalue().startswith(line + "\n")
    assert "hidden: rank 2" in out.getvalue()
    with pytest.raises(ValueError, match="both `targets` and `train_layers`"):
        keras_lora.enable_lora(
            functional_mlp(), targets=["head"], train_layers=["head"]
        )


def test_disable_lora_gives_base_outputs_exactly_then_restores():
    model = functional_mlp()
    base = to_numpy(model(X))
    keras_lora.enable_lora(model, rank=2)
    randomize_factors(model)
    adapted = to_numpy(model(X))
    predict_adapted = model.predict(X, verbose=0)  # traces predict
    with keras_lora.disable_lora(model):
        np.testing.assert_array_equal(to_numpy(model(X)), base)
        # The already traced predict function sees it too.
        np.testing.assert_allclose(model.predict(X, verbose=0), base, atol=1e-6)
    np.testing.assert_array_equal(to_numpy(model(X)), adapted)
    np.testing.assert_allclose(model.predict(X, verbose=0), predict_adapted, atol=1e-6)
    with pytest.raises(ValueError, match="no LoRA layer"):
        with keras_lora.disable_lora(functional_mlp()):
            pass


@pytest.mark.parametrize(
    "make", [functional_mlp, sequential_mlp, subclassed_mlp, nested_mlp]
)
def test_merge_lora_restores_classes_flags_and_keeps_outputs(make):
    model = make()
    if model.name == "mlp":
        model.get_layer("norm").trainable = False  # frozen before: stays so
    flags_before = [(v.path, v.trainable) for v in model.weights]
    keras_lora.enable_lora(model, rank=2)
    randomize_factors(model)
    adapted = to_numpy(model(X))
    assert keras_lora.merge_lora(model) is model
    np.testing.assert_allclose(to_numpy(model(X)), adapted, rtol=1e-5, atol=1e-5)
    assert not keras_lora.lora_layers(model)
    assert all(
        type(lyr).__name__ != "LoRADense"
        for lyr in model._flatten_layers(include_self=False)
    )
    assert [(v.path, v.trainable) for v in model.weights] == flags_before
    assert not any(v.name.startswith("lora") for v in model.weights)
    assert type(model) in (keras.Model, keras.Sequential, Subclassed) or (
        type(model).__name__ == "Functional"
    )
    with pytest.raises(ValueError, match="no LoRA layer to merge"):
        keras_lora.merge_lora(model)
    hidden = [lyr for lyr in model._flatten_layers() if lyr.name == "hidden"][0]
    assert not hasattr(hidden, "lora_scale") and not hasattr(hidden, "rank")
    # A merged model can be adapted again.
    keras_lora.enable_lora(model, rank=2)
    np.testing.assert_allclose(to_numpy(model(X)), adapted, rtol=1e-5, atol=1e-5)


def test_enable_after_fit_recompiles_for_new_variables():
    model = functional_mlp()
    model.compile(optimizer="adam", loss="mse")
    y = np.zeros((16, 3), "float32")
    model.fit(X, y, epochs=1, verbose=0)
    keras_lora.enable_lora(model, rank=2)
    before = to_numpy(model.get_layer("hidden").kernel).copy()
    model.fit(X, y, epochs=1, verbose=0)
    np.testing.assert_array_equal(to_numpy(model.get_layer("hidden").kernel), before)
    assert len(model.optimizer.variables) > 2


def test_spec_naming_a_missing_layer_is_refused_untouched():
    from keras_lora.transform import apply_spec

    model = functional_mlp()
    flags = [v.trainable for v in model.weights]
    spec = {
        "version": 1,
        "targets": None,
        "layers": {
            "hidden": {"rank": 2, "alpha": None, "dropout": 0.0, "use_rslora": False}
        },
        "train_layers": ["no_such_head"],
        "frozen_layers": [],
        "frozen_variables": [],
    }
    with pytest.raises(ValueError, match="names layer 'no_such_head'"):
        apply_spec(model, spec)
    assert not keras_lora.lora_layers(model)
    assert [v.trainable for v in model.weights] == flags
