"""LoRA under `keras.distribution` on 8 devices of one host (JAX).

Run with `XLA_FLAGS=--xla_force_host_platform_device_count=8` and
`KERAS_BACKEND=jax`; `tests/test_distributed.py` does, and asserts the facts
this script prints (one JSON line):

- a tiny GPT-2 causal LM trained under `DataParallel` (8 devices) and under
  `ModelParallel` (mesh 2 x 4, a hand-written layout map) ends with the same
  adapter as on one device; the factors' and optimizer slots' shardings;
- `enable_lora` called after the model was built under the distribution;
- `save_adapter` / `load_adapter`, `model.save` / `load_model`,
  `export_merged`, `merge_lora` under `ModelParallel`;
- a tiny Gemma causal LM under `GemmaBackbone.get_layout_map`: shardings,
  and training that matches one device.

Usage: python tests/distributed/jax_single_host.py WORK_DIR
"""

import os
import sys

import keras
import keras_hub
import numpy as np

import keras_lora

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]
import common  # noqa: E402

from benchmarks.distributed import gpt2_layout_map as benchmark_layout_map  # noqa: E402

GPT2_TARGETS = [
    "query",
    "value",
    "feedforward_intermediate_dense",
    "feedforward_output_dense",
    "token_embedding",
]
GEMMA_TARGETS = ["query", "value", "ffw_gating", "ffw_linear", "token_embedding"]


def spec(variable):
    """A variable's sharding as a list of mesh axes, one per array axis."""
    axes = list(variable.value.sharding.spec)
    axes += [None] * (len(variable.shape) - len(axes))
    return [list(a) if isinstance(a, tuple) else a for a in axes]


def gpt2_lm():
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=common.VOCAB,
        num_layers=1,
        num_heads=4,
        hidden_dim=32,
        intermediate_dim=64,
        max_sequence_length=16,
        dropout=0.0,  # random masks differ between device layouts
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def gemma_lm():
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=common.VOCAB,
        num_layers=1,
        num_query_heads=4,
        num_key_value_heads=4,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def gpt2_layout_map(mesh):
    """The benchmark's GPT-2 map (KerasHub has none), plus one factor entry."""
    layout_map = benchmark_layout_map(mesh)
    # A user entry that names a factor wins over the derived layout.
    layout_map[".*value/lora_a"] = ("model", None)
    return layout_map


def adapt(model, targets, seed=0):
    """enable_lora (rank 4), seeded weights, compiled for SGD with momentum."""
    keras_lora.enable_lora(model, rank=4, targets=targets)
    common.set_seeded_weights(model, seed)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def train(model):
    return common.fit(model, common.token_data())


def factor_specs(model):
    return {
        v.path: spec(v)
        for layer in keras_lora.lora_layers(model)
        for v in (layer.lora_a, layer.lora_b)
    }


def slot_specs(model):
    """{factor path: sharding of its momentum slot}."""
    optimizer = model.optimizer
    specs = {}
    for layer in keras_lora.lora_layers(model):
        for factor in (layer.lora_a, layer.lora_b):
            index = optimizer._get_variable_index(factor)
            specs[factor.path] = spec(optimizer.momentums[index])
    return specs


def predict(model, x):
    return np.asarray(model.predict_on_batch(x))


def gpt2_checks(work_dir, facts):
    devices = keras.distribution.list_devices()
    x, _ = common.token_data()

    reference = train(adapt(gpt2_lm(), GPT2_TARGETS))

    data_parallel = keras.distribution.DataParallel(devices=devices)
    with data_parallel.scope():
        model = adapt(gpt2_lm(), GPT2_TARGETS)
        facts["dp_specs"] = factor_specs(model)
        facts["dp_difference"] = common.max_difference(train(model), reference)

    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    model_parallel = keras.distribution.ModelParallel(
        layout_map=gpt2_layout_map(mesh), batch_dim_name="batch"
    )
    with model_parallel.scope():
        # Built under the distribution first; LoRA added afterwards.
        model = gpt2_lm()
        facts["mp_kernel_specs"] = {
            v.path: spec(v) for v in model.weights if v.name in ("kernel", "embeddings")
        }
        adapt(model, GPT2_TARGETS)
        facts["mp_specs"] = factor_specs(model)
        untrained = common.factors(model)
        trained = train(model)
        facts["mp_slot_specs"] = slot_specs(model)
        facts["mp_difference"] = common.max_difference(trained, reference)
        facts["mp_moved"] = common.max_difference(trained, untrained)

        adapter = os.path.join(work_dir, "adapter.keras")
        keras_lora.save_adapter(model, adapter)
        fresh = adapt(gpt2_lm(), GPT2_TARGETS, seed=5)
        keras_lora.load_adapter(fresh, adapter)
        facts["load_adapter_difference"] = common.max_difference(
            common.factors(fresh), trained
        )
        facts["load_adapter_specs"] = factor_specs(fresh)
        # A named adapter's factors are laid out like the primary ones.
        keras_lora.add_adapter(fresh, "second", rank=2, targets=GPT2_TARGETS)
        facts["named_adapter_specs"] = {
            v.path: spec(v)
            for v in fresh.weights
            if "lora_a_second" in v.path or "lora_b_second" in v.path
        }

        saved = os.path.join(work_dir, "model.keras")
        model.save(saved)
        reloaded = keras.saving.load_model(saved)
        facts["load_model_difference"] = common.max_difference(
            common.factors(reloaded), trained
        )
        facts["load_model_specs"] = factor_specs(reloaded)
        facts["load_model_slot_specs"] = slot_specs(reloaded)
        # Training resumes where it stopped: the same steps on the reloaded
        # model and on the live one end at the same factors (momentum too).
        facts["resume_difference"] = common.max_difference(
            train(reloaded), train(model)
        )
        outputs = predict(model, x)

        merged_file = os.path.join(work_dir, "merged.keras")
        keras_lora.export_merged(model, merged_file)

        keras_lora.merge_lora(model)
        facts["merged_kernel_specs"] = {
            v.path: spec(v) for v in model.weights if v.name in ("kernel", "embeddings")
        }
        facts["merge_lora_difference"] = float(
            np.max(np.abs(predict(model, x) - outputs))
        )
    plain = keras.saving.load_model(merged_file)
    facts["export_difference"] = float(np.max(np.abs(predict(plain, x) - outputs)))


def gemma_checks(facts):
    devices = keras.distribution.list_devices()
    reference = train(adapt(gemma_lm(), GEMMA_TARGETS))
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    layout_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    with distribution.scope():
        model = adapt(gemma_lm(), GEMMA_TARGETS)
        facts["gemma_specs"] = factor_specs(model)
        facts["gemma_difference"] = common.max_difference(train(model), reference)


def main(work_dir):
    facts = {"devices": len(keras.distribution.list_devices())}
    gpt2_checks(work_dir, facts)
    gemma_checks(facts)
    common.report(facts)


if __name__ == "__main__":
    main(sys.argv[1])
