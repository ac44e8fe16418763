"""Peak memory of a training run, one child process per variant.

Each child imports Keras and builds its variant of the classifier (frozen
weights, LoRA factors, optimizer), then measures on Linux's own counters:

- `first_step_mb`: peak RSS while compiling and running the first training
  step, minus the RSS just before it (includes the compiler's working memory);
- `training_mb`: peak RSS over the next steps, minus the RSS before the first
  step: what training keeps and allocates once compiled (gradients, optimizer
  state, activations saved for the backward pass, the compiled program). Heap
  pages the compiler freed are handed back to the OS first (glibc
  `malloc_trim`), so that they do not count as training memory.

Both exclude the interpreter, the frameworks and the model's own weights,
which every variant shares. The peak is reset by writing 5 to
`/proc/self/clear_refs` and read from `VmHWM` in `/proc/self/status`; where
that is not available (not Linux), the lifetime `ru_maxrss` is used instead
and the figures include everything.
"""

import json
import os
import resource
import subprocess
import sys

MARKER = "KERAS_LORA_BENCH_MEMORY "


def _status_mb(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb():
    peak = _status_mb("VmHWM")
    if peak is None:  # not Linux: lifetime peak
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak / 2**20 if sys.platform == "darwin" else peak / 1024
    return peak


def _release_free_heap():
    """Gives freed heap pages (e.g. the compiler's) back to the OS (glibc)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def child_main(variant, config, steps, dropout, jit_compile=True):
    """Runs in the child process: build, train, print the memory figures."""
    from benchmarks import models

    method, targets = models.TRAIN_VARIANTS[variant]
    model = models.make_variant(
        method, targets, config, dropout=dropout, jit_compile=jit_compile
    )
    x, y = models.make_batch(config)
    before = _status_mb("VmRSS") or 0.0
    resettable = _reset_peak()
    model.train_on_batch(x, y)
    first = _peak_mb()
    _release_free_heap()
    _reset_peak()
    for _ in range(steps):
        model.train_on_batch(x, y)
    steady = _peak_mb()
    result = {
        "variant": variant,
        "rss_before_mb": before,
        "first_step_mb": first - before,
        "training_mb": steady - before,
        "peak_rss_mb": max(first, steady),
        "peak_reset": resettable,
    }
    print(MARKER + json.dumps(result), flush=True)


def measure(variants, config_name, steps, dropout, torch_threads=None, timeout=1800):
    """Runs one child process per variant, one after the other."""
    run_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py")
    out = {}
    for variant in variants:
        command = [
            sys.executable,
            run_py,
            "--memory-child",
            variant,
            "--config",
            config_name,
            "--steps",
            str(steps),
            "--dropout",
            str(dropout),
        ]
        if torch_threads:
            command += ["--torch-threads", str(torch_threads)]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, env=os.environ
        )
        lines = [x for x in result.stdout.splitlines() if x.startswith(MARKER)]
        if result.returncode != 0 or not lines:
            raise RuntimeError(
                f"Memory child for {variant!r} failed:\n{result.stderr[-3000:]}"
            )
        out[variant] = json.loads(lines[-1][len(MARKER) :])
    return out
