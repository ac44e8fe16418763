"""`keras_lora.quiet`: an application's stderr shows no TensorFlow C++ logs.

Run in a fresh process on the JAX backend, where the noise comes from (KerasHub
imports TensorFlow): the test is the same under every pytest backend.
"""

import os
import subprocess
import sys

import pytest

from keras_lora import quiet

pytest.importorskip("tensorflow")

SCRIPT = """
import sys
from keras_lora.quiet import quiet_third_party_logs
print(quiet_third_party_logs())
import tensorflow as tf
print(int(tf.reduce_sum(tf.constant([1, 2]))))  # TF's runtime starts: cuInit
print("keras-lora's own line", file=sys.stderr)
"""

# What TensorFlow 2.21 prints on a CPU machine without them hidden.
NOISE = ("absl::InitializeLog", "oneDNN", "cuda", "cuInit")


def run_script():
    """Runs SCRIPT on JAX, with TF_CPP_MIN_LOG_LEVEL unset."""
    env = dict(os.environ, KERAS_BACKEND="jax")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result


def test_hides_tensorflow_cpp_logs_only():
    result = run_script()
    assert result.stdout.split() == ["True", "3"]
    assert "keras-lora's own line" in result.stderr  # stderr works after import
    assert not [word for word in NOISE if word in result.stderr], result.stderr


def test_leaves_logging_alone_if_the_user_set_it(monkeypatch):
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    meta_path = list(sys.meta_path)
    assert quiet.quiet_third_party_logs() is False
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
    assert sys.meta_path == meta_path  # no import hook either
