"""Forward latency: a LoRA layer's per-call cost, and merged against base.

Two sections, each interleaved (`timing.interleaved`) and reported as ratios
of medians from the same run:

- `call_overhead`: one tiny layer (Dense 16 -> 16, batch 2; EinsumDense of
  an attention query), plain against LoRA, `layer(x)` without gradients. On
  tiny shapes a call is all per-call overhead (Keras's `__call__`, Python,
  kernel launches), so this shows what a LoRA layer adds to it: most on
  PyTorch, whose Keras backend runs eagerly.
- `forward`: `predict_on_batch` of a GPT-2-shaped classifier (see models.py)
  at batch 1 and 8: the base, a second base built fresh from the same
  weights, the unmerged LoRA model (q/v, non-zero B) and the same merged with
  `merge_lora`. A merged model must run as fast as a freshly built one.

    KERAS_BACKEND=torch python benchmarks/latency.py [--tiny] [--rounds N]
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import device, models  # noqa: E402
from benchmarks.timing import interleaved, median  # noqa: E402


def call_overhead(rounds=9, calls=300):
    """{layer kind: {"plain_us", "lora_us", "ratio"}} (CPU time per call)."""
    import keras
    import numpy as np

    from keras_lora.layers import LoRADense, LoRAEinsumDense

    cases = {
        "Dense": (
            lambda: keras.layers.Dense(16, activation="relu"),
            LoRADense,
            (2, 16),
        ),
        "EinsumDense": (
            lambda: keras.layers.EinsumDense("btd,dnh->btnh", (None, 2, 8)),
            LoRAEinsumDense,
            (2, 4, 16),
        ),
    }
    result = {}
    for name, (make, lora_class, shape) in cases.items():
        x = keras.ops.convert_to_tensor(np.ones(shape, "float32"))
        plain, lora = make(), make()
        plain(x), lora(x)
        lora_class.adapt(lora, rank=4)
        functions = {
            "plain": device.no_grad(lambda p=plain, x=x: p(x)),
            "lora": device.no_grad(lambda q=lora, x=x: q(x)),
        }
        for function in functions.values():
            for _ in range(20):
                function()
        _, cpu = interleaved(functions, rounds, calls)
        plain_s, lora_s = median(cpu["plain"]), median(cpu["lora"])
        result[name] = {
            "plain_us": plain_s * 1e6,
            "lora_us": lora_s * 1e6,
            "ratio": lora_s / plain_s,
        }
    return result


def _randomize_factors(model, seed=1):
    """The same non-zero A and B on every model (fresh A is random per model)."""
    import numpy as np

    import keras_lora

    rng = np.random.default_rng(seed)
    for layer in keras_lora.lora_layers(model):
        for factor in (layer.lora_a, layer.lora_b):
            factor.assign(rng.normal(0, 0.02, factor.shape))


def forward(config, rounds=9, steps=3, batches=(1, 8), jit_compile="auto"):
    """Median `predict_on_batch` seconds per variant and batch, and ratios."""
    import numpy as np
    from keras import ops

    import keras_lora

    built = {
        "base": models.build_classifier(config, dropout=0.0),
        "fresh base": models.build_classifier(config, dropout=0.0),
        "unmerged": models.build_classifier(config, dropout=0.0),
        "merged": models.build_classifier(config, dropout=0.0),
    }
    for name in ("unmerged", "merged"):
        keras_lora.enable_lora(built[name], rank=config["rank"])
        _randomize_factors(built[name])
    keras_lora.merge_lora(built["merged"])
    for model in built.values():
        model.compile(jit_compile=jit_compile)
    result = {}
    for batch in batches:
        x, _ = models.make_batch({**config, "batch_size": batch})
        outputs = {}
        for name, model in built.items():
            outputs[name] = np.asarray(ops.convert_to_numpy(model.predict_on_batch(x)))
        wall, cpu = interleaved(
            {n: (lambda m=m, x=x: m.predict_on_batch(x)) for n, m in built.items()},
            rounds,
            steps,
        )
        medians = {n: median(wall[n]) for n in built}
        result[f"batch {batch}"] = {
            "median_s": medians,
            "cpu_median_s": {n: median(cpu[n]) for n in built},
            "merged / fresh base": medians["merged"] / medians["fresh base"],
            "unmerged / base": medians["unmerged"] / medians["base"],
            "fresh base / base": medians["fresh base"] / medians["base"],
            "max_abs_diff_merged_vs_unmerged": float(
                np.max(np.abs(outputs["merged"] - outputs["unmerged"]))
            ),
        }
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", default=None, help="write the results here")
    device.add_torch_threads_argument(parser, "1 on a shared CPU")
    args = parser.parse_args(argv)
    import keras

    device.set_torch_threads(args.torch_threads)

    config = models.TINY if args.tiny else models.DEFAULT
    results = {
        "backend": keras.backend.backend(),
        "device": device.describe(),
        "call_overhead": call_overhead(args.rounds, 30 if args.tiny else 300),
        "forward": forward(config, args.rounds, 1 if args.tiny else 3),
    }
    return device.print_and_write(results, args.json)


if __name__ == "__main__":
    main()
