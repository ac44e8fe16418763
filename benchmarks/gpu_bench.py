"""The GPU benchmark of the GPU check (docs/gpu.md), one backend per run.

GPT-2-medium-shaped classifier (24 blocks, width 1024, 16 heads, MLP 4096,
sequence 256, batch 8, float32, Adam, rank 4 on q/v), each figure a ratio of
medians measured side by side in interleaved rounds of this one run:

- train: one `train_on_batch` of keras-lora q/v, Keras's built-in LoRA on the
  same layers, and full fine-tuning (on PyTorch also compiled with
  `jit_compile=True`, i.e. `torch.compile`, beside the eager default);
- memory: the device allocator's peak during two training steps of each
  variant, each in a child process of its own (JAX keeps one peak per
  process): the whole model's, weights included, as the issue's figures are;
  and of a Llama-3.2-1B-shaped causal LM (batch 4 x 512): full fine-tuning
  against an int4 base with LoRA on every linear layer and the chunked loss
  (issue 25);
- forward: `predict_on_batch` at batch 1 and 8 (sequence 128) of the base, a
  freshly built base, the unmerged LoRA model and the merged one
  (`latency.forward`), and a tiny layer's per-call overhead.

    KERAS_BACKEND=torch python benchmarks/gpu_bench.py --json OUT.json [--tiny]
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import device, latency, models  # noqa: E402
from benchmarks.timing import interleaved, median  # noqa: E402

MEDIUM = dict(
    vocabulary_size=50257,
    num_layers=24,
    num_heads=16,
    hidden_dim=1024,
    intermediate_dim=4096,
    sequence_length=256,
    batch_size=8,
    rank=4,
)
VARIANTS = ("keras-lora q/v", "keras built-in q/v", "full fine-tuning")
MARKER = "GPU_BENCH_MEMORY "
# Llama-3.2-1B's shape (random weights), for issue 25's QLoRA memory figure.
LLAMA_1B = dict(
    vocabulary_size=128256,
    num_layers=16,
    num_query_heads=32,
    num_key_value_heads=8,
    hidden_dim=2048,
    intermediate_dim=8192,
    tie_word_embeddings=True,
)
LLAMA_TINY = dict(LLAMA_1B, vocabulary_size=256, num_layers=2, hidden_dim=64)
LLAMA_TINY.update(num_query_heads=4, num_key_value_heads=2, intermediate_dim=128)
LLAMA_VARIANTS = ("llama-1b full fine-tuning", "llama-1b int4 LoRA, chunked loss")
LLAMA_BATCH, LLAMA_SEQ = 4, 512


def _config(tiny):
    return models.TINY if tiny else MEDIUM


def _variant(name, config, jit_compile):
    method, targets = models.TRAIN_VARIANTS[name]
    return models.make_variant(
        method, targets, config, dropout=0.0, jit_compile=jit_compile
    )


def train(config, rounds, compiled_torch, tiny=False):
    """Median seconds per step of each variant, and the ratios."""
    import keras

    jit = {"jax": True, "tensorflow": True, "torch": False}[keras.backend.backend()]
    # The dry run (tiny) times two variants: enough to try the harness.
    setups = [(name, jit) for name in (VARIANTS[:2] if tiny else VARIANTS)]
    if compiled_torch and keras.backend.backend() == "torch":
        setups += [(name, True) for name in VARIANTS[:2]]
    x, y = models.make_batch(config)
    steps = {}
    for name, jit_compile in setups:
        label = name + (" (torch.compile)" if jit_compile and not jit else "")
        model = _variant(name, config, jit_compile)
        model.train_on_batch(x, y)  # compile, first step
        steps[label] = lambda m=model: float(m.train_on_batch(x, y))
    wall, _ = interleaved(steps, rounds)
    medians = {label: median(times) for label, times in wall.items()}
    ratios = {
        "keras-lora / keras built-in": medians["keras-lora q/v"]
        / medians["keras built-in q/v"],
    }
    if "full fine-tuning" in medians:
        ratios["keras-lora / full"] = (
            medians["keras-lora q/v"] / medians["full fine-tuning"]
        )
    compiled = "keras-lora q/v (torch.compile)"
    if compiled in medians:
        ratios["keras-lora compiled / eager"] = (
            medians[compiled] / medians["keras-lora q/v"]
        )
        ratios["keras-lora / keras built-in (both compiled)"] = (
            medians[compiled] / medians["keras built-in q/v (torch.compile)"]
        )
    return {"median_s": medians, "ratios": ratios}


def memory_child(name, tiny):
    """Prints the device peak of two training steps of `name` (child process)."""
    config = _config(tiny)
    model = _variant(name, config, jit_compile="auto")
    x, y = models.make_batch(config)
    device.reset_peak_memory()
    for _ in range(2):
        model.train_on_batch(x, y)
    peak = device.peak_memory_bytes()
    print(MARKER + json.dumps({"variant": name, "peak": peak}))


def llama_child(name, tiny):
    """Prints the device peak of two training steps of a Llama-3.2-1B-shaped
    causal LM (child process): full fine-tuning, or int4 base + LoRA rank 8
    on every linear layer with the chunked loss (the QLoRA recipe)."""
    import keras_hub
    import numpy as np

    import keras_lora

    config = LLAMA_TINY if tiny else LLAMA_1B
    batch, seq = (2, 16) if tiny else (LLAMA_BATCH, LLAMA_SEQ)
    backbone = keras_hub.models.LlamaBackbone(**config)
    model = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    if name != LLAMA_VARIANTS[0]:
        backbone.quantize("int4")
        keras_lora.enable_lora(backbone, rank=8, targets="all-linear")
    models.compile_causal_lm(model)
    if name != LLAMA_VARIANTS[0]:
        keras_lora.use_chunked_loss(model, chunk_size=min(128, seq))
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, config["vocabulary_size"], (batch, seq)).astype("int32")
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
    device.reset_peak_memory()
    for _ in range(2):
        model.train_on_batch(x, tokens)
    peak = device.peak_memory_bytes()
    print(MARKER + json.dumps({"variant": name, "peak": peak}))


def memory(tiny, timeout=600):
    """{variant: device peak bytes} (None on a CPU), each from a child.

    `tiny` (the dry run) measures keras-lora only: one child is enough to
    show the harness works."""
    result = {}
    # The dry run measures one variant of each: enough to try the harness.
    children = [("--memory-child", name) for name in VARIANTS[: 1 if tiny else 3]]
    children += [("--llama-child", name) for name in LLAMA_VARIANTS[int(tiny) :]]
    for flag, name in children:
        command = [sys.executable, __file__, flag, name]
        if tiny:
            command.append("--tiny")
        out = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, check=True
        ).stdout
        line = next(x for x in out.splitlines() if x.startswith(MARKER))
        result[name] = json.loads(line[len(MARKER) :])["peak"]
    ratios = {}
    for full, variants in (
        (VARIANTS[2], VARIANTS[:2]),
        (LLAMA_VARIANTS[0], LLAMA_VARIANTS[1:]),
    ):
        if result.get(full):
            for name in variants:
                ratios[f"{name} / full"] = result[name] / result[full]
    return {"peak_bytes": result, "ratios": ratios}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="smoke-test sizes")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--llama-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child, args.tiny)
    if args.llama_child:
        return llama_child(args.llama_child, args.tiny)
    import keras

    rounds = args.rounds or (1 if args.tiny else 7)
    config = _config(args.tiny)
    forward_config = {**config, "sequence_length": min(128, config["sequence_length"])}
    results = {
        "backend": keras.backend.backend(),
        "device": device.describe(),
        "config": config,
        "train": train(config, rounds, compiled_torch=not args.tiny, tiny=args.tiny),
        "memory": memory(args.tiny),
        "forward": latency.forward(forward_config, rounds, 1 if args.tiny else 5),
        "call_overhead": latency.call_overhead(rounds, 20 if args.tiny else 200),
    }
    return device.print_and_write(results, args.json)


if __name__ == "__main__":
    main()
