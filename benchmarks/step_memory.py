"""XLA's footprint of one compiled training step of a causal LM (issue 25).

Deterministic: no timing, no RSS. Each variant's training step is written as
Keras's documented JAX training loop (`model.stateless_call`, the model's own
loss through `model.stateless_compute_loss`, `jax.value_and_grad`,
`optimizer.stateless_apply`), jitted with the state donated (as `fit` does),
lowered on abstract shapes (`jax.ShapeDtypeStruct`: no weights are read) and
compiled; the figure is XLA's `memory_analysis()` of that executable:

    footprint = argument + output + temp - alias

(`alias`: the donated state that the outputs reuse). Only the model's
variables are built (float32 weights, a few hundred MB at the default shape);
nothing runs.

Model: a GPT-2-shaped KerasHub `GPT2CausalLM` built from a config (vocabulary
50,257, hidden 1024, 16 heads, MLP 4096, 1024 positions, tied embedding),
`--layers` blocks (6 by default), batch 2 x 128, AdamW, its own sparse
cross-entropy on the logits. Variants (keras-lora rank 4 on q/v):

- `full`: every weight trains (the denominator);
- `lora-float`, `lora-int8`, `lora-int4`: `keras_lora.enable_lora(rank=4)` on a
  float32 / `quantize("int8")` / `quantize("int4")` base;
- `keras-int8`, `keras-int4`: Keras's own layer LoRA on the same quantized
  bases (`backbone.enable_lora(4)`: q/v, last axis factorised);
- `lora-bf16`: a `bfloat16` base (float32 factors);
- `*-chunked`: the same with `keras_lora.use_chunked_loss` (the logits
  in chunks of `--chunk` tokens, recomputed in the backward pass).

Run (JAX only: the figure is XLA's):
    KERAS_BACKEND=jax python -m benchmarks.step_memory
    KERAS_BACKEND=jax python -m benchmarks.step_memory --variants full,lora-int4
"""

import argparse
import gc
import json

VARIANTS = (
    "full",
    "lora-float",
    "lora-int8",
    "lora-int4",
    "keras-int8",
    "keras-int4",
    "lora-bf16",
    "lora-float-chunked",
    "lora-int8-chunked",
    "lora-int4-chunked",
    "lora-bf16-chunked",
)
GPT2 = dict(
    layers=6,
    hidden=1024,
    heads=16,
    vocab=50257,
    positions=1024,
    batch=2,
    seq=128,
    rank=4,
)
TINY = dict(
    layers=1, hidden=32, heads=2, vocab=101, positions=16, batch=2, seq=16, rank=2
)


def build(variant, s, chunk):
    """The compiled (not run) `GPT2CausalLM` of `variant` at shape `s`."""
    import keras
    import keras_hub

    import keras_lora
    from benchmarks import models

    keras.utils.set_random_seed(0)
    dtype = "bfloat16" if "bf16" in variant else "float32"
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=s["vocab"],
        num_layers=s["layers"],
        num_heads=s["heads"],
        hidden_dim=s["hidden"],
        intermediate_dim=4 * s["hidden"],
        max_sequence_length=s["positions"],
        dtype=dtype,
    )
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    mode = next((m for m in ("int8", "int4") if m in variant), None)
    if mode:
        model.quantize(mode)
    if variant.startswith("lora"):
        keras_lora.enable_lora(model, rank=s["rank"])
    elif variant.startswith("keras"):
        backbone.enable_lora(s["rank"])
    models.compile_causal_lm(model)
    if variant.endswith("chunked"):
        keras_lora.use_chunked_loss(model, chunk_size=chunk)
    model.optimizer.build(model.trainable_variables)
    return model


def step_footprint(model, s):
    """XLA's memory analysis of the jitted, donated training step at `s`."""
    import jax
    import numpy as np

    tokens = jax.ShapeDtypeStruct((s["batch"], s["seq"]), np.int32)
    x = {"token_ids": tokens, "padding_mask": tokens}
    weights = jax.ShapeDtypeStruct((s["batch"], s["seq"]), np.float32)
    return compiled_footprint(model, x, tokens, weights)


def compiled_footprint(model, x, y, sample_weight):
    """XLA's memory analysis of `model`'s jitted, donated training step.

    Args:
        model: a compiled Keras model whose optimizer is built.
        x, y, sample_weight: the data's shapes, as `jax.ShapeDtypeStruct`s
            (structures of them for `x`).

    Returns:
        A dict of MB figures (`footprint_mb`, `temp_mb`, ...) and the count
        of trainable parameters.
    """
    import jax
    import numpy as np

    def train_step(state, data):
        trainable, non_trainable, optimizer_vars, metrics_vars = state
        x, y, sample_weight = data

        def loss_fn(trainable, non_trainable):
            y_pred, non_trainable = model.stateless_call(
                trainable, non_trainable, x, training=True
            )
            loss, _ = model.stateless_compute_loss(
                trainable,
                non_trainable,
                metrics_vars,
                x=x,
                y=y,
                y_pred=y_pred,
                sample_weight=sample_weight,
            )
            return loss, non_trainable

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, non_trainable), grads = grad_fn(trainable, non_trainable)
        trainable, optimizer_vars = model.optimizer.stateless_apply(
            optimizer_vars, grads, trainable
        )
        return loss, (trainable, non_trainable, optimizer_vars, metrics_vars)

    def abstract(variables):
        return [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in variables]

    state = (
        abstract(model.trainable_variables),
        abstract(model.non_trainable_variables),
        abstract(model.optimizer.variables),
        abstract(model.metrics_variables),
    )
    data = (x, y, sample_weight)
    compiled = jax.jit(train_step, donate_argnums=0).lower(state, data).compile()
    m = compiled.memory_analysis()
    mb = 1e6
    return {
        "argument_mb": m.argument_size_in_bytes / mb,
        "output_mb": m.output_size_in_bytes / mb,
        "temp_mb": m.temp_size_in_bytes / mb,
        "alias_mb": m.alias_size_in_bytes / mb,
        "footprint_mb": (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - m.alias_size_in_bytes
        )
        / mb,
        "trainable": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
    }


def measure(variants, s, chunk):
    """{variant: figures}, one variant at a time (each model freed after)."""
    import keras

    results = {}
    for variant in variants:
        model = build(variant, s, chunk)
        results[variant] = step_footprint(model, s)
        del model
        keras.backend.clear_session()
        gc.collect()
    return results


def table(results):
    """The Markdown table of `results`, with ratios to `full`."""
    full = results.get("full", {}).get("footprint_mb")
    lines = [
        "| variant | footprint MB | / full | temp MB | argument MB | trainable |",
        "|---|---|---|---|---|---|",
    ]
    for variant, r in results.items():
        ratio = f"{r['footprint_mb'] / full:.3f}" if full else "-"
        lines.append(
            f"| {variant} | {r['footprint_mb']:.0f} | {ratio} | {r['temp_mb']:.0f} "
            f"| {r['argument_mb']:.0f} | {r['trainable']:,} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=GPT2["layers"])
    parser.add_argument("--chunk", type=int, default=32, help="positions per chunk")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--tiny", action="store_true", help="smoke-test shape")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    import keras

    if keras.backend.backend() != "jax":
        raise SystemExit("step_memory reads XLA's analysis: run with KERAS_BACKEND=jax")
    s = dict(TINY if args.tiny else GPT2)
    if not args.tiny:
        s["layers"] = args.layers
    results = measure(args.variants.split(","), s, args.chunk)
    print(f"shape={s} chunk={args.chunk}")
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"shape": s, "chunk": args.chunk, "results": results}, f)
    return results


if __name__ == "__main__":
    main()
