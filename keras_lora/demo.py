"""`keras-lora demo`: LoRA end to end on a small GPT-2, offline, in about a minute.

1. Base model: a small KerasHub `GPT2CausalLM` built from a config, with a
   tokenizer learnt from the packaged texts, pre-trained (all weights) on
   `demo_base.txt`, plain prose about the sea; or a KerasHub preset
   (`--preset`), used as it is.
2. `enable_lora` adapts it to `demo_target.txt`, a lighthouse keeper's log:
   only LoRA factors train, on every Dense/EinsumDense layer by default
   (`--targets all-linear`) or on the attention query/value projections
   only (`--targets qv`, `enable_lora`'s own default); every base weight
   stays frozen.
3. It writes the adapter (`save_adapter`) and the merged model
   (`export_merged`), reloads the merged model with plain Keras, loads the
   adapter onto a fresh copy of the base, and checks that all three agree.

Everything measured goes to `report.json` and `report.md` in the output folder.
The demo is an application: importing it hides TensorFlow's C++ start-up logs
(`keras_lora.quiet`), unless `TF_CPP_MIN_LOG_LEVEL` is set.
"""

import contextlib
import json
import math
import os
import time
import warnings
import zipfile

from keras_lora.quiet import quiet_third_party_logs

quiet_third_party_logs()  # before Keras, and KerasHub's TensorFlow, load

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_lora  # noqa: E402
from keras_lora import demo_data  # noqa: E402

DEFAULTS = dict(
    out="keras-lora-demo",
    epochs=80,
    pretrain_epochs=60,
    rank=8,
    targets="all-linear",
    sequence_length=32,
    sample_length=40,
    prompt="Monday.",
    seed=0,
    quantize=None,
)
TARGETS = {"all-linear": "all-linear", "qv": None}  # --targets -> enable_lora
# The base model built from a config (ignored with --preset).
MODEL_CONFIG = dict(
    num_layers=2,
    num_heads=2,
    hidden_dim=64,
    intermediate_dim=256,
    max_sequence_length=128,
)
BATCH_SIZE = 8
TOLERANCE = 1e-4


class Progress(keras.callbacks.Callback):
    """One line every few epochs: stage, epoch, loss, elapsed time."""

    def __init__(self, stage, epochs, print_fn, lines=8):
        super().__init__()
        self.stage, self.epochs, self.print_fn = stage, epochs, print_fn
        self.every = max(1, math.ceil(epochs / lines))
        self.start = None

    def on_train_begin(self, logs=None):
        self.start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if done % self.every == 0 or done == self.epochs or done == 1:
            self.print_fn(
                f"  [{self.stage}] epoch {done:>3}/{self.epochs}  "
                f"loss {logs['loss']:.3f}  ({time.time() - self.start:.0f} s)"
            )


@contextlib.contextmanager
def _token_ids_only(model):
    """Trains and predicts on token ids: the task's preprocessor is put aside."""
    preprocessor = model.preprocessor
    model.preprocessor = None
    try:
        yield
    finally:
        model.preprocessor = preprocessor


@contextlib.contextmanager
def _quiet_loading():
    """Hides Keras's optimizer warnings when loading files saved without one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*optimizer.*")
        warnings.filterwarnings("ignore", message=".*compile.*")
        yield


def _compile(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        sampler="greedy",
    )


def _fit(model, data, epochs, stage, print_fn):
    x, y = data
    with _token_ids_only(model):
        model.fit(
            x,
            y,
            epochs=epochs,
            batch_size=BATCH_SIZE,
            shuffle=False,  # KerasHub feeds tf.data, which ignores it (warning)
            verbose=0,
            callbacks=[Progress(stage, epochs, print_fn)],
        )


def _logits(model, x):
    """Logits for all windows in one batch (one compiled shape)."""
    with _token_ids_only(model):
        logits = model.predict(x, batch_size=len(x["token_ids"]), verbose=0)
    return np.asarray(logits, dtype="float32")


def _mean_loss(logits, y):
    """Mean next-token cross-entropy (nats) from logits, in float64."""
    logits = logits.astype("float64")
    logits -= logits.max(axis=-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return float(-np.take_along_axis(log_probs, y[..., None], axis=-1).mean())


def _generate(model, prompt, length):
    text = model.generate(prompt, max_length=length)
    # A tiny model can end on half a UTF-8 character: drop the "\ufffd".
    return " ".join(str(text).replace("\ufffd", "").split())


def _build_base(args, print_fn):
    """(model, tokenizer, description) of the base model, before LoRA."""
    import keras_hub

    if args.preset:
        print_fn(f"Loading the preset {args.preset!r} ...")
        model = keras_hub.models.CausalLM.from_preset(args.preset)
        if model.preprocessor is None:
            raise ValueError(
                f"Preset {args.preset!r} has no preprocessor: the demo needs "
                "its tokenizer to read and generate text."
            )
        model.preprocessor.sequence_length = args.sequence_length
        return model, model.preprocessor.tokenizer, f"preset {args.preset}"
    texts = [demo_data.read_text(name) for name in demo_data.TEXTS]
    tokenizer = demo_data.build_tokenizer(texts)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(), **MODEL_CONFIG
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=args.sequence_length
    )
    model = keras_hub.models.GPT2CausalLM(backbone, preprocessor)
    config = ", ".join(f"{k}={v}" for k, v in MODEL_CONFIG.items())
    return model, tokenizer, f"small GPT-2 built from a config ({config})"


def _one_torch_thread():
    """Runs torch on one thread: the small model's ops gain nothing from more,
    and on a busy machine extra threads can make a step 10x slower."""
    if keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(1)


def _has_lora_names(path):
    with zipfile.ZipFile(path) as archive:
        config = archive.read("config.json").decode("utf-8")
    return "LoRA" in config or "keras_lora" in config


def run(args, print_fn=print):
    """Runs the demo; returns the report as a dict (also written to `args.out`)."""
    started = time.time()
    out = args.out
    os.makedirs(out, exist_ok=True)
    keras.utils.set_random_seed(args.seed)
    backend = keras.backend.backend()
    print_fn(f"keras-lora demo on the {backend} backend (Keras {keras.__version__})")
    if not args.preset:
        _one_torch_thread()

    model, tokenizer, source = _build_base(args, print_fn)
    base_ids = demo_data.tokenize(tokenizer, demo_data.read_text(demo_data.BASE_TEXT))
    target_text = demo_data.read_text(demo_data.TARGET_TEXT)
    target_ids = demo_data.tokenize(tokenizer, target_text)
    target = demo_data.windows(target_ids, args.sequence_length, BATCH_SIZE)
    base_path = os.path.join(out, "base.keras")

    if args.preset:
        print_fn("1/4 Base model: the preset as loaded (no pre-training)")
    else:
        base = demo_data.windows(base_ids, args.sequence_length, BATCH_SIZE)
        print_fn(
            f"1/4 Pre-training the base model (all weights) on "
            f"{demo_data.BASE_TEXT} ({len(base_ids)} tokens), "
            f"{args.pretrain_epochs} epochs"
        )
        if args.pretrain_epochs:
            _compile(model, 3e-3)
            _fit(model, base, args.pretrain_epochs, "pretrain", print_fn)
    _compile(model, 1e-3)  # a fresh optimizer: base.keras carries no Adam state
    if not args.preset:
        model.save(base_path)
    quantize = getattr(args, "quantize", None)
    quantization_error = 0.0
    if quantize:
        float_logits = _logits(model, target[0])
        weight_bytes = _weight_bytes(model)
        print_fn(f"  model.quantize({quantize!r}): LoRA on a quantized base (QLoRA)")
        _quantize(model, quantize)
        _compile(model, 1e-3)
        # What quantizing alone changes: the yardstick for the merged export,
        # which is re-quantized after W + s·A·B is folded in.
        quantization_error = float(
            np.abs(_logits(model, target[0]) - float_logits).max()
        )
        weight_ratio = _weight_bytes(model) / weight_bytes
    loss_before = _mean_loss(_logits(model, target[0]), target[1])
    sample_before = _generate(model, args.prompt, args.sample_length)

    targets = TARGETS[args.targets]
    print_fn(
        f"2/4 enable_lora(rank={args.rank}, targets={targets!r}), then fit on "
        f"{demo_data.TARGET_TEXT} ({len(target_ids)} tokens), {args.epochs} epochs"
    )
    keras_lora.enable_lora(model, rank=args.rank, targets=targets)
    trainable, total, adapted = keras_lora.trainable_summary(model)
    print_fn(
        f"  trainable params: {trainable:,} of {total:,} "
        f"({100 * trainable / total:.2f}%) in {len(adapted)} adapted layers"
    )
    _compile(model, 1e-2)
    train_start = time.time()
    _fit(model, target, args.epochs, "lora", print_fn)
    train_seconds = time.time() - train_start
    expected = _logits(model, target[0])
    loss_after = _mean_loss(expected, target[1])
    sample_after = _generate(model, args.prompt, args.sample_length)

    print_fn("3/4 save_adapter and export_merged")
    adapter_path = keras_lora.save_adapter(model, os.path.join(out, "adapter.keras"))
    merged_path = keras_lora.export_merged(
        model,
        os.path.join(out, "merged.keras"),
        quantize="same" if quantize else None,
    )

    print_fn(
        "4/4 Reloading merged.keras with plain keras.saving.load_model, and "
        "adapter.keras onto a fresh copy of the base"
    )
    with _quiet_loading():
        merged = keras.saving.load_model(merged_path, compile=False)
    merged_diff = float(np.abs(_logits(merged, target[0]) - expected).max())
    with _quiet_loading():
        if args.preset:
            import keras_hub

            fresh = keras_hub.models.CausalLM.from_preset(args.preset)
        else:
            fresh = keras.saving.load_model(base_path, compile=False)
    if quantize:
        _quantize(fresh, quantize)  # the same base: quantizing is deterministic
    keras_lora.load_adapter(fresh, adapter_path)
    adapter_diff = float(np.abs(_logits(fresh, target[0]) - expected).max())

    report = {
        "backend": backend,
        "keras_version": keras.__version__,
        "keras_lora_version": keras_lora.__version__,
        "model": source,
        "rank": args.rank,
        "targets": args.targets,
        "epochs": args.epochs,
        "pretrain_epochs": 0 if args.preset else args.pretrain_epochs,
        "trainable_params": int(trainable),
        "total_params": int(total),
        "trainable_percent": 100 * trainable / total,
        "adapted_layers": adapted,
        "target_loss_before": loss_before,
        "target_loss_after": loss_after,
        "target_perplexity_before": math.exp(loss_before),
        "target_perplexity_after": math.exp(loss_after),
        "prompt": args.prompt,
        "sample_before": sample_before,
        "sample_after": sample_after,
        "adapter_file": adapter_path,
        "adapter_bytes": os.path.getsize(adapter_path),
        "merged_file": merged_path,
        "merged_bytes": os.path.getsize(merged_path),
        "merged_has_no_lora_names": not _has_lora_names(merged_path),
        "merged_reload_max_abs_diff": merged_diff,
        "adapter_reload_max_abs_diff": adapter_diff,
        "quantize": quantize,
        "quantization_max_abs_diff": quantization_error,
        "quantized_weight_ratio": weight_ratio if quantize else None,
        # A re-quantized merge differs from the live model by about what
        # quantizing the base did: within twice that counts as the same.
        "merged_tolerance": TOLERANCE + 2 * quantization_error,
        "merged_matches": merged_diff < TOLERANCE + 2 * quantization_error,
        "adapter_matches": adapter_diff < TOLERANCE,
        "lora_train_seconds": train_seconds,
        "total_seconds": time.time() - started,
    }
    markdown = format_report(report)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown)
    print_fn("")
    print_fn(markdown)
    return report


def _quantize(model, mode):
    """`model.quantize(mode)` on the backbone (a task's preprocessor has no
    weights to quantize), without Keras's warning for each layer that has
    none either."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have a `quantize`")
        getattr(model, "backbone", model).quantize(mode)


def _weight_bytes(model):
    return sum(
        math.prod(v.shape) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
        for v in model.weights
    )


def _size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def format_report(r):
    """The report as Markdown (also what the demo prints at the end)."""
    ok = {True: "yes", False: "NO"}
    where = {"all-linear": "every Dense/EinsumDense", "qv": "attention query/value"}
    lines = [
        f"# keras-lora demo report: {r['backend']} backend",
        "",
        f"- base model: {r['model']}"
        + (
            f", pre-trained {r['pretrain_epochs']} epochs on {demo_data.BASE_TEXT}"
            if r["pretrain_epochs"]
            else ""
        ),
        f"- target text: {demo_data.TARGET_TEXT}",
        f"- Keras {r['keras_version']}, keras-lora {r['keras_lora_version']}, "
        f"KERAS_BACKEND={r['backend']}",
        f"- LoRA: rank {r['rank']} on {len(r['adapted_layers'])} layers "
        f"({where.get(r['targets'], r['targets'])})",
        *(
            [
                f"- base quantized with `model.quantize({r['quantize']!r})`: weights "
                f"{r['quantized_weight_ratio']:.2f}x their float size; logits moved "
                f"by at most {r['quantization_max_abs_diff']:.2e}"
            ]
            if r.get("quantize")
            else []
        ),
        f"- trainable params: {r['trainable_params']:,} of {r['total_params']:,} "
        f"({r['trainable_percent']:.2f}%)",
        f"- loss on the target text: {r['target_loss_before']:.3f} -> "
        f"{r['target_loss_after']:.3f}, perplexity "
        f"{r['target_perplexity_before']:,.1f} -> "
        f"{r['target_perplexity_after']:,.1f} ({r['epochs']} epochs, "
        f"{r['lora_train_seconds']:.0f} s)",
        f"- adapter file: {_size(r['adapter_bytes'])} "
        f"({os.path.basename(r['adapter_file'])}); merged full model: "
        f"{_size(r['merged_bytes'])} ({os.path.basename(r['merged_file'])}), "
        f"{r['merged_bytes'] / r['adapter_bytes']:.0f}x the adapter",
        f"- merged model reloaded with plain `keras.saving.load_model`: "
        f"same outputs: {ok[r['merged_matches']]} (max |diff| "
        f"{r['merged_reload_max_abs_diff']:.1e}"
        + (
            f", re-quantized: within {r['merged_tolerance']:.1e}"
            if r.get("quantize")
            else ""
        )
        + "); no LoRA layer or name in it: "
        f"{ok[r['merged_has_no_lora_names']]}",
        f"- adapter loaded onto a fresh copy of the base: same outputs: "
        f"{ok[r['adapter_matches']]} (max |diff| "
        f"{r['adapter_reload_max_abs_diff']:.1e})",
        f"- total time: {r['total_seconds']:.0f} s",
        "",
        f"Greedy samples for the prompt {r['prompt']!r}:",
        "",
        f"- before LoRA: {r['sample_before']}",
        f"- after LoRA:  {r['sample_after']}",
        "",
    ]
    return "\n".join(lines)
