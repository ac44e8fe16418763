"""The public surface: every name bound, every LoRA layer class listed (issue 20)."""

import inspect

import keras_lora
import keras_lora.layers
from keras_lora.layers.lora_layer import LoRALayer


def test_every_public_name_resolves_and_dir_lists_it():
    for name in keras_lora.__all__:
        assert getattr(keras_lora, name) is not None, name
    assert set(keras_lora.__all__) <= set(dir(keras_lora))
    assert callable(keras_lora.enable_lora)
    assert keras_lora.LoRADense is keras_lora.layers.LoRADense


def test_layers_all_lists_every_lora_layer_class():
    classes = {
        obj.__name__
        for module in (
            keras_lora.layers.dense,
            keras_lora.layers.einsum_dense,
            keras_lora.layers.embedding,
            keras_lora.layers.conv,
        )
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, LoRALayer) and not obj.__name__.startswith("_")
    }
    assert classes | {"LoRALayer"} == set(keras_lora.layers.__all__)
    for name in keras_lora.layers.__all__:
        assert getattr(keras_lora.layers, name).__name__ == name


def test_the_public_names_are_bound_without_globals_update():
    source = inspect.getsource(keras_lora)
    assert "globals().update" not in source


def test_shared_design_signatures_take_their_arguments_by_position():
    # shared/DESIGN.md's stable signatures: `LoRADense(units, rank, alpha,
    # dropout, use_rslora, ...)`, `add_adapter(model, name, rank, alpha,
    # targets, dropout, train_layers, ...)`.
    import keras

    for layer in (
        keras_lora.LoRADense(4, 2, 4.0, 0.1, True),
        keras_lora.LoRAEinsumDense("ab,bc->ac", (4,), 2, 4.0, 0.1, True),
        keras_lora.LoRAEmbedding(10, 4, 2, 4.0, 0.1, True),
    ):
        assert (layer.rank, layer.alpha, layer.dropout, layer.use_rslora) == (
            2,
            4.0,
            0.1,
            True,
        )
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="d")])
    keras_lora.add_adapter(model, "a", 2, 4.0, ["d"], 0.1)
    layer = model.get_layer("d")
    assert (layer.rank, layer.alpha, layer.dropout) == (2, 4.0, 0.1)
