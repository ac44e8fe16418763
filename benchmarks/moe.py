"""LoRA on mixture-of-experts weights: factored vs generic path, and learning.

Two sections (issue 23), on a Mixtral-shaped `MixtralCausalLM` with random
weights built from a config:

- `paths`: the same expert weights adapted through the factored path (the
  KerasHub recipe: `einsum(x, A)` then `B`, per expert) and the generic path
  (W + s·A·B built in every call, as Keras's own LoRA does for kernels; the
  banks get a subclass keras-lora has no recipe for). Step time (median of
  interleaved rounds, compiled `train_on_batch`) and, on JAX, XLA's compiled
  step footprint on abstract shapes (deterministic).
- `learning`: fine-tuning on the demo text (`keras_lora/data/demo_target.txt`)
  with `targets="all-linear"` (experts and attention) against attention-only
  LoRA at rank 32 (its largest: the value projection has 32 outputs), so
  that both train about as many parameters (16.5k, 14.3k); the
  loss after each epoch, and the trainable parameters per expert.

    KERAS_BACKEND=jax python -m benchmarks.moe
    KERAS_BACKEND=torch python -m benchmarks.moe --sections paths --torch-threads 1
"""

import argparse

import numpy as np

from benchmarks import device

PATHS_SHAPE = dict(
    vocabulary_size=512,
    num_layers=2,
    num_query_heads=4,
    num_key_value_heads=2,
    hidden_dim=256,
    intermediate_dim=512,
    num_experts=8,
    top_k=2,
    sliding_window=128,
)
LEARNING_SHAPE = dict(PATHS_SHAPE, hidden_dim=64, intermediate_dim=128, num_experts=4)
BATCH, SEQ = 4, 128
EXPERT_TARGETS = [".*experts/expert_feedforward_.*"]


def causal_lm(shape, seed=0):
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.MixtralBackbone(**shape)
    return keras_hub.models.MixtralCausalLM(backbone=backbone, preprocessor=None)


def without_recipes(model):
    """Gives each expert bank a subclass keras-lora has no recipe for."""
    from keras_lora.layers import expert_bank

    for layer in model._flatten_layers(include_self=False):
        if expert_bank.has_recipe(layer):
            cls = type(layer)
            layer.__class__ = type(f"Unknown{cls.__name__}", (cls,), {})


def paths(rounds):
    import keras

    import keras_lora
    from benchmarks import models, timing

    rng = np.random.default_rng(0)
    tokens = rng.integers(1, PATHS_SHAPE["vocabulary_size"], (BATCH, SEQ))
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
    built, results = {}, {}
    for variant in ("factored", "generic"):
        model = causal_lm(PATHS_SHAPE)
        if variant == "generic":
            without_recipes(model)
        keras_lora.enable_lora(model, rank=8, targets=EXPERT_TARGETS)
        layers = keras_lora.lora_layers(model)
        assert all(layer.factored == (variant == "factored") for layer in layers)
        models.compile_causal_lm(model, keras.optimizers.Adam(1e-3))
        built[variant] = model
        results[variant] = {}
        if keras.backend.backend() == "jax":
            from benchmarks.step_memory import step_footprint

            model.optimizer.build(model.trainable_variables)
            results[variant]["xla"] = step_footprint(
                model, {"batch": BATCH, "seq": SEQ}
            )
    steps = {
        name: (lambda m=model: float(m.train_on_batch(x, tokens)))
        for name, model in built.items()
    }
    for step in steps.values():  # compile outside the timed rounds
        step()
    wall, _ = timing.interleaved(steps, rounds)
    for name in built:
        results[name]["step_ms"] = 1000 * timing.median(wall[name])
    factored, generic = results["factored"], results["generic"]
    ratios = {"step_time": factored["step_ms"] / generic["step_ms"]}
    if "xla" in factored:
        for key in ("footprint_mb", "temp_mb"):
            ratios[key] = factored["xla"][key] / generic["xla"][key]
    return {"results": results, "factored_over_generic": ratios}


def learning(epochs, batches):
    import keras

    import keras_lora
    from benchmarks import models
    from keras_lora import demo_data

    tokenizer = demo_data.build_tokenizer(
        [demo_data.read_text(name) for name in demo_data.TEXTS]
    )
    ids = demo_data.tokenize(tokenizer, demo_data.read_text(demo_data.TARGET_TEXT))
    shape = dict(LEARNING_SHAPE, vocabulary_size=tokenizer.vocabulary_size())
    x, y = demo_data.windows(ids, 64, multiple_of=BATCH)
    x = {key: value[: batches * BATCH] for key, value in x.items()}
    y = y[: batches * BATCH]
    variants = {
        "all-linear, rank 3": dict(rank=3, targets="all-linear"),
        "attention only (q, v), rank 32": dict(rank=32, targets=None),
    }
    results = {}
    for name, arguments in variants.items():
        model = causal_lm(shape)
        keras_lora.enable_lora(model, **arguments)
        models.compile_causal_lm(model, keras.optimizers.Adam(1e-2))
        trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
        history = model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0)
        experts = [
            layer
            for layer in keras_lora.lora_layers(model)
            if getattr(layer, "factored", False)
        ]
        per_expert = sum(
            (np.prod(layer.lora_a.shape) + np.prod(layer.lora_b.shape))
            // layer.lora_a.shape[0]
            for layer in experts
        )
        results[name] = {
            "trainable": trainable,
            "trainable_per_expert_per_block": int(per_expert // shape["num_layers"]),
            "loss": [round(v, 4) for v in history.history["loss"]],
        }
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="paths,learning")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--batches", type=int, default=8, help="at most (the text has 4 of 4x64)"
    )
    parser.add_argument("--out", default=None, help="write the results as JSON")
    device.add_torch_threads_argument(parser, "1 on a shared CPU")
    args = parser.parse_args(argv)
    import keras

    device.set_torch_threads(args.torch_threads)

    report = {"backend": keras.backend.backend()}
    sections = args.sections.split(",")
    if "paths" in sections:
        report["paths"] = paths(args.rounds)
    if "learning" in sections:
        report["learning"] = learning(args.epochs, args.batches)
    return device.print_and_write(report, args.out)


if __name__ == "__main__":
    main()
