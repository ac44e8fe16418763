"""The GPU check's dry run (`--cpu`), so the script cannot rot without a GPU.

The real run happens on a CUDA machine (docs/gpu.md); here the same command
runs one small test file and the tiny benchmark, on torch.
"""

import json
import os
import subprocess
import sys
import tarfile

import keras
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import gpu_check  # noqa: E402


def test_dry_run_writes_the_summary_and_one_log_archive(tmp_path):
    out = tmp_path / "out"
    backend = keras.backend.backend()
    if backend == "tensorflow":
        pytest.skip(
            "The GPU check runs jax and torch: TensorFlow's CUDA build does not "
            "fit in what travels to the GPU machine (docs/gpu.md)."
        )
    if backend == "jax":
        pytest.skip(
            "The dry run tries the runner and the benchmark harness on torch: "
            "they are the same code on jax except the device-memory calls of "
            "benchmarks/device.py, which only a GPU reaches; it costs 80 s, and "
            "the jax suite is the longest of the three (README 'Tests')."
        )
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), str(out), "--cpu"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "KERAS_BACKEND": backend},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # At most 8 files come back from a device run: three here.
    assert sorted(os.listdir(out)) == ["logs.tar.gz", "summary.json", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert (
        f"tests {backend}: " in summary and " 0 failed, 0 skipped, 0 errors" in summary
    )
    assert "forward batch 1: merged / fresh base" in summary
    data = json.loads((out / "summary.json").read_text())
    assert data["tests"][backend]["passed"] > 0
    bench = data["bench"][backend]
    assert bench["train"]["median_s"]["keras-lora q/v"] > 0
    assert bench["forward"]["batch 8"]["max_abs_diff_merged_vs_unmerged"] < 1e-4
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert f"logs/tests-{backend}-0.log" in names
    assert f"logs/bench-{backend}.log" in names


def test_wheels_folder_without_wheels_is_refused(tmp_path):
    with pytest.raises(ValueError, match="holds no .whl file"):
        gpu_check.install_wheels(str(tmp_path), log=None)


def test_shards_split_the_selection_without_losing_a_file():
    files = gpu_check.test_files("selection")
    assert "tests/layers/test_conv.py" in files
    assert "tests/test_quantized.py" in files
    groups = gpu_check.shard(files, 4)
    assert sorted(sum(groups, [])) == sorted(files)
    assert len(groups) == 4
