"""GPT-2 causal LM with LoRA: `enable_lora`, `fit` on text, `generate`, `MergeLoRA`.

The usual KerasHub workflow, plus three keras-lora calls:

    model = keras_hub.models.GPT2CausalLM.from_preset("gpt2_base_en")
    keras_lora.enable_lora(model, rank=8)           # q/v of every block
    model.fit(texts, epochs=..., callbacks=[keras_lora.MergeLoRA("merged.keras")])
    model.generate("...")                           # with the adapter
    keras.saving.load_model("merged.keras")         # plain Keras, no keras-lora

With `--preset NAME_OR_DIR` it starts from a KerasHub preset (a name needs
the preset in the Kaggle cache or network). By default it works offline: a
small GPT-2 is built from a config with a tokenizer learnt from keras-lora's
demo texts and, standing in for pretrained weights, first trained briefly on
the sea text; LoRA then adapts it to the lighthouse log (what
`keras-lora demo` does, in fewer lines and with raw strings through the
model's own preprocessor).

Files go to `--out` (default `./gpt2-lora/`; with `--smoke`, a temporary
folder that is removed at the end).

    python examples/gpt2_causal_lm.py
    python examples/gpt2_causal_lm.py --smoke
    python examples/gpt2_causal_lm.py --quantize int8    # QLoRA-style
    KERAS_BACKEND=tensorflow python examples/gpt2_causal_lm.py --preset ./my_gpt2_preset
"""

import argparse
import os
import re
import tempfile

from keras_lora.quiet import quiet_third_party_logs

quiet_third_party_logs()  # an application: before KerasHub imports TensorFlow

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_lora  # noqa: E402
from keras_lora import demo_data  # noqa: E402

OUT = "gpt2-lora"


def small_gpt2(sequence_length):
    """A small GPT2CausalLM from a config, with a tokenizer built offline."""
    import keras_hub

    texts = [demo_data.read_text(name) for name in demo_data.TEXTS]
    tokenizer = demo_data.build_tokenizer(texts)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        intermediate_dim=256,
        max_sequence_length=128,
    )
    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length
    )
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor)


def examples(name, split, repeat):
    """A packaged text as training strings: its sentences or its lines.

    The texts are short, so each epoch sees them `repeat` times (fewer, longer
    epochs: less per-epoch overhead).
    """
    text = demo_data.read_text(name)
    if split == "sentences":
        parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    else:
        parts = [line for line in text.splitlines() if line.strip()]
    return parts * repeat


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="GPT-2 causal LM with LoRA: fit on text, generate, export the "
        "merged model with the MergeLoRA callback. Offline by default. The "
        "backend is KERAS_BACKEND's (jax, torch or tensorflow)."
    )
    parser.add_argument("--preset", help="KerasHub preset name or folder")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=12, help="LoRA epochs")
    parser.add_argument(
        "--pretrain-epochs",
        type=int,
        default=10,
        help="epochs on the sea text for the small model (ignored with --preset)",
    )
    parser.add_argument("--sequence-length", type=int, default=48)
    parser.add_argument("--prompt", default="Monday. Wind")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument(
        "--out",
        help=f"output folder (default: ./{OUT}; with --smoke, a temporary "
        "folder removed at the end)",
    )
    parser.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        help="QLoRA-style: quantize the base first (the factors stay float32; "
        "the merged file is re-quantized the same way)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny run (tests)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.pretrain_epochs, args.max_length = 1, 0, 10
    return args


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix=f"{OUT}-") as temporary:
        return run(args, args.out or (temporary if args.smoke else OUT))


def run(args, out):
    os.makedirs(out, exist_ok=True)
    keras.utils.set_random_seed(0)
    print(f"backend: {keras.backend.backend()}")

    if args.preset:
        import keras_hub

        model = keras_hub.models.GPT2CausalLM.from_preset(args.preset)
        model.preprocessor.sequence_length = args.sequence_length
    else:
        model = small_gpt2(args.sequence_length)
        model.compile(optimizer=keras.optimizers.Adam(3e-3), sampler="greedy")
    if not args.preset and args.pretrain_epochs:
        # Stand-in for pretrained weights: every weight trains on the sea text.
        model.fit(
            examples(demo_data.BASE_TEXT, "sentences", repeat=4),
            epochs=args.pretrain_epochs,
            batch_size=8,
            shuffle=False,  # KerasHub feeds tf.data, which ignores it (warning)
            verbose=0,
        )
    if args.quantize:
        # The frozen base in int8/int4 (Keras's own quantization), then LoRA.
        model.backbone.quantize(args.quantize)
    model.compile(sampler="greedy")
    before = model.generate(args.prompt, max_length=args.max_length)

    # LoRA: freeze the model, add rank-r factors to the attention q/v.
    keras_lora.enable_lora(model, rank=args.rank)
    trainable, total, adapted = keras_lora.trainable_summary(model)
    print(
        f"LoRA on {len(adapted)} layers: {trainable:,} of {total:,} params train "
        f"({100 * trainable / total:.2f}%)"
    )
    merged_path = os.path.join(out, "gpt2-lora-merged.keras")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), sampler="greedy")
    lines = examples(demo_data.TARGET_TEXT, "lines", repeat=1)
    loss_before = _loss(model, lines)  # the base model's: LoRA starts at ΔW = 0
    model.fit(
        lines * 8,  # raw strings, each line 8 times per epoch
        epochs=args.epochs,
        batch_size=8,
        shuffle=False,  # as above
        verbose=0 if args.smoke else 2,
        # Export when fit ends; a quantized base stays quantized in the file.
        callbacks=[
            keras_lora.MergeLoRA(
                merged_path, quantize="same" if args.quantize else None
            )
        ],
    )
    loss_after = _loss(model, lines)
    after = model.generate(args.prompt, max_length=args.max_length)
    adapter_path = keras_lora.save_adapter(model, os.path.join(out, "adapter.keras"))

    # The merged model is a plain GPT2CausalLM (tokenizer included).
    merged = keras.saving.load_model(merged_path)
    merged.compile(sampler="greedy")
    reloaded = merged.generate(args.prompt, max_length=args.max_length)
    probe = model.preprocessor.generate_preprocess([args.prompt])
    probe = {k: keras.ops.convert_to_numpy(v) for k, v in probe.items()}
    diff = np.abs(
        keras.ops.convert_to_numpy(model(probe))
        - keras.ops.convert_to_numpy(merged(probe))
    ).max()

    epochs = f"{args.epochs} epoch{'' if args.epochs == 1 else 's'}"
    print(
        f"loss on {demo_data.TARGET_TEXT} (evaluate): {loss_before:.3f} before "
        f"LoRA, {loss_after:.3f} after {epochs}"
    )
    print(f"before LoRA:      {_one_line(before)}")
    print(f"after LoRA:       {_one_line(after)}")
    print(f"merged, reloaded: {_one_line(reloaded)}  (max |diff| {diff:.1e})")
    print(
        f"adapter {adapter_path}: {os.path.getsize(adapter_path) / 1024:.0f} KB; "
        f"merged {merged_path}: {os.path.getsize(merged_path) / 1024:.0f} KB"
    )
    return {
        "loss_before": loss_before,
        "loss_after": loss_after,
        "before": before,
        "after": after,
        "reloaded": reloaded,
        "max_abs_diff": float(diff),
    }


def _loss(model, texts):
    return model.evaluate(texts, batch_size=8, verbose=0, return_dict=True)["loss"]


def _one_line(text):
    return " ".join(str(text).replace("\ufffd", "").split())


if __name__ == "__main__":
    main()
