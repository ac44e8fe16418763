"""Hardening, round 2 (issue 21): interrupts, adapter_ids misuse, crafted files.

Each test names the issue item it covers.
"""

import inspect
import json
import os
import sys
import time
import zipfile

import keras
import numpy as np
import pytest
from test_hardening import mlp, rewrite

import keras_lora
from helpers import to_numpy

X = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
PACKAGE = os.path.dirname(keras_lora.__file__)


def randomize(model, seed=0):
    """Non-zero values for every LoRA factor of every adapter."""
    rng = np.random.default_rng(seed)
    for layer in keras_lora.lora_layers(model):
        for name in layer.lora_adapter_names:
            adapter = layer.lora_adapter(name)
            for factor in (adapter.a, adapter.b):
                factor.assign(rng.normal(0, 0.3, factor.shape).astype("float32"))


def two_adapters():
    """`m2`: adapters "one" (hidden, trains the head) and "two" (hidden, head)."""
    model = mlp()
    keras_lora.add_adapter(
        model, "one", rank=2, targets=["hidden"], train_layers=["head"]
    )
    keras_lora.add_adapter(model, "two", rank=3, targets=["hidden", "head"])
    randomize(model)
    head = model.get_layer("head")
    head.kernel.assign(to_numpy(head.kernel) + 0.5)  # "one"'s trained head
    return model


def state(model):
    """Everything an interrupted operation could leave changed."""
    layers = list(model._flatten_layers(include_self=True))
    adapters = getattr(model, "_keras_lora_adapters", None)
    heads = getattr(model, "_keras_lora_heads", None)
    return {
        "classes": [type(layer) for layer in layers],
        "layer flags": [layer.trainable for layer in layers],
        "attributes": [sorted(vars(layer)) for layer in layers],
        "variables": [(v.path, v.trainable) for v in model.weights],
        "trainable": [v.path for v in model.trainable_variables],
        "adapters": keras_lora.list_adapters(model),
        "active": keras_lora.named_adapters.active_adapters(model),
        "specs": json.dumps(adapters, sort_keys=True),
        "heads": None
        if heads is None
        else (
            dict(heads["owner"]),
            {n: sorted(v) for n, v in heads["stored"].items()},
        ),
        "values": [to_numpy(v).tolist() for v in model.weights],
    }


class _Interrupt:
    """A trace function raising KeyboardInterrupt when keras_lora's k-th
    function call starts (once): Ctrl-C between any two steps of an
    operation, at every depth."""

    def __init__(self, at):
        self.at, self.count, self.where = at, 0, None

    def __call__(self, frame, event, arg):
        code = frame.f_code
        # Generators are skipped: a resumed one gets "call" too, and one
        # closed by the garbage collector would swallow the interrupt.
        if (
            event == "call"
            and code.co_filename.startswith(PACKAGE)
            and not code.co_flags & inspect.CO_GENERATOR
        ):
            self.count += 1
            if self.count == self.at:
                self.where = f"{code.co_name} ({os.path.basename(code.co_filename)})"
                raise KeyboardInterrupt(f"injected at call {self.at}")
        return None


def interrupt_each_step(model, operation, stride=1):
    """Interrupts `operation` at each of its steps in turn (every `stride`-th
    one); after each one the model must be exactly as before. Returns the
    number of steps."""
    before = state(model)
    at = 1
    while True:
        tracer = _Interrupt(at)
        sys.settrace(tracer)
        try:
            operation()
        except KeyboardInterrupt:
            pass
        else:
            return at
        finally:
            sys.settrace(None)
        after = state(model)
        for key in before:
            assert after[key] == before[key], (
                f"{key} changed by an interrupt at {tracer.where}"
            )
        at += stride


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    """Adapter "one" of `two_adapters()`, saved (hidden adapted, head trained)."""
    path = tmp_path_factory.mktemp("round2") / "one.keras"
    keras_lora.save_adapter(two_adapters(), path, name="one")
    return path


# Item 3: interrupts.


def test_interrupted_enable_lora_leaves_the_model_as_it_was():
    model = mlp()
    model.get_layer("norm").trainable = False  # a frozen layer stays frozen
    steps = interrupt_each_step(
        model,
        lambda: keras_lora.enable_lora(
            model, rank=2, targets=["hidden", "head"], train_layers=["norm"]
        ),
    )
    assert steps > 50
    reference = mlp()
    reference.get_layer("norm").trainable = False
    keras_lora.enable_lora(
        reference, rank=2, targets=["hidden", "head"], train_layers=["norm"]
    )
    for key in ("classes", "layer flags", "variables", "adapters", "specs"):
        assert state(model)[key] == state(reference)[key]


def test_interrupted_merge_lora_leaves_the_model_as_it_was():
    model = two_adapters()
    keras_lora.set_adapter(model, ["one", "two"], weights=[0.5, 1.0])
    expected = to_numpy(model(X))
    interrupt_each_step(model, lambda: keras_lora.merge_lora(model))
    assert not keras_lora.lora_layers(model)
    np.testing.assert_allclose(to_numpy(model(X)), expected, atol=1e-5)


def test_interrupted_set_adapter_leaves_the_model_as_it_was():
    model = two_adapters()
    interrupt_each_step(model, lambda: keras_lora.set_adapter(model, "two"))
    assert keras_lora.named_adapters.active_adapters(model) == [("two", 1.0)]
    reference = two_adapters()
    keras_lora.set_adapter(reference, "two")
    np.testing.assert_allclose(to_numpy(model(X)), to_numpy(reference(X)), atol=1e-6)


@pytest.mark.parametrize("onto", ["fresh base", "new name", "same adapter"])
def test_interrupted_load_adapter_leaves_the_model_as_it_was(adapter_file, onto):
    if onto == "fresh base":
        model, name = mlp(), None
    elif onto == "new name":
        model, name = two_adapters(), "new"
    else:
        model, name = mlp(), None
        keras_lora.enable_lora(model, rank=2, targets=["hidden"], train_layers=["head"])
    interrupt_each_step(
        model, lambda: keras_lora.load_adapter(model, adapter_file, name=name)
    )
    reference = two_adapters()
    keras_lora.set_adapter(reference, "one")
    if name is not None:
        keras_lora.set_adapter(model, name)
    np.testing.assert_allclose(to_numpy(model(X)), to_numpy(reference(X)), atol=1e-6)


# Items 2 and 4: adapter_ids nested and misused.

IDS = ["one", "two", None, "two"]


def ids_model():
    """Two adapters without trained heads (per-example adapters refuse heads)."""
    model = mlp()
    keras_lora.add_adapter(model, "one", rank=2, targets=["hidden"])
    keras_lora.add_adapter(model, "two", rank=3, targets=["hidden", "head"])
    randomize(model)
    return model


def per_example_expected(model, ids):
    """Row i computed with adapter ids[i] alone."""
    rows = {}
    for name in set(ids):
        keras_lora.set_adapter(model, name)
        rows[name] = to_numpy(model(X))
    keras_lora.set_adapter(model, "one")
    return np.stack([rows[name][i] for i, name in enumerate(ids)])


def assert_left_clean(model, tmp_path, expected):
    """Outside the block: no ids variable, outputs of "one", saves and loads."""
    assert keras_lora.named_adapters.active_adapters(model) == [("one", 1.0)]
    assert not [v for v in model.weights if "adapter_ids" in v.path]
    np.testing.assert_allclose(
        to_numpy(model.predict(X, verbose=0)), expected, atol=1e-5
    )
    model.save(tmp_path / "after.keras")
    loaded = keras.saving.load_model(tmp_path / "after.keras")
    np.testing.assert_allclose(to_numpy(loaded(X)), expected, atol=1e-5)


def test_nested_adapter_ids_is_refused_and_leaves_no_state(tmp_path):
    model = ids_model()
    outside = to_numpy(model.predict(X, verbose=0))
    expected = per_example_expected(model, IDS)
    with keras_lora.adapter_ids(model, IDS):
        with pytest.raises(ValueError, match="nested `adapter_ids`.*leave the block"):
            with keras_lora.adapter_ids(model, ["two", "two", "one", None]):
                pass
        # The outer block still computes its own ids.
        np.testing.assert_allclose(
            to_numpy(model.predict(X, batch_size=4, verbose=0)), expected, atol=1e-5
        )
    assert_left_clean(model, tmp_path, outside)


def test_adapter_ids_misuse_is_a_clear_error_and_leaves_no_state(tmp_path):
    model = ids_model()
    outside = to_numpy(model.predict(X, verbose=0))
    expected = per_example_expected(model, IDS)
    calls = {
        "set_adapter": lambda: keras_lora.set_adapter(model, "two"),
        "add_adapter": lambda: keras_lora.add_adapter(model, "three", rank=2),
        "delete_adapter": lambda: keras_lora.delete_adapter(model, "two"),
        "merge_lora": lambda: keras_lora.merge_lora(model),
        "model.save": lambda: model.save(tmp_path / "inside.keras"),
        "export_merged": lambda: keras_lora.export_merged(
            model, tmp_path / "merged.keras"
        ),
    }
    with keras_lora.adapter_ids(model, IDS):
        for call in calls.values():
            with pytest.raises(ValueError, match="inside a `keras_lora.adapter_ids`"):
                call()
        # A batch of another size than len(ids): the last batch of predict.
        # TensorFlow retraces the last batch for any batch size: "unknown".
        with pytest.raises(ValueError, match=r"= 4 examples.*batch of (2|unknown)"):
            model.predict(np.concatenate([X, X[:2]]), batch_size=4, verbose=0)
        with pytest.raises(ValueError, match=r"= 4 examples.*batch of (2|unknown)"):
            model.predict(X[:2], verbose=0)  # the first batch fails
        with pytest.raises(ValueError, match="training=True"):
            model(X, training=True)
        np.testing.assert_allclose(to_numpy(model(X)), expected, atol=1e-5)
    assert not os.listdir(tmp_path)  # nothing written
    # A single id is not broadcast over a batch.
    with keras_lora.adapter_ids(model, ["two"]):
        with pytest.raises(ValueError, match=r"exactly len\(ids\) = 1.*batch of 4"):
            model(X)
    assert_left_clean(model, tmp_path, outside)


def test_fit_inside_adapter_ids_is_refused():
    model = ids_model()
    model.compile(optimizer="sgd", loss="mse")
    before = [to_numpy(v) for v in model.weights]
    with keras_lora.adapter_ids(model, IDS):
        with pytest.raises(ValueError, match="`model.fit` cannot run inside"):
            model.fit(X, X[:, :3], batch_size=4, epochs=1, verbose=0)
    for old, variable in zip(before, model.weights):
        np.testing.assert_array_equal(old, to_numpy(variable))


# Item 5: a file cannot make an adapted layer's frozen base trainable.


def test_file_training_an_adapted_layer_is_refused(adapter_file, tmp_path):
    def overlap(config):
        config["spec"]["train_layers"].append("hidden")

    path = rewrite(adapter_file, tmp_path / "overlap.keras", config=overlap)
    for model, name in ((mlp(), None), (two_adapters(), "new")):
        before = state(model)
        with pytest.raises(ValueError, match="overlap.keras.*adapted layer 'hidden'"):
            keras_lora.load_adapter(model, path, name=name)
        assert state(model) == before


def test_model_config_training_an_adapted_layer_is_refused(tmp_path):
    path = tmp_path / "m2.keras"
    two_adapters().save(path)

    def overlap(config):
        named = config["config"]["named"]["adapters"]["two"]
        named["train_layers"].append("head")  # "two" adapts "head"

    edited = edit_model_config(path, tmp_path / "edited.keras", overlap)
    with pytest.raises(ValueError, match="adapted layer 'head'"):
        keras.saving.load_model(edited)


def edit_model_config(src, dst, edit):
    """Copies the `.keras` model `src` to `dst`, editing its config.json."""
    with zipfile.ZipFile(src) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    text = edit(config)  # the new config.json text, or None: the edited dict
    members["config.json"] = (text or json.dumps(config)).encode()
    with zipfile.ZipFile(dst, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return dst


# Item 6: patterns and names from a PEFT folder meet under a time bound.

CATASTROPHIC = {"(a|aa)+b": 2}  # exponential on a run of "a"s without a "b"
RUN = "a" * 40  # unbounded: about a minute (measured: 2.8 s at 34 "a"s)


def crafted_peft_folder(folder, module):
    """A 3 KB PEFT folder whose patterns backtrack exponentially on `module`
    (loading it: tests/interop/test_peft_hardening.py)."""
    from keras_lora.interop import safetensors_io

    os.makedirs(folder)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2}
    config.update(rank_pattern=CATASTROPHIC, alpha_pattern=CATASTROPHIC)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    safetensors_io.write(
        folder / "adapter_model.safetensors",
        {
            f"base_model.model.{module}.lora_A.weight": rng.normal(size=(2, 32)),
            f"base_model.model.{module}.lora_B.weight": rng.normal(size=(32, 2)),
        },
    )
    return folder


def run_cli(argv, capsys):
    """`keras-lora ARGV` in this process: (exit code, seconds, stderr)."""
    from keras_lora import cli

    start = time.perf_counter()
    code = cli.main(argv)
    return code, time.perf_counter() - start, capsys.readouterr().err


def test_inspect_of_a_catastrophic_pattern_folder_ends_quickly(tmp_path, capsys):
    pytest.importorskip("safetensors")
    folder = crafted_peft_folder(tmp_path / "peft", RUN)
    code, seconds, err = run_cli(["inspect", str(folder)], capsys)
    assert code == 1 and "nested repetition" in err and "adapter_config.json" in err
    assert seconds < 2


# Items 7 to 14: each a clear ValueError or documented behaviour.


@pytest.fixture(scope="module")
def saved_m2(tmp_path_factory):
    path = tmp_path_factory.mktemp("m2") / "m2.keras"
    two_adapters().save(path)
    return path


@pytest.mark.parametrize(
    "active",
    [[["one", float("nan")]], [["two", float("inf")]], [["one", 1], ["one", 1]]],
)
def test_item7_saved_active_set_is_checked(saved_m2, tmp_path, active):
    def edit(config):
        config["config"]["named"]["active"] = active

    edited = edit_model_config(saved_m2, tmp_path / "active.keras", edit)
    with pytest.raises(ValueError, match="invalid active set"):
        keras.saving.load_model(edited)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c["config"]["lora"]["layers"]["hidden"].update(rank=0), "rank"),
        (lambda c: c["config"]["lora"].update(layers=[1]), "layers"),
        (lambda c: c["config"].update(model=5), "AttributeError"),
        (
            lambda c: json.dumps(c)[:-1] + ', "x": ' + "[" * 9999 + "]" * 9999 + "}",
            "JSON",
        ),
    ],
    ids=["rank 0", "layers a list", "model a number", "deep nesting"],
)
def test_item8_inspect_of_a_crafted_model_names_the_file(
    saved_m2, tmp_path, capsys, edit, match
):
    edited = edit_model_config(saved_m2, tmp_path / "crafted.keras", edit)
    code, _, err = run_cli(["inspect", str(edited)], capsys)
    assert code == 1 and "crafted.keras" in err and match in err, err


def test_item8_merge_of_an_edited_dtype_policy_names_the_file(tmp_path, capsys):
    base = mlp()
    base.save(tmp_path / "base.keras")
    keras_lora.enable_lora(base, rank=2, targets=["hidden"])
    keras_lora.save_adapter(base, tmp_path / "a.keras")

    def int8(config):
        for layer in config["config"]["layers"]:
            if layer["config"]["name"] == "hidden":
                layer["config"]["dtype"] = "int8_from_float32"

    edited = edit_model_config(tmp_path / "base.keras", tmp_path / "int8.keras", int8)
    argv = ["merge", str(edited), str(tmp_path / "a.keras"), str(tmp_path / "o.keras")]
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and "int8.keras" in err, err


def test_item9_merge_and_convert_refuse_an_existing_output(tmp_path, capsys):
    base = mlp()
    base.save(tmp_path / "base.keras")
    keras_lora.enable_lora(base, rank=2, targets=["hidden"])
    adapter = str(keras_lora.save_adapter(base, tmp_path / "a.keras"))
    out = tmp_path / "out.keras"
    out.write_bytes(b"keep me")
    argv = ["merge", str(tmp_path / "base.keras"), adapter, str(out)]
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and "already exists: pass --force" in err
    assert out.read_bytes() == b"keep me"
    assert run_cli([*argv, "--force"], capsys)[0] == 0
    assert keras.saving.load_model(out)  # overwritten with the merged model
    # convert, both ways: refused before the base is even loaded.
    (tmp_path / "peft").mkdir()
    config = json.dumps({"peft_type": "LORA"})  # read before DST is checked
    (tmp_path / "peft" / "adapter_config.json").write_text(config)
    for source, destination in ((adapter, "peft"), (str(tmp_path / "peft"), "a.keras")):
        argv = ["convert", source, str(tmp_path / destination), "--base", "none"]
        code, _, err = run_cli(argv, capsys)
        assert code == 1 and "already exists: pass --force" in err, err
    assert (tmp_path / "peft" / "adapter_config.json").read_text() == config


def test_item10_scales_infinite_in_float32_are_refused():
    with pytest.raises(ValueError, match="finite in float32.*alpha=1e"):
        keras_lora.enable_lora(mlp(), rank=2, alpha=1e39, targets=["hidden"])
    for ratio in (float("inf"), 1e308):
        with pytest.raises(ValueError, match="finite in float32.*ratio="):
            keras_lora.LoRAPlus(keras.optimizers.SGD(), ratio=ratio)


def test_item11_combine_adapters_weights_and_cat_rank():
    model = ids_model()  # no trained heads: the combinations are exact
    weights = [np.float32(0.5), np.float64(1.0)]
    keras_lora.combine_adapters(model, ["one", "two"], weights, "mix", "cat")
    keras_lora.set_adapter(model, "mix")
    mixed = to_numpy(model(X))
    keras_lora.set_adapter(model, ["one", "two"], weights=[0.5, 1.0])
    np.testing.assert_allclose(mixed, to_numpy(model(X)), atol=1e-5)
    # "head" (d_out 3) would get rank 3 + 3: refused, and "svd" at full rank
    # is the exact alternative the message names.
    keras_lora.add_adapter(model, "three", rank=3, targets=["head"])
    randomize(model, seed=1)
    with pytest.raises(ValueError, match="rank 6 > min.*= 3.*'svd' with rank=3"):
        keras_lora.combine_adapters(model, ["two", "three"], [1, 1], "cat", "cat")
    keras_lora.combine_adapters(model, ["two", "three"], [1, 1], "svd", "svd", rank=3)
    keras_lora.set_adapter(model, "svd")
    exact = to_numpy(model(X))
    keras_lora.set_adapter(model, ["two", "three"])
    np.testing.assert_allclose(exact, to_numpy(model(X)), atol=1e-4)


def test_item12_a_shadowed_pattern_key_is_refused():
    with pytest.raises(ValueError, match="key 'head' matches only layers.*'.*'"):
        keras_lora.enable_lora(
            mlp(), rank=2, targets=["hidden", "head"], rank_pattern={".*": 3, "head": 2}
        )


def test_item13_saved_spec_must_match_its_lora_layers(tmp_path):
    model = mlp()
    keras_lora.enable_lora(model, rank=2, targets=["hidden"])
    model.save(tmp_path / "m.keras")

    def dora(config):
        config["config"]["lora"]["layers"]["hidden"]["use_dora"] = True

    edited = edit_model_config(tmp_path / "m.keras", tmp_path / "dora.keras", dora)
    with pytest.raises(ValueError, match="use_dora=False, but the spec records"):
        keras.saving.load_model(edited)


def test_item14_int4_export_uses_keras_default_block_size(tmp_path):
    model = mlp()
    keras_lora.enable_lora(model, rank=2, targets=["hidden"])
    keras_lora.export_merged(model, tmp_path / "q.keras", quantize="int4")
    hidden = keras.saving.load_model(tmp_path / "q.keras").get_layer("hidden")
    reference = keras.layers.Dense(16)
    reference.build((None, 8))
    reference.quantize("int4")  # Keras's default: what the README promises
    assert hidden.dtype_policy.block_size == reference.dtype_policy.block_size == 128
