"""`keras-lora analyze A B`: the LoRA paper's section 7 on two adapter files."""

import json

DESCRIPTION = (
    "Compares two keras-lora adapter files of the same base model (two ranks, "
    "two seeds, two tasks) as in the LoRA paper's section 7: for each layer "
    "both adapt, the subspace similarity phi of their A factors (B with "
    "--factor b) for the top direction and for all directions, next to what "
    "random subspaces give, and the effective rank of each update; with "
    "--base, the amplification factor of each update (Table 7); with --plot, "
    "phi heatmaps like Fig. 3 (needs matplotlib)."
)
EPILOG = (
    "Example: keras-lora analyze r8.adapter.keras r64.adapter.keras "
    "--base base.keras --plot phi.png"
)


def add_arguments(parser):
    parser.add_argument("a", metavar="A", help="a keras-lora adapter file")
    parser.add_argument("b", metavar="B", help="another, for the same base model")
    parser.add_argument(
        "--layer",
        action="append",
        metavar="PATH",
        help="a layer path to compare (repeatable; default: every layer both adapt)",
    )
    parser.add_argument(
        "--factor",
        choices=("a", "b"),
        default="a",
        help="compare the A factors (input side, the paper's Fig. 3) or the B "
        "factors (default: %(default)s)",
    )
    parser.add_argument(
        "--base",
        metavar="BASE",
        help="the base model (.keras, or a KerasHub preset folder) for the "
        "amplification factor",
    )
    parser.add_argument(
        "--plot", metavar="OUT.png", help="write phi heatmaps of up to 4 layers"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object, grids included"
    )


def run(args):
    from keras_lora.commands.common import existing_file

    for path, name in ((args.a, "A"), (args.b, "B")):
        existing_file(path, f"Adapter file {name}")
    result = analyze(args.a, args.b, args.layer, args.factor, args.base)
    if args.plot:
        from keras_lora.analysis import plot_similarity

        plot_similarity(_panels(result), args.plot, title=_title(result))
        result["plot"] = args.plot
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_text(result))


def analyze(file_a, file_b, layers=None, factor="a", base=None):
    """The measures of `keras-lora analyze`, as a JSON-able dict."""
    import numpy as np

    from keras_lora import analysis
    from keras_lora.analysis import sources
    from keras_lora.analysis.spectrum import update_svd

    factors_a = sources.all_factors(file_a)
    factors_b = sources.all_factors(file_b)
    shared = [path for path in factors_a if path in factors_b]
    if layers:
        missing = [p for p in layers if p not in shared]
        if missing:
            raise ValueError(
                f"--layer {missing[0]!r} is not adapted in both files. Layers both "
                f"adapt: {shared[:8]}"
            )
        shared = [p for p in shared if p in layers]
    if not shared:
        raise ValueError(
            f"{file_a!r} and {file_b!r} adapt no layer in common: "
            f"{list(factors_a)[:4]} vs {list(factors_b)[:4]}"
        )
    if base is not None:
        from keras_lora.commands.common import load_base

        base = load_base(base)
    rows = []
    for path in shared:
        fa, fb = factors_a[path], factors_b[path]
        pick = (lambda f: f.a) if factor == "a" else (lambda f: f.b.T)  # noqa: E731
        grid = analysis.subspace_similarity(pick(fa), pick(fb))
        features, ra, rb = pick(fa).shape[0], grid.shape[0], grid.shape[1]
        row = {
            "layer": path,
            "rank_a": ra,
            "rank_b": rb,
            "features": features,
            "phi_top": float(grid[0, 0]),
            "phi_all": float(grid[-1, -1]),
            "chance_top": 1 / features,
            "chance_all": max(ra, rb) / features,
            "effective_rank_a": analysis.effective_rank(update_svd(fa)[1]),
            "effective_rank_b": analysis.effective_rank(update_svd(fb)[1]),
            "grid": np.round(grid, 6).tolist(),
        }
        if base is not None:
            for name, file in (("a", file_a), ("b", file_b)):
                measures = analysis.amplification_factor(file, path, base=base)
                row[f"amplification_{name}"] = measures["amplification"]
        rows.append(row)
    return {"a": file_a, "b": file_b, "factor": factor, "layers": rows}


def format_text(result):
    rows = result["layers"]
    width = max(len(r["layer"]) for r in rows)
    amplification = "amplification_a" in rows[0]
    header = (
        f"{'layer':<{width}}  rank A/B  phi(1,1) [chance]  phi(all) [chance]  "
        "eff. rank A/B" + ("  amplification A/B" if amplification else "")
    )
    lines = [
        f"A: {result['a']}",
        f"B: {result['b']}",
        f"subspace similarity of the {result['factor'].upper()} factors "
        "(1: same subspace, 0: orthogonal; chance: random subspaces)",
        header,
    ]
    for r in rows:
        line = (
            f"{r['layer']:<{width}}  {r['rank_a']:>3}/{r['rank_b']:<4} "
            f"{r['phi_top']:>8.3f} [{r['chance_top']:.3f}]  "
            f"{r['phi_all']:>8.3f} [{r['chance_all']:.3f}]  "
            f"{r['effective_rank_a']:>5.1f}/{r['effective_rank_b']:<5.1f}"
        )
        if amplification:
            line += f"  {r['amplification_a']:>8.2f}/{r['amplification_b']:.2f}"
        lines.append(line)
    top = sum(r["phi_top"] for r in rows) / len(rows)
    lines.append(f"mean phi(1,1) over {len(rows)} layers: {top:.3f}")
    if "plot" in result:
        lines.append(f"heatmaps: {result['plot']}")
    return "\n".join(lines)


def _panels(result):
    """Up to 4 layers, evenly spaced from first to last (the paper's Fig. 3)."""
    rows = result["layers"]
    count = min(4, len(rows))
    picks = sorted(
        {round(k * (len(rows) - 1) / max(count - 1, 1)) for k in range(count)}
    )
    return {"/".join(rows[k]["layer"].split("/")[-2:]): rows[k]["grid"] for k in picks}


def _title(result):
    factor = result["factor"].upper()
    return f"φ(i, j) of the {factor} factors: A (rows i) vs B (columns j)"
