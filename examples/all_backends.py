"""Runs one example once per Keras backend: only KERAS_BACKEND changes.

keras-lora is written with `keras.ops` only, so every example runs unchanged
on JAX, PyTorch and TensorFlow. The backend is chosen by the environment
variable KERAS_BACKEND before Keras is imported; by hand that is:

    KERAS_BACKEND=jax        python examples/plain_keras.py
    KERAS_BACKEND=torch      python examples/plain_keras.py
    KERAS_BACKEND=tensorflow python examples/plain_keras.py

This script does exactly that in a loop and prints a line per backend:

    python examples/all_backends.py plain_keras.py --smoke
    python examples/all_backends.py --backends jax,torch gpt2_causal_lm.py
"""

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = "jax,torch,tensorflow"


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Run an example once per Keras backend (KERAS_BACKEND=...).",
        epilog="Arguments after the script name are passed to the script.",
    )
    parser.add_argument(
        "--backends",
        default=BACKENDS,
        help="comma-separated backends (default: %(default)s)",
    )
    parser.add_argument("script", help="an example, e.g. plain_keras.py")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    script = args.script
    if not os.path.exists(script):
        script = os.path.join(HERE, script)
    if not os.path.exists(script):
        parser.error(f"no such example: {args.script!r}")
    failed = []
    for backend in args.backends.split(","):
        print(f"===== KERAS_BACKEND={backend} python {args.script}", flush=True)
        env = dict(os.environ, KERAS_BACKEND=backend)
        if backend == "tensorflow":
            # The examples hide TensorFlow's C++ logs themselves (keras_lora.quiet),
            # except on this backend, where Keras imports TensorFlow first: this
            # hides at least its runtime lines there (the user's setting wins).
            env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        start = time.time()
        code = subprocess.call([sys.executable, script, *args.script_args], env=env)
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        print(f"{backend}: {status} in {time.time() - start:.0f} s", flush=True)
        if code:
            failed.append(backend)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
