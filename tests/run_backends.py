"""Runs the test suite once per Keras backend and fails if any run fails.

Usage: python tests/run_backends.py [pytest args...]
Backends: KERAS_LORA_BACKENDS (comma separated), default jax,torch,tensorflow.

Each backend's pytest output is shown as it comes; the last line adds up the
three runs: `total: N passed, N failed, N skipped`.
"""

import os
import re
import subprocess
import sys
import time

BACKENDS = os.environ.get("KERAS_LORA_BACKENDS", "jax,torch,tensorflow").split(",")
COUNTS = {
    "passed": r"(\d+) passed",
    "failed": r"(\d+) failed",
    "skipped": r"(\d+) skipped",
    "errors": r"(\d+) errors?",
}


def run_pytest(backend, argv, root, out=sys.stdout):
    """Runs pytest under `backend`, echoing its output line by line.

    Returns:
        (exit code, pytest's last non-empty line: its summary).
    """
    env = dict(os.environ, KERAS_BACKEND=backend)
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
        out.write(line)
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
    failed_backends = []
    for backend in BACKENDS:
        print(f"===== KERAS_BACKEND={backend} =====", flush=True)
        start = time.time()
        code, summary = run_pytest(backend, argv, root)
        for key, value in count(summary).items():
            totals[key] += value
        print(f"{backend}: exit {code} in {time.time() - start:.0f}s", flush=True)
        if code != 0:
            failed_backends.append(backend)
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
