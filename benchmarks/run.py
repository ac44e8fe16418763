"""Benchmarks keras-lora against Keras's built-in LoRA and full fine-tuning.

Usage (one backend per run, chosen by KERAS_BACKEND):

    KERAS_BACKEND=jax python benchmarks/run.py [--tiny] [--rounds N] [--steps N]
        [--sections train,inference,memory,files,large] [--json PATH]

Prints a table of ratios (each the ratio of two medians measured side by side,
in interleaved rounds, in this one run) and writes every raw figure as JSON
(default: benchmarks/results/<backend>.json). See docs/benchmarks.md.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import device  # noqa: E402

SECTIONS = ("train", "inference", "memory", "files", "large")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="tiny model and few rounds (a smoke test)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds (default 9; tiny: 2)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per variant per round (default 1; tiny: 1)",
    )
    parser.add_argument(
        "--dropout",
        type=float,
        default=0.1,
        help="backbone dropout (GPT-2's 0.1 by default)",
    )
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated training variants (default: all)",
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    parser.add_argument("--json", default=None, help="where to write the results")
    device.add_torch_threads_argument(parser)
    parser.add_argument(
        "--no-jit",
        action="store_true",
        help="jit_compile=False (smoke tests only: not the benchmark)",
    )
    # Internal: one memory-measurement child process.
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config", default="default", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def machine():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import keras

    versions = {"python": platform.python_version(), "keras": keras.__version__}
    for module in ("keras_hub", "jax", "torch", "tensorflow"):
        if module in sys.modules or module == "keras_hub":
            try:
                versions[module] = __import__(module).__version__
            except ImportError:
                pass
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()),
        "versions": versions,
    }


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device.set_torch_threads(args.torch_threads)
    from benchmarks import models

    if args.memory_child:
        from benchmarks import memory

        config = models.TINY if args.config == "tiny" else models.DEFAULT
        memory.child_main(args.memory_child, config, args.steps or 2, args.dropout)
        return None

    import keras

    from benchmarks import files, memory, report, steps

    config_name = "tiny" if args.tiny else "default"
    config = models.TINY if args.tiny else models.DEFAULT
    large_config = models.TINY if args.tiny else models.LARGE
    rounds = args.rounds or (2 if args.tiny else 9)
    n_steps = args.steps or 1
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"Unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    backend = keras.backend.backend()
    jit = not args.no_jit
    results = {
        "backend": backend,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M UTC"
        ),
        "machine": machine(),
        "config": config,
        "large_config": large_config,
        "settings": {
            "rounds": rounds,
            "steps": n_steps,
            "dropout": args.dropout,
            "jit_compile": jit,
            "optimizer": "Adam(1e-4)",
            "torch_threads": args.torch_threads,
            "sections": sections,
        },
    }

    started = time.perf_counter()

    def log(message):
        elapsed = time.perf_counter() - started
        print(f"[{backend} +{elapsed:.0f}s] {message}", flush=True)

    if "train" in sections:
        log("training steps ...")
        results["train"] = steps.training(
            config,
            rounds,
            n_steps,
            args.dropout,
            jit_compile=jit,
            variants=args.variants.split(",") if args.variants else None,
        )
    if "inference" in sections:
        log("inference ...")
        results["inference"] = steps.inference(
            config, rounds, max(n_steps, 3), args.dropout, jit_compile=jit
        )
    if "memory" in sections:
        log("peak memory (child processes) ...")
        results["memory"] = memory.measure(
            ["keras-lora q/v", "full fine-tuning"],
            config_name,
            2,
            args.dropout,
            args.torch_threads,
        )
    if "files" in sections:
        log("file sizes ...")
        results["files"] = files.file_sizes(config, args.dropout)
    if "large" in sections:
        log("enable_lora / export_merged on the large config ...")
        results["large"] = files.large_model_times(large_config)
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    results["ratios"] = report.ratios(results)
    print(report.table(results), flush=True)
    path = args.json or os.path.join(ROOT, "benchmarks", "results", f"{backend}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    log(f"results written to {path}")
    return results


if __name__ == "__main__":
    main()
