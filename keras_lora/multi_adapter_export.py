"""`export_multi_adapter`: many adapters in one serving artifact.

Multi-tenant LoRA servers (LoRAX, S-LoRA, Punica) keep one base model and
many adapters, and run each request with its own adapter in a shared batch.
`keras_lora.adapter_ids` does this in memory; this module writes it to a
standard file: the artifact takes the model's inputs plus one int32
`adapter_id` per example (index i: the i-th adapter of `names`;
`len(names)`: the base model alone), and computes each example's low-rank
path with its own gathered factors (the same per-example path as
`adapter_ids`, so the cost is one rank-r path per example whatever the number
of adapters). It is exported by Keras's own `model.export`, so it loads with
the format's runtime alone (onnxruntime, `tf.saved_model.load`, ...).
"""

import keras
from keras import ops

from keras_lora import adapted_model, mixed_batch, named_adapters, transform
from keras_lora.deploy import staged_export
from keras_lora.keras_private import get_input_signature

ID_INPUT = "adapter_id"


class AdapterIdModel(keras.Model):
    """`model` with an adapter chosen per example by an int32 input.

    Called as `served(inputs, adapter_id)`: `inputs` as `model` takes them,
    `adapter_id` of shape `(batch,)`. The LoRA layers of `model` see the ids
    only for the duration of the call (plain Python state, as in an
    `adapter_ids` block), so `model` itself is unchanged afterwards; other
    threads should not call `model` meanwhile (they would see the ids too).

    Args:
        model: a model with named adapters, built.
        names: the adapters, in id order.
    """

    def __init__(self, model, names, **kwargs):
        super().__init__(**kwargs)
        self.served = model
        self.adapter_names = tuple(names)
        self.built = True

    def call(self, inputs, adapter_id):
        ids = ops.cast(adapter_id, "int32")
        layers = transform.lora_layers(self.served)
        saved = [layer.lora_example_state() for layer in layers]
        for layer in layers:
            every = tuple((name, 1.0) for name in layer.lora_adapter_names)
            layer.set_lora_example_state(every, ids, self.adapter_names)
        try:
            return self.served(inputs, training=False)
        finally:
            for layer, (active, example_ids) in zip(layers, saved):
                layer.set_lora_example_state(active, example_ids)


def export_multi_adapter(
    model,
    filepath,
    format="tf_saved_model",
    names=None,
    input_signature=None,
    verbose=False,
    **kwargs,
):
    """Exports `model` with all its named adapters, one chosen per example.

    The artifact's inputs are the model's inputs followed by `adapter_id`
    (int32, one per example): id i runs adapter `names[i]`, id `len(names)`
    the base model without adapter. Each example's outputs equal those of the
    model with that adapter alone active (`set_adapter(model, names[i])`).

    Args:
        model: a model with named adapters (`add_adapter`, `load_adapter(...,
            name=...)`), without DoRA or PiSSA/OLoRA layers and without
            trained heads (`train_layers`), which cannot differ per example.
        filepath: the artifact's path, as `model.export` takes it (written
            beside a temporary name and moved into place, as by
            `export_serving`).
        format: as `model.export` takes it (`"tf_saved_model"`, `"onnx"`,
            ...).
        names: the adapters, in id order; by default all of them, in the
            order they were added (`list_adapters`).
        input_signature: the signature of the model's own inputs (as
            `model.export` takes it); by default the one Keras reads from
            the model. The `adapter_id` input is added to it.
        verbose: passed to `model.export`.
        **kwargs: passed to `model.export`.

    Returns:
        `filepath`.

    Example:

    >>> keras_lora.export_multi_adapter(model, "served.onnx", format="onnx")
    >>> # onnxruntime: session.run(None, {"tokens": x, "adapter_id": ids})
    """
    known = named_adapters.list_adapters(model)
    if not known:
        raise ValueError(
            f"Model '{model.name}' has no named adapter: add some with "
            "`keras_lora.add_adapter` first."
        )
    names = known if names is None else list(names)
    unknown = [name for name in names if name not in known]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(
            "`names` must be distinct adapters of model "
            f"'{model.name}' ({known}). Received: names={names!r}"
        )
    adapted_model.check_outside_adapter_ids(model, "`export_multi_adapter`")
    mixed_batch.check_per_example(model, names)
    if input_signature is None:
        input_signature = get_input_signature(model)
    inputs = input_signature[0] if len(input_signature) == 1 else input_signature
    ids = keras.InputSpec(shape=(None,), dtype="int32", name=ID_INPUT)
    served = AdapterIdModel(model, names, name=f"{model.name}_adapters")
    with staged_export(filepath, format) as (_, staged_path):
        served.export(
            staged_path,
            format=format,
            input_signature=[inputs, ids],
            verbose=verbose,
            **kwargs,
        )
    return filepath
