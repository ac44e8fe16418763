"""The GPU check: tests and benchmark on one CUDA machine, in one command.

    bash benchmarks/gpu_check.sh OUTDIR [--wheels DIR] [--backends jax,torch]
        [--tests selection|full] [--cpu]

1. With `--wheels DIR`, installs the wheels there (Keras, KerasHub, namex,
   optree, ...; not kagglehub) into /tmp/site and puts it on PYTHONPATH.
2. Runs the tests on the GPU under each backend (`selection`: the files
   named in SELECTION; `full`: every test file but PEFT interop, which needs
   transformers), each backend's files split into shards that run side by
   side (one process per shard, `XLA_PYTHON_CLIENT_PREALLOCATE=false` so that
   JAX processes share the GPU).
3. Runs `benchmarks/gpu_bench.py` under each backend.
4. Writes OUTDIR/summary.txt, OUTDIR/summary.json (each backend's benchmark
   JSON inside) and OUTDIR/logs.tar.gz (every log): three files.

`--cpu` is the dry run the test suite runs: one small test file, the tiny
benchmark, the current backend only, on whatever device there is.
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.run_backends import count  # noqa: E402

# What the GPU issue asks for at least: layers (DoRA, conv, quantized layers),
# quantized bases, named adapters, saving, KerasHub fit, thread safety.
SELECTION = (
    "tests/layers",
    "tests/test_quantized.py",
    "tests/test_named_adapters.py",
    "tests/test_saving.py",
    "tests/test_keras_hub.py",
    "tests/test_enable_lora.py",
    "tests/test_workflows.py",
    "tests/test_thread_safety.py",
    "tests/test_moe.py",
    "tests/test_frozen_backward.py",
)
DRY_RUN_TESTS = ("tests/test_public_api.py",)  # small: the runner is what is tried
TARGETS = {
    "train: keras-lora / keras built-in": ("<=", 0.95),
    "forward merged / fresh base (batch 1, 8)": ("within", 0.03),
    "forward unmerged / base, batch 1": ("<=", 1.25),
    "forward unmerged / base, batch 8": ("<=", 1.10),
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir")
    parser.add_argument("--wheels", default=None, help="a folder of wheels")
    parser.add_argument("--backends", default="jax,torch")
    parser.add_argument("--tests", default="selection", choices=("selection", "full"))
    parser.add_argument("--shards", type=int, default=None)
    parser.add_argument("--test-timeout", type=int, default=330, help="seconds")
    parser.add_argument("--cpu", action="store_true", help="the tiny dry run")
    return parser.parse_args(argv)


def install_wheels(folder, log):
    """pip-installs every wheel in `folder` into /tmp/site; returns the path."""
    site = "/tmp/site"
    shutil.rmtree(site, ignore_errors=True)
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        raise ValueError(f"`--wheels` holds no .whl file. Received: {folder!r}")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index"]
    command += ["--no-deps", "--no-compile", "--target", site, *wheels]
    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
    return site


def test_files(kind):
    if kind == "selection":
        names = []
        for entry in SELECTION:
            path = os.path.join(ROOT, entry)
            names += (
                sorted(glob.glob(path + "/test_*.py"))
                if os.path.isdir(path)
                else [path]
            )
        return [os.path.relpath(n, ROOT) for n in names]
    return [
        os.path.relpath(n, ROOT)
        for n in sorted(
            glob.glob(os.path.join(ROOT, "tests", "**", "test_*.py"), recursive=True)
        )
        if "/interop/" not in n
    ]


def shard(files, n):
    """`files` in `n` groups of about equal size (lines as the cost)."""
    groups = [[] for _ in range(n)]
    sizes = [0] * n
    weighted = sorted(files, key=lambda f: -os.path.getsize(os.path.join(ROOT, f)))
    for name in weighted:
        i = sizes.index(min(sizes))
        groups[i].append(name)
        sizes[i] += os.path.getsize(os.path.join(ROOT, name))
    return [g for g in groups if g]


def run_tests(backends, files, shards, env, logs, timeout):
    """Runs every shard of every backend side by side; returns the counts."""
    processes = []
    for backend in backends:
        for i, group in enumerate(shard(files, shards)):
            log_path = os.path.join(logs, f"tests-{backend}-{i}.log")
            log = open(log_path, "w")
            command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"]
            basetemp = tempfile.mkdtemp(prefix=f"gpu-check-{backend}-{i}-")
            command += [f"--basetemp={basetemp}", *group]
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**env, "KERAS_BACKEND": backend},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            processes.append((backend, process, log, log_path))
    deadline = time.monotonic() + timeout
    totals = {
        b: {"passed": 0, "failed": 0, "skipped": 0, "errors": 0} for b in backends
    }
    for backend, process, log, log_path in processes:
        try:
            process.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            totals[backend]["errors"] += 1  # a shard past the time limit
        log.close()
        summary = _pytest_summary(log_path)
        for key, value in count(summary).items():
            totals[backend][key] += value
        if process.returncode not in (0, None) and not count(summary)["failed"]:
            totals[backend]["errors"] += 1
    return totals


def _pytest_summary(log_path):
    """Pytest's closing line ("N passed, N failed in Ts"), or "" if none.

    Searched from the end: a process may print after pytest's summary."""
    with open(log_path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    for line in reversed(lines):
        if re.search(r"\d+ (passed|failed|errors?)\b.* in [\d.]+s", line):
            return line
    return ""


def run_bench(backends, tiny, env, logs, outdir):
    results = {}
    for backend in backends:
        path = os.path.join(outdir, f"bench-{backend}.json")
        command = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_bench.py")]
        command += ["--json", path] + (["--tiny"] if tiny else [])
        with open(os.path.join(logs, f"bench-{backend}.log"), "w") as log:
            code = subprocess.run(
                command,
                cwd=ROOT,
                env={**env, "KERAS_BACKEND": backend},
                stdout=log,
                stderr=subprocess.STDOUT,
            ).returncode
        if code == 0 and os.path.exists(path):
            with open(path) as f:
                results[backend] = json.load(f)
            os.remove(path)  # kept inside summary.json
        else:
            results[backend] = {"error": f"exit code {code}: see bench-{backend}.log"}
    return results


def summarize(tests, bench, seconds):
    lines = [f"GPU check: {seconds:.0f} s"]
    for backend, totals in tests.items():
        lines.append(
            f"tests {backend}: " + ", ".join(f"{v} {k}" for k, v in totals.items())
        )
    for backend, data in bench.items():
        if "error" in data:
            lines.append(f"benchmark {backend}: {data['error']}")
            continue
        lines.append(f"benchmark {backend} on {data['device']}:")
        for name, value in data["train"]["ratios"].items():
            lines.append(f"  train {name}: {value:.3f}")
        for name, value in data["memory"]["ratios"].items():
            lines.append(f"  peak memory {name}: {value:.3f}")
        for batch, row in data["forward"].items():
            merged, unmerged = row["merged / fresh base"], row["unmerged / base"]
            lines.append(
                f"  forward {batch}: merged / fresh base {merged:.3f}, "
                f"unmerged / base {unmerged:.3f}"
            )
        for name, row in data["call_overhead"].items():
            lines.append(f"  {name} call, LoRA / plain: {row['ratio']:.3f}")
    lines.append(
        "targets: " + "; ".join(f"{k} {op} {v}" for k, (op, v) in TARGETS.items())
    )
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    start = time.monotonic()
    outdir = os.path.abspath(args.outdir)
    logs = os.path.join(outdir, "logs")
    os.makedirs(logs, exist_ok=True)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    if args.wheels:
        with open(os.path.join(logs, "install.log"), "w") as log:
            site = install_wheels(args.wheels, log)
        env["PYTHONPATH"] = site + os.pathsep + env["PYTHONPATH"]
    if args.cpu:
        backends = [os.environ.get("KERAS_BACKEND", "jax")]
        files, shards = list(DRY_RUN_TESTS), 1
    else:
        backends = args.backends.split(",")
        files = test_files(args.tests)
        shards = args.shards or max(1, min(6, (os.cpu_count() or 2) // 2))
    tests = run_tests(backends, files, shards, env, logs, args.test_timeout)
    bench = run_bench(backends, args.cpu, env, logs, outdir)
    seconds = time.monotonic() - start
    summary = summarize(tests, bench, seconds)
    with open(os.path.join(outdir, "summary.txt"), "w") as f:
        f.write(summary)
    with open(os.path.join(outdir, "summary.json"), "w") as f:
        json.dump({"tests": tests, "bench": bench, "seconds": seconds}, f, indent=1)
    with tarfile.open(os.path.join(outdir, "logs.tar.gz"), "w:gz") as tar:
        tar.add(logs, arcname="logs")
    shutil.rmtree(logs)
    print(summary, end="")
    failed = any(t["failed"] or t["errors"] for t in tests.values())
    return 1 if failed or any("error" in b for b in bench.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
