"""One process of a data-parallel LoRA run across processes (JAX, CPU).

Each process joins the job with `keras.distribution.initialize` (which calls
`jax.distributed.initialize`; CPU collectives are gloo), trains the adapted
MLP under `DataParallel` over every process's devices on its own slice of the
global batch, and process 0 saves the adapter. `tests/test_distributed.py`
starts the processes and compares that adapter with one-process training on
the whole global batch.

Usage: python tests/distributed/jax_multi_process.py PROCESS_ID NUM_PROCESSES PORT WORK_DIR
"""

import os
import sys

import keras

import keras_lora

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main(process_id, num_processes, port, work_dir):
    keras.distribution.initialize(
        job_addresses=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
    )
    devices = keras.distribution.list_devices()
    # The rows are split by hand (NumPy input), so no automatic sharding.
    distribution = keras.distribution.DataParallel(
        devices=devices, auto_shard_dataset=False
    )
    local = common.GLOBAL_BATCH // num_processes
    rows = slice(process_id * local, (process_id + 1) * local)
    x, y = common.mlp_data()
    with distribution.scope():
        model = common.adapted_mlp()
        # Each process feeds its own rows; Keras assembles the global batch.
        model.fit(
            x[rows],
            y[rows],
            batch_size=local,
            epochs=common.STEPS,
            shuffle=False,
            verbose=0,
        )
    if process_id == 0:
        keras_lora.save_adapter(model, os.path.join(work_dir, "adapter.keras"))
    common.report({"process_id": process_id, "global_devices": len(devices)})


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
