"""Runs the test suite once per Keras backend and fails if any run fails.

Usage: python tests/run_backends.py [pytest args...]
Backends: KERAS_LORA_BACKENDS (comma separated), default jax,torch,tensorflow.
"""

import os
import re
import subprocess
import sys
import time

BACKENDS = os.environ.get("KERAS_LORA_BACKENDS", "jax,torch,tensorflow").split(",")


def main(argv):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    totals = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failed_backends = []
    for backend in BACKENDS:
        print(f"===== KERAS_BACKEND={backend} =====", flush=True)
        env = dict(os.environ, KERAS_BACKEND=backend)
        start = time.time()
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *argv],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        print(result.stdout, flush=True)
        summary = result.stdout.strip().splitlines()[-1] if result.stdout else ""
        for key, pattern in (
            ("passed", r"(\d+) passed"),
            ("failed", r"(\d+) failed"),
            ("skipped", r"(\d+) skipped"),
            ("errors", r"(\d+) errors?"),
        ):
            match = re.search(pattern, summary)
            totals[key] += int(match.group(1)) if match else 0
        print(f"{backend}: exit {result.returncode} in {time.time() - start:.0f}s")
        if result.returncode != 0:
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
