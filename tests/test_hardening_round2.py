"""Hardening, round 2 (issue 21): interrupts, adapter_ids misuse, crafted files.

Each test names the issue item it covers.
"""

import inspect
import json
import os
import sys

import numpy as np
import pytest
from test_hardening import mlp

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


def interrupt_each_step(model, operation):
    """Interrupts `operation` at each of its steps in turn; after each one the
    model must be exactly as before. Returns the number of steps."""
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
        at += 1


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
