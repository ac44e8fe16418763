"""Serving many adapters on one base (issue 13), measured side by side.

    KERAS_BACKEND=jax python benchmarks/named_adapters.py [--smoke] [--json out.json]

On the GPT-2-shaped benchmark backbone (benchmarks/models.py, q/v adapters of
rank 8), in one process:

- `predict` time of one batch mixing 4 adapters (`adapter_ids`, gathered
  factors), against the same batch run as 4 sub-batches each with one adapter
  active (`set_adapter`, compiled functions kept per adapter), and against the
  base model alone on the whole batch (target: mixed ≤ 1.3× base);
- the time `set_adapter` takes to switch between two q/v adapters on a
  GPT-2-medium-shaped backbone (24 layers, hidden 1024; target ≤ 50 ms);
- the model's variable bytes with 1, 4 and 16 adapters loaded.
"""

import argparse
import os
import sys

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras_lora  # noqa: E402
from benchmarks import device, models, timing  # noqa: E402


def add_random_adapters(model, count, rank, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(count):
        name = f"task{i}"
        keras_lora.add_adapter(model, name, rank=rank)
        for layer in keras_lora.lora_layers(model):
            adapter = layer.lora_adapter(name)
            adapter.b.assign(rng.normal(0, 0.02, adapter.b.shape).astype("float32"))
    return [f"task{i}" for i in range(count)]


def variable_bytes(model):
    return sum(
        int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights
    )


def mixed_batch_times(config, rounds):
    model = models.build_backbone(config)
    names = add_random_adapters(model, 4, config["rank"])
    batch, seq = config["batch_size"], config["sequence_length"]
    batch = max(4, batch // 4 * 4)
    rng = np.random.default_rng(1)
    x = {
        "token_ids": rng.integers(1, config["vocabulary_size"], (batch, seq)),
        "padding_mask": np.ones((batch, seq), "int32"),
    }
    quarter = batch // 4
    parts = [
        {k: v[i * quarter : (i + 1) * quarter] for k, v in x.items()} for i in range(4)
    ]
    ids = [names[i // quarter] for i in range(batch)]

    def run(inputs, size):
        return keras.ops.convert_to_numpy(
            model.predict(inputs, batch_size=size, verbose=0)
        )

    def base():
        keras_lora.set_adapter(model, None)
        return run(x, batch)

    def mixed():
        keras_lora.set_adapter(model, None)  # enter from one configuration
        with keras_lora.adapter_ids(model, ids):
            return run(x, batch)

    def sub_batches():
        for name, part in zip(names, parts):
            keras_lora.set_adapter(model, name)
            run(part, quarter)

    functions = {"base": base, "mixed": mixed, "4 sub-batches": sub_batches}
    for function in functions.values():  # compile every configuration once
        function()
    wall, cpu = timing.interleaved(functions, rounds)
    return {
        name: {"wall_s": timing.median(wall[name]), "cpu_s": timing.median(cpu[name])}
        for name in functions
    }


def switch_time(config, repeats):
    model = models.build_backbone(config)
    names = add_random_adapters(model, 2, config["rank"])
    times = []
    for i in range(repeats):
        _, seconds = timing.timed(
            lambda i=i: keras_lora.set_adapter(model, names[i % 2])
        )
        times.append(seconds)
    return timing.median(times)


def memory(config, counts):
    figures = {}
    for count in counts:
        model = models.build_backbone(config)
        add_random_adapters(model, count, config["rank"])
        figures[count] = variable_bytes(model)
    return figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    config = models.TINY if args.smoke else models.DEFAULT
    large = models.TINY if args.smoke else models.LARGE
    rounds = 2 if args.smoke else 7
    times = mixed_batch_times(config, rounds)
    report = {
        "backend": keras.backend.backend(),
        "config": config,
        "predict": times,
        "mixed / base (wall)": times["mixed"]["wall_s"] / times["base"]["wall_s"],
        "mixed / base (cpu)": times["mixed"]["cpu_s"] / times["base"]["cpu_s"],
        "4 sub-batches / base (wall)": times["4 sub-batches"]["wall_s"]
        / times["base"]["wall_s"],
        "switch_ms (GPT-2-medium shape, q/v)": 1000
        * switch_time(large, 5 if args.smoke else 21),
        "variable bytes by adapters loaded": memory(
            config, [1, 4] if args.smoke else [1, 4, 16]
        ),
    }
    return device.print_and_write(report, args.json)


if __name__ == "__main__":
    main()
