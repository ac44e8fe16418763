"""LoRA under `tf.distribute.MirroredStrategy` on 2 logical CPUs (TensorFlow).

Trains the adapted MLP with `model.fit` on one device, then under a
`MirroredStrategy` over two logical CPU devices (the model built, adapted and
compiled in the strategy's scope), on the same global batch, and prints the
facts `tests/test_distributed.py` asserts: the replicas, the factors' variable
type, and how far the two adapters differ.

Usage: KERAS_BACKEND=tensorflow python tests/distributed/tf_mirrored.py WORK_DIR
"""

import os
import sys

import tensorflow as tf

# Two logical devices must be configured before TensorFlow initializes.
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras_lora  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def fit(model):
    return common.fit(model, common.mlp_data())


def main(work_dir):
    untrained = common.factors(common.adapted_mlp())
    reference = fit(common.adapted_mlp())
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = common.adapted_mlp()
    factor = keras_lora.lora_layers(model)[0].lora_a
    trained = fit(model)
    adapter = os.path.join(work_dir, "adapter.keras")
    keras_lora.save_adapter(model, adapter)
    single = keras_lora.load_adapter(common.adapted_mlp(seed=3), adapter)
    common.report(
        {
            "replicas": strategy.num_replicas_in_sync,
            "factor_variable": type(factor.value).__name__,
            "difference": common.max_difference(trained, reference),
            "saved_difference": common.max_difference(
                common.factors(single), reference
            ),
            "moved": common.max_difference(reference, untrained),
        }
    )


if __name__ == "__main__":
    main(sys.argv[1])
