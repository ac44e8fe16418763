"""Smoke test of the benchmark harness: tiny model, no timing assertion."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import memory, models, run  # noqa: E402


def test_harness_runs_at_tiny_size(tmp_path, capsys):
    path = tmp_path / "results.json"
    results = run.main(
        [
            "--tiny",
            "--no-jit",
            "--rounds",
            "1",
            "--variants",
            "keras-lora q/v,keras built-in q/v,full fine-tuning",
            "--sections",
            "train,inference,files,large",
            "--json",
            str(path),
        ]
    )
    saved = json.loads(path.read_text())
    assert saved["backend"] == results["backend"]
    assert set(saved["train"]) == {
        "keras-lora q/v",
        "keras built-in q/v",
        "full fine-tuning",
    }
    for data in saved["train"].values():
        assert data["median_s"] > 0
    # keras-lora trains far fewer parameters than full fine-tuning.
    train = saved["train"]
    assert (
        train["keras-lora q/v"]["trainable_params"]
        < train["full fine-tuning"]["trainable_params"]
    )
    assert saved["inference"]["max_abs_diff_merged_vs_unmerged"] < 1e-4
    assert "train: keras-lora / keras built-in (q/v)" in saved["ratios"]
    assert "inference: merged / base" in saved["ratios"]
    assert saved["large"]["enable_lora_s"] >= 0
    assert (
        "| measure | ratio (wall) | ratio (CPU time) | target | met (wall) |"
        in capsys.readouterr().out
    )


def test_memory_child_reports_json(capsys):
    memory.child_main(
        "keras-lora q/v", models.TINY, steps=1, dropout=0.0, jit_compile=False
    )
    line = [
        x for x in capsys.readouterr().out.splitlines() if x.startswith(memory.MARKER)
    ][-1]
    result = json.loads(line[len(memory.MARKER) :])
    assert result["variant"] == "keras-lora q/v"
    assert result["peak_rss_mb"] > 0


def test_step_memory_at_tiny_size():
    """XLA's step footprint (JAX): a quantized base keeps no float kernels.

    Before the backward pass of frozen int8/int4 layers was made from the
    packed kernel, XLA held every layer's float kernel through the step and
    the int8 step was as large as the float one (issue 25).
    """
    import keras

    from benchmarks import step_memory

    if keras.backend.backend() != "jax":
        with pytest.raises(SystemExit, match="KERAS_BACKEND=jax"):
            step_memory.main(["--tiny"])
        return
    s = dict(step_memory.TINY, hidden=256, heads=4)
    variants = ("lora-float", "lora-int8", "lora-int4-chunked")
    results = step_memory.measure(variants, s, chunk=8)
    footprint = {v: results[v]["footprint_mb"] for v in variants}
    # Before: 0.93 at this shape; after: 0.63.
    assert footprint["lora-int8"] < 0.8 * footprint["lora-float"], footprint
    assert footprint["lora-int4-chunked"] < footprint["lora-int8"], footprint
    assert "| lora-int8 |" in step_memory.table(results)
