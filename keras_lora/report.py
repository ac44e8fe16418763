"""`trainable_summary` / `print_trainable_parameters`: what LoRA left trainable."""

import math

from keras_lora.transform import lora_layers


def _count(variables):
    return sum(math.prod(v.shape) for v in variables)


def trainable_summary(model):
    """Returns (trainable params, all params, adapted layer paths)."""
    return (
        _count(model.trainable_weights),
        _count(model.weights),
        [layer.path for layer in lora_layers(model)],
    )


def print_trainable_parameters(model, print_fn=print):
    """Prints PEFT's line `trainable params: X || all params: Y || trainable%: Z`.

    Then one line per adapted layer with its rank and factor shapes.

    Args:
        model: a Keras model, adapted or not.
        print_fn: where lines go (default `print`).

    Returns:
        The PEFT-style line.
    """
    trainable, total, _ = trainable_summary(model)
    percent = 100 * trainable / total if total else 0.0
    line = (
        f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {percent:.4f}"
    )
    print_fn(line)
    for layer in lora_layers(model):
        print_fn(
            f"  {layer.path}: rank {layer.rank}, scale {layer.lora_scale:g}, "
            f"A {tuple(layer.lora_a.shape)}, B {tuple(layer.lora_b.shape)}"
        )
    return line
