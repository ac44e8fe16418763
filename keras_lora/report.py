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


def print_trainable_parameters(model, print_fn=print, verbose=False):
    """Prints PEFT's line `trainable params: X || all params: Y || trainable%: Z`.

    Args:
        model: a Keras model, adapted or not.
        print_fn: where lines go (default `print`).
        verbose: also print one line per adapted layer: its path, rank, scale
            and factor shapes.

    Returns:
        The PEFT-style line.

    Example:

    >>> keras_lora.print_trainable_parameters(model)
    trainable params: 296,450 || all params: 109,778,690 || trainable%: 0.2700
    >>> keras_lora.print_trainable_parameters(model, verbose=True)  # + per layer
    """
    trainable, total, _ = trainable_summary(model)
    percent = 100 * trainable / total if total else 0.0
    line = (
        f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {percent:.4f}"
    )
    print_fn(line)
    if verbose:
        for layer in lora_layers(model):
            print_fn(
                f"  {layer.path}: rank {layer.rank}, scale {layer.lora_scale:g}, "
                f"A {tuple(layer.lora_a.shape)}, B {tuple(layer.lora_b.shape)}"
            )
    return line
