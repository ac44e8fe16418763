"""Training-step and inference timings, every variant side by side in one run."""

import numpy as np
from keras import ops

import keras_lora
from benchmarks import models
from benchmarks.timing import interleaved, median, timed


def training(config, rounds, steps, dropout, variants=None, jit_compile=True):
    """Median seconds per training step of each variant in `TRAIN_VARIANTS`."""
    variants = variants or list(models.TRAIN_VARIANTS)
    x, y = models.make_batch(config)
    built, result = {}, {}
    for name in variants:
        method, targets = models.TRAIN_VARIANTS[name]
        model = models.make_variant(
            method, targets, config, dropout=dropout, jit_compile=jit_compile
        )
        # The first step compiles; it is reported, not timed with the others.
        _, compile_s = timed(lambda m=model: m.train_on_batch(x, y))
        built[name] = model
        result[name] = {
            "trainable_params": models.trainable_count(model),
            "first_step_s": compile_s,
        }
    times, cpu = interleaved(
        {n: (lambda m=m: m.train_on_batch(x, y)) for n, m in built.items()},
        rounds,
        steps,
    )
    for name in variants:
        result[name].update(_summary(times[name], cpu[name]))
    return result


def _summary(wall, cpu):
    return {
        "median_s": median(wall),
        "median_cpu_s": median(cpu),
        "rounds_s": wall,
        "rounds_cpu_s": cpu,
    }


def _randomize_factors(model, seed=1):
    """Non-zero B factors, so that the adapted model differs from the base."""
    rng = np.random.default_rng(seed)
    for layer in keras_lora.lora_layers(model):
        shape = tuple(layer.lora_b.shape)
        layer.lora_b.assign(rng.normal(0, 0.02, shape).astype("float32"))


def inference(config, rounds, steps, dropout, jit_compile=True):
    """Forward pass: base model, keras-lora unmerged (q/v) and merged."""
    x, _ = models.make_batch(config)
    base = models.build_classifier(config, dropout=dropout)
    unmerged = models.build_classifier(config, dropout=dropout)
    keras_lora.enable_lora(unmerged, rank=config["rank"], train_layers=["head"])
    _randomize_factors(unmerged)
    merged = models.build_classifier(config, dropout=dropout)
    keras_lora.enable_lora(merged, rank=config["rank"], train_layers=["head"])
    _randomize_factors(merged)
    keras_lora.merge_lora(merged)
    built = {"base": base, "keras-lora unmerged": unmerged, "merged": merged}
    for model in built.values():
        model.compile(jit_compile=jit_compile)
        model.predict_on_batch(x)  # compile
    outputs = {
        n: np.asarray(ops.convert_to_numpy(m.predict_on_batch(x)))
        for n, m in built.items()
    }
    times, cpu = interleaved(
        {n: (lambda m=m: m.predict_on_batch(x)) for n, m in built.items()},
        rounds,
        steps,
    )
    result = {n: _summary(times[n], cpu[n]) for n in built}
    result["max_abs_diff_merged_vs_unmerged"] = float(
        np.max(np.abs(outputs["merged"] - outputs["keras-lora unmerged"]))
    )
    return result
