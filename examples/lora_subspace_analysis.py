"""The LoRA paper's section 7 on a real model, offline: all-MiniLM-L6-v2.

Trains the sentiment task of `text_classification_minilm.py` (the same
pretrained 6-layer BERT, the same data) with LoRA on W_q and W_v three times,
as the paper does with GPT-3 (Hu et al., 2021, §7):

- r=8 and r=64 from the same seed: does the r=8 update's top direction lie in
  the r=64 update's subspace? (Fig. 3: φ(A_{r=8}, A_{r=64}, i, j))
- r=8 from two seeds (Fig. 4, which uses r=64): what do two runs share?
- how ΔW relates to W: the amplification factor ‖ΔW‖_F / ‖UᵀWV‖_F
  (Table 7, with W's own top directions and random ones as controls).

It writes PNG figures, `results.json` and `results.md` into `--out` (default
`./lora-subspace-analysis/`). docs/analysis.md shows a run and compares it
with the paper's numbers.

    python examples/lora_subspace_analysis.py                # ~10 min on 2 CPU cores
    python examples/lora_subspace_analysis.py --smoke        # a run-through
"""

import argparse
import json
import os
import sys
import tempfile
import time

# `task`, below: the task, data, model and training loop of the MiniLM
# example (which also quiets TensorFlow's logs before KerasHub imports it).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import text_classification_minilm as task  # noqa: E402

import keras_lora  # noqa: E402
from keras_lora import analysis  # noqa: E402
from keras_lora.analysis.sources import all_factors  # noqa: E402
from keras_lora.analysis.spectrum import update_svd  # noqa: E402

OUT = "lora-subspace-analysis"
# (name, rank, seed): the three adapters the comparisons need.
RUNS = (("r8_seed0", 8, 0), ("r64_seed0", 64, 0), ("r8_seed1", 8, 1))
# The paper's Table 7 (GPT-3 175B, layer 48, W_q): ‖UᵀW_qVᵀ‖_F with U, V from
# ΔW_q, from W_q itself and random; ‖W_q‖_F; ‖ΔW_q‖_F.
PAPER_TABLE_7 = {
    4: dict(delta=0.32, kernel_top=21.67, random=0.02, kernel=61.95, delta_norm=6.91),
    64: dict(delta=1.90, kernel_top=37.71, random=0.33, kernel=61.95, delta_norm=3.57),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="The LoRA paper's section 7 (subspace similarity, "
        "amplification factor) on all-MiniLM-L6-v2 LoRA adapters, offline."
    )
    parser.add_argument("--train-size", type=int, default=480)
    parser.add_argument("--test-size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=24)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument(
        "--out",
        help=f"output folder (default: ./{OUT}; with --smoke, a temporary "
        "folder removed at the end)",
    )
    parser.add_argument("--verbose", type=int, default=2, help="fit's verbose")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny run-through (tests): a 2-block BERT with random weights "
        "instead of MiniLM, 8 examples, 1 step",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_size, args.test_size, args.epochs = 8, 8, 1
        args.batch_size, args.sequence_length, args.verbose = 8, 8, 0
    return args


def build_model(args, model_dir):
    """MiniLM as a classifier; with --smoke, a tiny BERT with its tokenizer."""
    if not args.smoke:
        return task.build_classifier(model_dir, args.sequence_length)
    import keras_hub

    tokenizer = keras_hub.models.BertTokenizer.from_preset(model_dir)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_heads=2,
        hidden_dim=64,  # rank 64 still fits
        intermediate_dim=128,
        max_sequence_length=args.sequence_length,
    )
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=args.sequence_length
    )
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=2, preprocessor=preprocessor
    )


def train_adapter(args, model_dir, data, name, rank, seed, out):
    """Trains one LoRA run; returns its adapter file and per-layer measures."""
    keras.utils.set_random_seed(seed)
    model = build_model(args, model_dir)
    keras_lora.enable_lora(model, rank=rank, train_layers=["logits"])
    initial = {p: f.a.copy() for p, f in all_factors(model).items()}
    accuracy, seconds, losses = task.train_and_test(
        model, *data, args, args.learning_rate
    )
    print(f"{name}: test accuracy {accuracy:.3f}, {seconds:.0f} s, loss {losses}")
    path = keras_lora.save_adapter(model, os.path.join(out, f"{name}.adapter.keras"))
    layers = {}
    for layer_path, factors in all_factors(model).items():
        measures = analysis.amplification_factor(model, layer_path)
        # How far training moved A from its random start (B starts at zero).
        moved = np.linalg.norm(factors.a - initial[layer_path])
        measures["a_change"] = float(moved / np.linalg.norm(initial[layer_path]))
        values = update_svd(factors)[1]
        measures["spectrum"] = values.tolist()
        measures["effective_rank"] = analysis.effective_rank(values)
        layers[layer_path] = measures
    return path, {"accuracy": accuracy, "seconds": seconds, "layers": layers}


def update_directions(file):
    """{path: ΔW's input-side singular directions, scaled by their values}."""
    result = {}
    for path, factors in all_factors(file).items():
        u, s, _ = update_svd(factors)
        result[path] = u * s
    return result


def compare(file_1, file_2):
    """φ grids of A (the paper's measure) and of ΔW's input directions."""
    delta_1, delta_2 = update_directions(file_1), update_directions(file_2)
    return {
        path: {
            "a": analysis.subspace_similarity((file_1, path), (file_2, path)),
            "delta": analysis.subspace_similarity(delta_1[path], delta_2[path]),
        }
        for path in delta_1
    }


def kind(path):
    return "query" if path.endswith("query") else "value"


def block(path):
    return int(path.split("transformer_layer_")[1].split("/")[0])


def figures(grids, name, out, title, zoom=None):
    """One heatmap row per projection (query, value): 4 of the 6 blocks."""
    written = []
    for projection in ("query", "value"):
        paths = sorted((p for p in grids if kind(p) == projection), key=block)
        picks = [paths[k] for k in sorted({0, len(paths) // 3, 2 * len(paths) // 3})]
        picks.append(paths[-1])
        panels = {}
        for path in dict.fromkeys(picks):
            grid = grids[path]["a"]
            if zoom:
                grid = grid[:zoom, :zoom]
            panels[f"block {block(path)} W_{projection[0]}"] = grid
        file = os.path.join(out, f"{name}_{projection}.png")
        analysis.plot_similarity(panels, file, title=f"{title}, W_{projection[0]}")
        written.append(file)
    return written


def summary_rows(grids):
    rows = []
    for path in sorted(grids, key=lambda p: (kind(p), block(p))):
        a, delta = grids[path]["a"], grids[path]["delta"]
        rows.append(
            {
                "layer": f"block {block(path)} W_{kind(path)[0]}",
                "phi_a_top": float(a[0, 0]),
                "phi_a_top8": float(a[min(7, a.shape[0] - 1), min(7, a.shape[1] - 1)]),
                "phi_delta_top": float(delta[0, 0]),
                "phi_delta_all": float(delta[-1, -1]),
            }
        )
    return rows


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix=f"{OUT}-") as temporary:
        out = args.out or (temporary if args.smoke else OUT)
        os.makedirs(out, exist_ok=True)
        return run(args, out)


def run(args, out):
    start = time.time()
    model_dir = task.minilm_dir()
    data = task.build_dataset(args.train_size, args.test_size)
    print(f"backend: {keras.backend.backend()}; {len(data[0])} training sentences")
    files, runs = {}, {}
    for name, rank, seed in RUNS:
        files[name], runs[name] = train_adapter(
            args, model_dir, data, name, rank, seed, out
        )
    ranks = compare(files["r8_seed0"], files["r64_seed0"])
    seeds = compare(files["r8_seed0"], files["r8_seed1"])
    written = figures(ranks, "phi_r8_r64", out, "φ(A_r=8, A_r=64, i, j)")
    written += figures(seeds, "phi_seeds", out, "φ(A_r=8 seed 0, A_r=8 seed 1, i, j)")
    layers = runs["r64_seed0"]["layers"]
    spectra = {
        f"block {block(p)} W_{kind(p)[0]}": layers[p]["spectrum"]
        for p in sorted(layers, key=lambda p: (kind(p), block(p)))
    }
    written.append(
        analysis.plot_spectrum(
            spectra,
            os.path.join(out, "spectrum_r64.png"),
            title="singular values of ΔW, r=64",
        )
    )
    features = next(iter(all_factors(files["r8_seed0"]).values())).a.shape[0]
    results = {
        "backend": keras.backend.backend(),
        "args": {k: v for k, v in vars(args).items()},
        "features": features,
        "runs": runs,
        "r8_vs_r64": summary_rows(ranks),
        "r8_seed0_vs_seed1": summary_rows(seeds),
        "figures": [os.path.basename(f) for f in written],
        "seconds": time.time() - start,
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    report = format_report(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report)
    print(report)
    return results


def format_report(results):
    lines = [
        f"backend {results['backend']}, {results['seconds']:.0f} s; chance level "
        f"of φ(1,1) for d={results['features']}: {1 / results['features']:.4f}",
        "",
        "| run | test accuracy |",
        "|---|---|",
    ]
    for name, run in results["runs"].items():
        lines.append(f"| {name} | {run['accuracy']:.3f} |")
    for title, key in (
        ("r=8 vs r=64 (same seed)", "r8_vs_r64"),
        ("r=8 seed 0 vs r=8 seed 1", "r8_seed0_vs_seed1"),
    ):
        lines += [
            "",
            f"**{title}**",
            "",
            "| layer | φ(A) i=j=1 | φ(A) i=j=8 | φ(ΔW dirs) i=j=1 | φ(ΔW dirs) all |",
            "|---|---|---|---|---|",
        ]
        for row in results[key]:
            lines.append(
                f"| {row['layer']} | {row['phi_a_top']:.3f} | {row['phi_a_top8']:.3f} "
                f"| {row['phi_delta_top']:.3f} | {row['phi_delta_all']:.3f} |"
            )
    lines += [
        "",
        "**Amplification (Table 7), mean over the blocks**",
        "",
        "| run | W | ‖ΔW‖_F | ‖UᵀWV‖_F (ΔW dirs) | (W's top dirs) | (random) "
        "| ‖W‖_F | amplification | eff. rank of ΔW | A moved |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("r8_seed0", "r64_seed0"):
        for projection in ("query", "value"):
            chosen = [
                m
                for p, m in results["runs"][name]["layers"].items()
                if kind(p) == projection
            ]

            def mean(key, chosen=chosen):
                return np.mean([m[key] for m in chosen])

            lines.append(
                f"| {name} | W_{projection[0]} | {mean('delta_norm'):.3f} | "
                f"{mean('projection_norm'):.3f} | "
                f"{mean('kernel_top_projection_norm'):.2f} | "
                f"{mean('random_projection_norm'):.3f} | {mean('kernel_norm'):.2f} | "
                f"{mean('amplification'):.2f} | {mean('effective_rank'):.1f} | "
                f"{mean('a_change'):.2f} |"
            )
    for rank, paper in PAPER_TABLE_7.items():
        lines.append(
            f"| paper r={rank} (GPT-3) | W_q | {paper['delta_norm']} | "
            f"{paper['delta']} | {paper['kernel_top']} | {paper['random']} | "
            f"{paper['kernel']} | {paper['delta_norm'] / paper['delta']:.1f} | | |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
