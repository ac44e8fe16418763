"""A multi-adapter serving artifact against a merged one (issue 22).

    KERAS_BACKEND=tensorflow python benchmarks/deploy.py [--smoke] [--json out.json]

On the GPT-2-shaped benchmark backbone (benchmarks/models.py, q/v adapters of
rank 8), in one process: the ONNX artifact of `export_multi_adapter` with 4
adapters, run by onnxruntime on a batch whose examples use the 4 adapters in
turn, against the merged single-adapter artifact (`export_serving`, one
adapter folded in) on the same batch. Both run in interleaved rounds; the
figure is the ratio of the medians (target: <= 1.3).
"""

import argparse
import os
import sys
import tempfile

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras_lora  # noqa: E402
from benchmarks import device, models, timing  # noqa: E402
from benchmarks.named_adapters import add_random_adapters  # noqa: E402


def session_runner(path, inputs):
    """A no-argument function running the ONNX artifact at `path` once.

    `inputs` maps a name (`token_ids`, `padding_mask`, `adapter_id`) to its
    array; each input of the artifact takes the array whose name it contains.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    session = onnxruntime.InferenceSession(path, options)
    feed = {}
    for entry in session.get_inputs():
        key = next(k for k in sorted(inputs, key=len, reverse=True) if k in entry.name)
        feed[entry.name] = inputs[key]
    return lambda: session.run(None, feed)


def artifact_times(config, rounds, folder):
    model = models.build_backbone(config)
    names = add_random_adapters(model, 4, config["rank"])
    batch, seq = max(4, config["batch_size"] // 4 * 4), config["sequence_length"]
    rng = np.random.default_rng(1)
    x = {
        "token_ids": rng.integers(1, config["vocabulary_size"], (batch, seq)).astype(
            "int32"
        ),
        "padding_mask": np.ones((batch, seq), "int32"),
    }
    ids = (np.arange(batch) % 4).astype("int32")
    multi = os.path.join(folder, "adapters.onnx")
    keras_lora.export_multi_adapter(model, multi, format="onnx", names=names)
    keras_lora.set_adapter(model, names[0])
    merged = os.path.join(folder, "merged.onnx")
    keras_lora.export_serving(model, merged, format="onnx")
    functions = {
        "merged, 1 adapter": session_runner(merged, x),
        "multi-adapter, 4 adapters": session_runner(multi, {**x, "adapter_id": ids}),
    }
    # The artifact is right before it is timed: example i is adapter ids[i].
    served = functions["multi-adapter, 4 adapters"]()[0]
    keras_lora.set_adapter(model, names[1])
    alone = keras.ops.convert_to_numpy(model(x))
    error = float(np.abs(served[ids == 1] - alone[ids == 1]).max())
    for function in functions.values():
        function()  # warm up
    wall, cpu = timing.interleaved(functions, rounds)
    times = {
        name: {"wall_s": timing.median(wall[name]), "cpu_s": timing.median(cpu[name])}
        for name in functions
    }
    return times, error, batch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    config = models.TINY if args.smoke else models.DEFAULT
    with tempfile.TemporaryDirectory() as folder:
        times, error, batch = artifact_times(config, 2 if args.smoke else 15, folder)
    multi, merged = times["multi-adapter, 4 adapters"], times["merged, 1 adapter"]
    report = {
        "backend": keras.backend.backend(),
        "config": {**config, "batch_size": batch},
        "onnxruntime run": times,
        "multi / merged (wall)": multi["wall_s"] / merged["wall_s"],
        "multi / merged (cpu)": multi["cpu_s"] / merged["cpu_s"],
        "max |artifact - adapter alone|": error,
    }
    return device.print_and_write(report, args.json)


if __name__ == "__main__":
    main()
