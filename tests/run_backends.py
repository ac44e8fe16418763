"""Runs the test suite once per Keras backend and fails if any run fails.

Usage: python tests/run_backends.py [pytest args...]
Backends: KERAS_LORA_BACKENDS (comma separated), default jax,torch,tensorflow.

Each backend's pytest output is shown as it comes; the last line adds up the
three runs: `total: N passed, N failed, N skipped`.

The backends run at the same time, each line prefixed with its backend: one
pytest process mostly keeps one core busy (compilation and Python), so on a
2-core machine three side by side take about half the time of three in turn
(measured: see the closing note of issue 16 / README "Tests"). Memory stays
at about 3 GB per process. `KERAS_LORA_SERIAL=1` runs them one after another.
"""

import os
import re
import subprocess
import sys
import tempfile
import threading
import time

BACKENDS = os.environ.get("KERAS_LORA_BACKENDS", "jax,torch,tensorflow").split(",")
COUNTS = {
    "passed": r"(\d+) passed",
    "failed": r"(\d+) failed",
    "skipped": r"(\d+) skipped",
    "errors": r"(\d+) errors?",
}


def run_pytest(backend, argv, root, out=sys.stdout, prefix="", lock=None):
    """Runs pytest under `backend`, echoing its output line by line.

    Args:
        prefix: put before each echoed line (parallel runs).
        lock: a lock held while a line is written (parallel runs).

    Returns:
        (exit code, pytest's last non-empty line: its summary).
    """
    env = dict(os.environ, KERAS_BACKEND=backend)
    if not any(a.startswith("--basetemp") for a in argv):
        # Each run its own temporary root: pytest prunes old numbered roots,
        # and runs side by side must not prune each other's.
        argv = [*argv, f"--basetemp={tempfile.mkdtemp(prefix=f'pytest-{backend}-')}"]
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *argv],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,  # line-buffered on our side; pytest flushes per line to a pipe
        errors="replace",
    )
    summary = ""
    for line in process.stdout:
        if lock is None:
            out.write(line)
            out.flush()
        else:
            with lock:
                out.write(prefix + line)
                out.flush()
        if line.strip():
            summary = line.strip()
    return process.wait(), summary


def count(summary):
    """{"passed": N, "failed": N, "skipped": N, "errors": N} from pytest's line."""
    counts = {}
    for key, pattern in COUNTS.items():
        match = re.search(pattern, summary)
        counts[key] = int(match.group(1)) if match else 0
    return counts


def main(argv):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    totals = dict.fromkeys(COUNTS, 0)
    results = {}
    start = time.time()
    if os.environ.get("KERAS_LORA_SERIAL") or len(BACKENDS) == 1:
        for backend in BACKENDS:
            print(f"===== KERAS_BACKEND={backend} =====", flush=True)
            results[backend] = run_pytest(backend, argv, root)
            elapsed = time.time() - start
            print(
                f"{backend}: exit {results[backend][0]} at {elapsed:.0f}s", flush=True
            )
    else:
        print(f"===== KERAS_BACKEND={','.join(BACKENDS)}, side by side =====")
        lock = threading.Lock()

        def run(backend):
            results[backend] = run_pytest(
                backend, argv, root, prefix=f"[{backend}] ", lock=lock
            )
            with lock:
                code, elapsed = results[backend][0], time.time() - start
                print(f"{backend}: exit {code} in {elapsed:.0f}s", flush=True)

        threads = [threading.Thread(target=run, args=(b,)) for b in BACKENDS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    failed_backends = []
    for backend in BACKENDS:
        code, summary = results[backend]
        print(f"{backend}: {summary}")
        for key, value in count(summary).items():
            totals[key] += value
        if code != 0:
            failed_backends.append(backend)
    print(f"all backends: {time.time() - start:.0f}s", flush=True)
    if failed_backends:
        print(f"FAILED on: {', '.join(failed_backends)}")
    failed = totals["failed"] + totals["errors"]
    # One word and a colon, then "N passed, N failed": the closing line CI reads.
    print(
        f"total: {totals['passed']} passed, {failed} failed, {totals['skipped']} skipped"
    )
    return 1 if failed_backends else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
