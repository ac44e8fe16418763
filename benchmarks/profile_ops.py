"""Per-op profile of one GPT-2-shaped projection, on the current backend.

Times, side by side in interleaved rounds, a jit-compiled forward + backward
pass (gradients of `sum(y * g)`) of one 768 -> 768 projection on a batch of
8 x 128 tokens: the frozen base alone, full fine-tuning, Keras's built-in
LoRA, the keras-lora path and its pieces, and alternative formulations of the
factored path. Everything is written with `keras.ops`; only taking gradients
and compiling are backend specific.

    KERAS_BACKEND=jax python benchmarks/profile_ops.py [--rounds N] [--d-out 3072]
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def grad_function(fn, argnums):
    """A compiled function returning the gradients of `fn` wrt `argnums`."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        grad = jax.jit(jax.grad(fn, argnums))
        return lambda *a: jax.block_until_ready(grad(*a))
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def grad(*args):
            with tf.GradientTape() as tape:
                tape.watch([args[i] for i in argnums])
                loss = fn(*args)
            return tape.gradient(loss, [args[i] for i in argnums])

        return lambda *a: [t.numpy() for t in grad(*a)]
    if backend == "torch":
        import torch

        def grad(*args):
            args = [a.detach().requires_grad_(i in argnums) for i, a in enumerate(args)]
            loss = fn(*args)
            return torch.autograd.grad(loss, [args[i] for i in argnums])

        compiled = torch.compile(grad)
        return lambda *a: compiled(*a)
    raise ValueError(backend)


def formulations():
    """name -> (fn(x, W, A, B, g), argnums to differentiate)."""
    from keras import ops

    def out(y, g):
        return ops.sum(ops.multiply(y, g))

    def lora(x, w, a, b, g):
        return out(ops.add(ops.matmul(x, w), ops.matmul(ops.matmul(x, a), b)), g)

    def lora_2d(x, w, a, b, g):
        x2 = ops.reshape(x, (-1, x.shape[-1]))
        y = ops.add(ops.matmul(x2, w), ops.matmul(ops.matmul(x2, a), b))
        return out(ops.reshape(y, x.shape[:-1] + (w.shape[-1],)), g)

    def lora_concat(x, w, a, b, g):
        # [x, xA] @ [[W], [B]]: one big matmul instead of two plus an add.
        h = ops.matmul(x, a)
        return out(
            ops.matmul(ops.concatenate([x, h], -1), ops.concatenate([w, b], 0)), g
        )

    def lora_einsum(x, w, a, b, g):
        h = ops.einsum("btc,cr->btr", x, a)
        return out(
            ops.add(ops.einsum("btc,cd->btd", x, w), ops.einsum("btr,rd->btd", h, b)), g
        )

    def column_major(a):
        # A contiguous copy of A^T, seen through a transpose: torch then
        # computes dA as (dh^T x)^T, the fast orientation, and x @ A with a
        # transposed-B GEMM. XLA (JAX, TF) picks its own layouts either way.
        rows, cols = a.shape
        flat = ops.reshape(ops.transpose(a), (rows * cols,))
        return ops.transpose(ops.reshape(flat, (cols, rows)))

    def lora_cm(x, w, a, b, g):
        return out(
            ops.add(ops.matmul(x, w), ops.matmul(ops.matmul(x, column_major(a)), b)), g
        )

    return {
        "frozen base (dX only)": (lambda x, w, a, b, g: out(ops.matmul(x, w), g), (0,)),
        "full fine-tuning (dX, dW)": (
            lambda x, w, a, b, g: out(ops.matmul(x, w), g),
            (0, 1),
        ),
        "keras built-in LoRA": (
            lambda x, w, a, b, g: out(ops.matmul(x, ops.add(w, ops.matmul(a, b))), g),
            (0, 2, 3),
        ),
        "keras-lora (x@W + (x@A)@B)": (lora, (0, 2, 3)),
        "LoRA path alone ((x@A)@B)": (
            lambda x, w, a, b, g: out(ops.matmul(ops.matmul(x, a), b), g),
            (0, 2, 3),
        ),
        "alt: 2-D reshape first": (lora_2d, (0, 2, 3)),
        "alt: einsum": (lora_einsum, (0, 2, 3)),
        "alt: concat [x, xA] @ [W; B]": (lora_concat, (0, 2, 3)),
        "alt: column-major A": (lora_cm, (0, 2, 3)),
        "alt: column-major A, path alone": (
            lambda x, w, a, b, g: out(ops.matmul(ops.matmul(x, column_major(a)), b), g),
            (0, 2, 3),
        ),
    }


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=8 * 128)
    parser.add_argument("--d-in", type=int, default=768)
    parser.add_argument("--d-out", type=int, default=768)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--only", default=None, help="comma-separated names")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads (PyTorch only)",
    )
    args = parser.parse_args(argv)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)

    import keras
    import numpy as np

    from benchmarks.timing import interleaved, median

    rng = np.random.default_rng(0)
    shape_x = (
        (args.tokens // 128, 128, args.d_in)
        if args.tokens >= 128
        else (1, args.tokens, args.d_in)
    )
    arrays = [
        rng.normal(size=shape_x),
        rng.normal(size=(args.d_in, args.d_out)) * 0.02,
        rng.normal(size=(args.d_in, args.rank)) * 0.02,
        rng.normal(size=(args.rank, args.d_out)) * 0.02,
        rng.normal(size=shape_x[:-1] + (args.d_out,)),
    ]
    tensors = [keras.ops.convert_to_tensor(a.astype("float32")) for a in arrays]
    functions = {}
    for name, (fn, argnums) in formulations().items():
        if args.only and not any(o in name for o in args.only.split(",")):
            continue
        compiled = grad_function(fn, argnums)
        compiled(*tensors)  # compile
        functions[name] = lambda c=compiled: c(*tensors)
    times, cpu = interleaved(functions, args.rounds)
    base = median(times[next(iter(times))])
    base_cpu = median(cpu[next(iter(cpu))])
    print(
        f"backend {keras.backend.backend()}: tokens {args.tokens}, "
        f"{args.d_in} -> {args.d_out}, rank {args.rank}, {args.rounds} rounds"
    )
    for name, values in times.items():
        print(
            f"  {name:32s} {median(values) * 1000:8.2f} ms  "
            f"x{median(values) / base:.2f} of the first row  (CPU time "
            f"x{median(cpu[name]) / base_cpu:.2f})"
        )
    return times


if __name__ == "__main__":
    main()
