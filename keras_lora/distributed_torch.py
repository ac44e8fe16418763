"""PyTorch: keep `model.parameters()` in step with the variables LoRA adds.

On the PyTorch backend a Keras layer is a `torch.nn.Module` whose parameters
are a snapshot (`_torch_params`) of its variables, taken when it was built.
Keras sub-layers are not torch sub-modules, so `model.parameters()` is the
model's own snapshot. `enable_lora` adds factors to layers that were built
long before, and `merge_lora` removes them: without a fresh snapshot,
`model.parameters()` would miss every factor, and a torch training loop
(`torch.optim.SGD(model.parameters())`, `DistributedDataParallel(model)`, as
the Keras PyTorch distributed guide writes it) would train nothing, or train
each process's factors apart without all-reducing their gradients.

`model.fit` is not affected (it uses `model.trainable_variables`), nor are
JAX and TensorFlow.
"""

import keras


def track_torch_parameters(model):
    """Refreshes the torch parameter snapshot of `model` and of its layers.

    A no-op on the JAX and TensorFlow backends. Only layers that already hold
    a snapshot get a new one (those that have none build it on first use).

    Args:
        model: a Keras model (or layer) whose variables changed.

    Example:

    >>> keras_lora.enable_lora(model)  # calls it for you
    >>> [name for name, _ in model.named_parameters() if "lora" in name]
    ['_torch_params.dense/lora_a', '_torch_params.dense/lora_b']
    """
    if keras.backend.backend() != "torch":
        return
    for layer in model._flatten_layers(include_self=True, recursive=True):
        # `_torch_params` is a torch sub-module, found by `nn.Module.__getattr__`.
        if "_torch_params" in getattr(layer, "_modules", {}):
            layer._track_variables()
