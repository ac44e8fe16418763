"""LoRA on a plain Keras Functional model: `LoRADense` directly, and `enable_lora`.

No KerasHub, no download. A small regression network is trained on task A
(the "pretrained" model); LoRA then adapts it to task B, a related task,
two ways:

1. by hand: the same Functional architecture built with `keras_lora.LoRADense`
   (a `keras.layers.Dense` whose kernel and bias are frozen and whose LoRA
   factors `lora_a`/`lora_b` train), given the pretrained weights;
2. with `keras_lora.enable_lora(model, rank=4)` on the pretrained model itself
   (in place: no rebuilding), then `save_adapter`, `merge_lora` and a plain
   `.keras` file.

Files go to `--out` (default `./plain-keras-lora/`; with `--smoke`, a
temporary folder that is removed at the end).

    python examples/plain_keras.py
    python examples/plain_keras.py --smoke
    KERAS_BACKEND=jax python examples/plain_keras.py
"""

import argparse
import os
import tempfile

from keras_lora.quiet import quiet_third_party_logs

quiet_third_party_logs()  # an application: before Keras imports TensorFlow

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_lora  # noqa: E402

FEATURES, HIDDEN = 16, 64
OUT = "plain-keras-lora"


def make_task(n, weights, seed):
    """y = tanh(x @ w1) @ w2: two tasks share w1 and differ in w2 slightly."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    w1, w2 = weights
    y = np.tanh(x @ w1) @ w2
    return x, y.astype("float32")


def build_model(dense=keras.layers.Dense, **lora_kwargs):
    """The same Functional architecture with `Dense` or `LoRADense` layers."""
    inputs = keras.Input((FEATURES,))
    h = dense(HIDDEN, activation="relu", name="hidden_1", **lora_kwargs)(inputs)
    h = dense(HIDDEN, activation="relu", name="hidden_2", **lora_kwargs)(h)
    outputs = keras.layers.Dense(1, name="out")(h)
    return keras.Model(inputs, outputs, name="regressor")


def fit(model, data, args, learning_rate):
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
    model.fit(*data, batch_size=32, epochs=args.epochs, verbose=0)
    return float(model.evaluate(*data, verbose=0))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="LoRA on a plain Keras Functional model, two ways: LoRADense "
        "layers directly, and enable_lora on an existing model. The backend is "
        "KERAS_BACKEND's (jax, torch or tensorflow)."
    )
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument(
        "--out",
        help=f"output folder (default: ./{OUT}; with --smoke, a temporary "
        "folder removed at the end)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run (tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.samples, args.epochs = 64, 2
    return args


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix=f"{OUT}-") as temporary:
        return run(args, args.out or (temporary if args.smoke else OUT))


def run(args, out):
    os.makedirs(out, exist_ok=True)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(FEATURES, 8)).astype("float32")
    w2 = rng.normal(size=(8, 1)).astype("float32")
    shift = rng.normal(scale=0.5, size=(FEATURES, 8)).astype("float32")
    task_a = make_task(args.samples, (w1, w2), seed=1)
    task_b = make_task(args.samples, (w1 + shift, w2), seed=2)
    print(f"backend: {keras.backend.backend()}")

    pretrained = build_model()
    loss_a = fit(pretrained, task_a, args, 3e-3)
    loss_b_before = float(pretrained.evaluate(*task_b, verbose=0))
    print(f"pretrained on task A: mse A {loss_a:.4f}, mse B {loss_b_before:.4f}")

    # 1. LoRADense directly: same architecture, the pretrained weights copied
    #    in. A LoRADense freezes its kernel and bias; only lora_a/lora_b train.
    #    The output layer is a plain Dense: freeze it as well.
    by_hand = build_model(keras_lora.LoRADense, rank=args.rank)
    by_hand.set_weights(_with_fresh_factors(pretrained, by_hand))
    by_hand.get_layer("out").trainable = False
    trainable, total, _ = keras_lora.trainable_summary(by_hand)
    loss_hand = fit(by_hand, task_b, args, 1e-2)
    print(
        f"1. LoRADense layers: {trainable:,} of {total:,} params trained; "
        f"mse B {loss_b_before:.4f} -> {loss_hand:.4f}"
    )

    # 2. enable_lora on a copy of the pretrained model (in place, any model).
    model = keras.models.clone_model(pretrained)
    model.set_weights(pretrained.get_weights())
    keras_lora.enable_lora(model, rank=args.rank, targets=["hidden_1", "hidden_2"])
    keras_lora.print_trainable_parameters(model)
    loss_lora = fit(model, task_b, args, 1e-2)
    print(f"2. enable_lora: mse B {loss_b_before:.4f} -> {loss_lora:.4f}")

    adapter = keras_lora.save_adapter(model, os.path.join(out, "task_b.adapter.keras"))
    prediction = keras.ops.convert_to_numpy(model(task_b[0][:8]))
    keras_lora.merge_lora(model)  # in place: the layers are plain Dense again
    assert not keras_lora.lora_layers(model)
    merged_path = os.path.join(out, "task_b.keras")
    model.save(merged_path)
    reloaded = keras.saving.load_model(merged_path, compile=False)  # inference
    diff = np.abs(keras.ops.convert_to_numpy(reloaded(task_b[0][:8])) - prediction)
    print(
        f"adapter: {adapter} ({os.path.getsize(adapter):,} bytes); merged model "
        f"{merged_path} ({os.path.getsize(merged_path):,} bytes), reloaded with "
        f"plain Keras, max |diff| {diff.max():.1e}"
    )
    return {
        "mse_b_before": loss_b_before,
        "mse_b_lora_dense": loss_hand,
        "mse_b_enable_lora": loss_lora,
        "reload_max_abs_diff": float(diff.max()),
    }


def _with_fresh_factors(pretrained, lora_model):
    """The pretrained weights in `lora_model`'s order, keeping its new factors."""
    weights = []
    for source, target in zip(pretrained.layers, lora_model.layers):
        values = {v.path.split("/")[-1]: v for v in source.weights}
        for variable in target.weights:
            name = variable.path.split("/")[-1]
            weights.append(
                keras.ops.convert_to_numpy(values[name])
                if name in values
                else keras.ops.convert_to_numpy(variable)
            )
    return weights


if __name__ == "__main__":
    main()
