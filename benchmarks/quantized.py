"""Training memory and step time on quantized bases (issue 11), as ratios.

One child process per variant, all from the same seed and shape, on a
GPT-2-shaped KerasHub backbone with a mean-squared-error head on its sequence
output:

- `full`: every weight trains, float32, Adam;
- `lora-fp32`, `lora-int8`, `lora-int4`: keras-lora on q/v (rank 8) over a
  float32 / `quantize("int8")` / `quantize("int4")` base;
- `keras-int8`, `keras-int4`: Keras's built-in `backbone.enable_lora(8)` on the
  same quantized bases (it factorises q/k/v/o's last axis only, and builds
  the merged kernel each step);
- `lora-int8-remat`: `lora-int8` built inside
  `keras.RematScope(mode="activations")` (the one mode Keras trains a GPT-2
  backbone under on every backend: the others trip over its `Dropout`).

Each child reports, from Linux's counters: `weights_mb` (bytes of every
variable of the model), `peak_mb` (peak RSS over the timed steps, after the
first step compiled, above the process's RSS before the model was built:
weights, optimizer state, gradients, saved activations, compiled program) and
`step_ms` (median of the timed steps). The quantized bases are written once
and loaded by their children, as from an int8/int4 checkpoint, so no float
kernel is ever made there. The parent prints each figure and its ratio to
`full`.

Run:
    KERAS_BACKEND=jax python -m benchmarks.quantized            # 6 x 1024
    KERAS_BACKEND=jax python -m benchmarks.quantized --layers 24  # GPT-2 medium
    python -m benchmarks.quantized --tiny                           # smoke
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks.memory import _peak_mb, _release_free_heap, _reset_peak

MARKER = "KERAS_LORA_BENCH_QUANTIZED "
VARIANTS = (
    "full",
    "lora-fp32",
    "lora-int8",
    "lora-int4",
    "keras-int8",
    "keras-int4",
    "lora-int8-remat",
)


def shape(layers, hidden, tiny):
    if tiny:
        return dict(layers=1, hidden=32, heads=2, batch=2, seq=16, vocab=100)
    return dict(layers=layers, hidden=hidden, heads=16, batch=2, seq=128, vocab=1000)


def float_backbone(s):
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    return keras_hub.models.GPT2Backbone(
        vocabulary_size=s["vocab"],
        num_layers=s["layers"],
        num_heads=s["heads"],
        hidden_dim=s["hidden"],
        intermediate_dim=4 * s["hidden"],
        max_sequence_length=s["seq"],
    )


def prepare(mode, s, folder):
    """Writes the quantized base once, as a user's int8/int4 checkpoint."""
    backbone = float_backbone(s)
    backbone.quantize(mode)
    backbone.save(os.path.join(folder, f"{mode}.keras"))


def build(variant, s, folder):
    import keras
    import numpy as np

    import keras_lora

    remat = "remat" in variant
    mode = next((m for m in ("int8", "int4") if m in variant), None)
    with keras.RematScope(mode="activations" if remat else None):
        if mode:
            # Loaded, as from a quantized preset: no float kernel is ever made.
            path = os.path.join(folder, f"{mode}.keras")
            backbone = keras.saving.load_model(path, compile=False)
        else:
            backbone = float_backbone(s)
    if variant.startswith("lora"):
        keras_lora.enable_lora(backbone, rank=8)
    elif variant.startswith("keras"):
        backbone.enable_lora(8)
    backbone.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse")
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(1, s["vocab"], (s["batch"], s["seq"])),
        "padding_mask": np.ones((s["batch"], s["seq"]), "int32"),
    }
    y = rng.standard_normal((s["batch"], s["seq"], s["hidden"])).astype("float32")
    return backbone, x, y


def child(variant, s, steps, folder):
    import keras  # noqa: F401  (the frameworks are in the baseline)
    import keras_hub  # noqa: F401

    from benchmarks.memory import _status_mb

    _release_free_heap()
    baseline = _status_mb("VmRSS") or 0.0
    model, x, y = build(variant, s, folder)
    weights = sum(v.numpy().nbytes if hasattr(v, "numpy") else 0 for v in model.weights)
    model.train_on_batch(x, y)  # compile
    _release_free_heap()
    _reset_peak()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    result = {
        "weights_mb": weights / 2**20,
        # Above the interpreter and frameworks: what the model costs.
        "peak_mb": _peak_mb() - baseline,
        "step_ms": 1e3 * statistics.median(times),
        "trainable": int(sum(v.numpy().size for v in model.trainable_weights)),
    }
    print(MARKER + json.dumps(result), flush=True)


def run_child(variant, args, folder):
    command = [sys.executable, "-m", "benchmarks.quantized", "--child", variant]
    command += ["--folder", folder]
    command += ["--layers", str(args.layers), "--hidden", str(args.hidden)]
    command += ["--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    for line in done.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER) :])
    return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--child", choices=VARIANTS)
    parser.add_argument("--prepare", choices=("int8", "int4"))
    parser.add_argument("--folder", help="where the quantized bases are written")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    s = shape(args.layers, args.hidden, args.tiny)
    if args.prepare:
        return prepare(args.prepare, s, args.folder)
    if args.child:
        return child(args.child, s, args.steps, args.folder)
    import tempfile

    import keras

    with tempfile.TemporaryDirectory() as folder:
        for mode in ("int8", "int4"):
            command = [sys.executable, "-m", "benchmarks.quantized"]
            command += ["--prepare", mode, "--folder", folder]
            command += ["--layers", str(args.layers), "--hidden", str(args.hidden)]
            command += ["--tiny"] if args.tiny else []
            subprocess.run(command, check=True, capture_output=True, env=os.environ)
        results = {v: run_child(v, args, folder) for v in args.variants.split(",")}
    full = results.get("full", {})
    print(f"backend={keras.backend.backend()} shape={s}")
    for variant, r in results.items():
        if "error" in r:
            print(f"{variant:16s} failed: {r['error']}")
            continue
        ratios = " ".join(
            f"{k}/full={r[k] / full[k]:.3f}"
            for k in ("weights_mb", "peak_mb", "step_ms")
            if full.get(k)
        )
        print(
            f"{variant:16s} weights {r['weights_mb']:8.1f} MB"
            f"  peak {r['peak_mb']:8.1f} MB  step {r['step_ms']:8.1f} ms"
            f"  trainable {r['trainable']:>10d}  {ratios}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"backend": keras.backend.backend(), "shape": s, **results}, f)


if __name__ == "__main__":
    main()
