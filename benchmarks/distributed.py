"""What LoRA saves past one device: gradient traffic and per-device memory (JAX).

Usage (sets 8 virtual CPU devices itself unless XLA_FLAGS says otherwise):

    KERAS_BACKEND=jax python benchmarks/distributed.py [--layers 24] [--rank 8]
        [--vocab 50257] [--json PATH]

Two measurements on a GPT-2-medium-shaped KerasHub backbone (hidden 1024,
16 heads, MLP 4096, sequence 1024, vocabulary 50304: GPT-2's padded to a
multiple of 64; 24 layers by default). About 4 minutes and 6 GB of RAM:

1. Data parallel: the bytes all-reduced per training step, keras-lora (only
   the factors' gradients travel) vs full fine-tuning. Read from the compiled
   XLA program of one gradient step under `keras.distribution.DataParallel`
   over the 8 devices (the operands of its all-reduce instructions), so it is
   what the compiler emits, not a formula; the formula (4 bytes per trainable
   float32 parameter) is printed beside it. The program is only compiled,
   never run: no device holds the full model 8 times.
2. Model parallel: the bytes each device holds for the factors and their Adam
   slots (and for all variables), under `ModelParallel` on a 1 x 8 mesh with
   a GPT-2 layout map, with factor layouts derived from the kernels (what
   keras-lora does) vs replicated factors (what a layout map that does not
   name them gave before). Read from each array's shards on each device.

Prints a Markdown table and writes the figures as JSON (default
`benchmarks/results/distributed.json`). See docs/distributed.md.
"""

import argparse
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEVICES = 8
# XLA's text form of one array shape, e.g. `f32[1024,16,64]{2,1,0}`.
_SHAPE = re.compile(r"\b(f16|bf16|f32|f64|s32|s64|u32|u8|s8|pred)\[([\d,]*)\]")
_BYTES = {"f16": 2, "bf16": 2, "f32": 4, "f64": 8, "s32": 4, "s64": 8}
_BYTES.update({"u32": 4, "u8": 1, "s8": 1, "pred": 1})


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--rank", type=int, default=8)
    # GPT-2's 50257 rounded up to a multiple of 64 (as Megatron pads it), so
    # that the token table splits over 8 devices.
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--sequence", type=int, default=1024)
    default_json = os.path.join(ROOT, "benchmarks", "results", "distributed.json")
    parser.add_argument("--json", default=default_json)
    return parser.parse_args(argv)


def gpt2_layout_map(mesh, model="model"):
    """A layout map for KerasHub's GPT-2 (it has no `get_layout_map`).

    Megatron-style: q/k/v split by heads, the attention output by heads, the
    MLP's first kernel by columns and its second by rows, the token table by
    vocabulary rows.
    """
    import keras

    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["token_embedding/embeddings"] = (model, None)
    layout_map[".*(query|key|value)/kernel"] = (None, model, None)
    layout_map[".*attention_output/kernel"] = (model, None, None)
    layout_map[".*feedforward_intermediate_dense/kernel"] = (None, model)
    layout_map[".*feedforward_output_dense/kernel"] = (model, None)
    return layout_map


def gpt2_medium(args):
    import keras_hub

    return keras_hub.models.GPT2Backbone(
        vocabulary_size=args.vocab,
        num_layers=args.layers,
        num_heads=16,
        hidden_dim=1024,
        intermediate_dim=4096,
        max_sequence_length=args.sequence,
        dropout=0.0,
    )


def all_reduce_bytes(hlo_text):
    """Bytes of the results of every all-reduce in an optimized HLO module."""
    total = 0
    for line in hlo_text.splitlines():
        if not re.search(r"\ball-reduce(-start)?\(", line):
            continue
        result = line.split("=", 1)[1].split("all-reduce", 1)[0]
        for dtype, dims in _SHAPE.findall(result):
            size = 1
            for dim in filter(None, dims.split(",")):
                size *= int(dim)
            total += size * _BYTES[dtype]
    return total


def gradient_step_hlo(backbone, batch, sequence):
    """Optimized HLO of one gradient step of the trainable variables, data parallel.

    Compiled for `batch` rows split over every device, the variables
    replicated (what `DataParallel` does), from abstract arrays only.
    """
    import jax
    import keras
    import numpy as np

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))

    def loss(trainable, non_trainable, token_ids, padding_mask):
        inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
        hidden, _ = backbone.stateless_call(trainable, non_trainable, inputs)
        return keras.ops.mean(keras.ops.square(hidden))

    def abstract(variables):
        return [
            jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated)
            for v in variables
        ]

    tokens = jax.ShapeDtypeStruct((batch, sequence), "int32", sharding=by_batch)
    lowered = jax.jit(jax.grad(loss)).lower(
        abstract(backbone.trainable_variables),
        abstract(backbone.non_trainable_variables),
        tokens,
        tokens,
    )
    return lowered.compile().as_text()


def per_device_bytes(variables):
    """{device: bytes} of the given variables' shards."""
    held = {}
    for variable in variables:
        for shard in variable.value.addressable_shards:
            key = str(shard.device)
            held[key] = held.get(key, 0) + shard.data.nbytes
    return held


def data_parallel(args):
    """All-reduced gradient bytes per step: keras-lora (q/v) vs full fine-tuning."""
    import keras

    import keras_lora

    backbone = gpt2_medium(args)
    full_params = sum(math.prod(v.shape) for v in backbone.trainable_variables)
    full = all_reduce_bytes(gradient_step_hlo(backbone, DEVICES, 128))
    keras_lora.enable_lora(backbone, rank=args.rank)
    lora_params = sum(math.prod(v.shape) for v in backbone.trainable_variables)
    lora = all_reduce_bytes(gradient_step_hlo(backbone, DEVICES, 128))
    del backbone
    keras.backend.clear_session()
    return {
        "full_allreduce_bytes": full,
        "full_trainable_params": full_params,
        "lora_allreduce_bytes": lora,
        "lora_trainable_params": lora_params,
        "ratio_full_over_lora": full / lora,
    }


def model_parallel(args, targets, rank):
    """Per-device bytes of factors + Adam slots: derived vs replicated layouts."""
    import keras

    import keras_lora

    mesh = keras.distribution.DeviceMesh(
        (1, DEVICES), ("batch", "model"), keras.distribution.list_devices()
    )
    layout_map = gpt2_layout_map(mesh)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    results = {}
    with distribution.scope():
        backbone = gpt2_medium(args)
        for variant in ("replicated", "derived"):
            if variant == "replicated":
                # Layout map entries that name the factors win: replicate them.
                keys = {
                    ".*(query|key|value)/lora_b": (None, None, None),
                    ".*attention_output/lora_a": (None, None, None),
                    ".*(query|key|value|feedforward_[a-z_]+)/lora_a": (None, None),
                    ".*(attention_output|feedforward_[a-z_]+)/lora_b": (None, None),
                }
                for key, axes in keys.items():
                    layout_map[key] = axes
            else:
                for key in keys:
                    del layout_map[key]
            keras_lora.enable_lora(backbone, rank=rank, targets=targets)
            optimizer = keras.optimizers.Adam()
            optimizer.build(backbone.trainable_variables)
            factor_bytes = per_device_bytes(
                backbone.trainable_variables + optimizer.variables
            )
            all_bytes = per_device_bytes(backbone.variables + optimizer.variables)
            results[variant] = {
                "factors_and_slots_max_device_bytes": max(factor_bytes.values()),
                "all_variables_max_device_bytes": max(all_bytes.values()),
            }
            # B starts at zero: merging leaves the kernels as they were.
            keras_lora.merge_lora(backbone)
    del backbone
    keras.backend.clear_session()
    results["factor_memory_ratio_replicated_over_derived"] = (
        results["replicated"]["factors_and_slots_max_device_bytes"]
        / results["derived"]["factors_and_slots_max_device_bytes"]
    )
    return results


def megabytes(n):
    return f"{n / 2**20:,.2f} MB"


def table(results):
    dp = results["data_parallel"]
    lines = [
        f"GPT-2-medium shape, {results['layers']} layers, vocabulary "
        f"{results['vocab']}, {DEVICES} virtual CPU devices, JAX "
        f"{results['jax']}, Keras {results['keras']}",
        "",
        "| data parallel, per step | full fine-tuning | keras-lora (q/v) | ratio |",
        "|---|---|---|---|",
        f"| trainable parameters | {dp['full_trainable_params']:,} | "
        f"{dp['lora_trainable_params']:,} | "
        f"{dp['full_trainable_params'] / dp['lora_trainable_params']:,.0f}x |",
        f"| bytes all-reduced (compiled HLO) | {megabytes(dp['full_allreduce_bytes'])}"
        f" | {megabytes(dp['lora_allreduce_bytes'])} | "
        f"{dp['ratio_full_over_lora']:,.0f}x |",
        "",
        "| model parallel 1x8, per device (max over devices) | replicated factors |"
        " derived layouts | ratio |",
        "|---|---|---|---|",
    ]
    for name, mp in results["model_parallel"].items():
        rep, der = mp["replicated"], mp["derived"]
        lines.append(
            f"| {name}: factors + Adam slots | "
            f"{megabytes(rep['factors_and_slots_max_device_bytes'])} | "
            f"{megabytes(der['factors_and_slots_max_device_bytes'])} | "
            f"{mp['factor_memory_ratio_replicated_over_derived']:.2f}x |"
        )
        lines.append(
            f"| {name}: all variables | "
            f"{megabytes(rep['all_variables_max_device_bytes'])} | "
            f"{megabytes(der['all_variables_max_device_bytes'])} | "
            f"{rep['all_variables_max_device_bytes'] / der['all_variables_max_device_bytes']:.3f}x |"  # noqa: E501
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip()
        )
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax
    import keras

    if keras.backend.backend() != "jax":
        raise ValueError(
            "benchmarks/distributed.py measures keras.distribution, which runs "
            f"on JAX. Received: KERAS_BACKEND={keras.backend.backend()!r}"
        )
    results = {
        "layers": args.layers,
        "vocab": args.vocab,
        "rank": args.rank,
        "jax": jax.__version__,
        "keras": keras.__version__,
        "command": " ".join(
            ["KERAS_BACKEND=jax python benchmarks/distributed.py"]
            + (sys.argv[1:] if argv is None else argv)
        ),
    }
    results["data_parallel"] = data_parallel(args)
    results["model_parallel"] = {
        f"q/v, r={args.rank}": model_parallel(args, None, args.rank),
        "all-linear, r=16": model_parallel(args, "all-linear", 16),
    }
    print(table(results))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
