"""`keras-lora inspect / merge / convert / analyze` on files the tests write.

Most calls go through `cli.main` in this process (each subprocess pays the
Keras import again); a few run the real command to show what a shell sees.
"""

import json
import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

import keras_lora
from helpers import randomize_factors, tiny_llama3_backbone
from keras_lora import cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _small_model():
    inputs = keras.Input((16,))
    x = keras.layers.Dense(32, name="hidden")(inputs)
    x = keras.layers.Dense(24, name="proj")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name="small")


def _adapter(folder, rank, seed):
    model = keras.saving.load_model(folder / "base.keras")
    keras_lora.enable_lora(
        model,
        rank=rank,
        alpha=2.0 * rank,
        targets=["hidden", "proj"],
        train_layers=["head"],
    )
    randomize_factors(model, seed)
    keras_lora.save_adapter(model, folder / f"r{rank}.adapter.keras")
    return model


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A base model, two adapters, an adapted model, and malformed files."""
    folder = tmp_path_factory.mktemp("cli_files")
    _small_model().save(folder / "base.keras")
    _adapter(folder, 4, seed=0)
    adapted = _adapter(folder, 8, seed=1)
    adapted.save(folder / "adapted_model.keras")
    (folder / "not_a_zip.keras").write_bytes(b"garbage, not a zip archive")
    _zip(folder / "other_zip.keras", {"readme.txt": "hello"})
    _zip(folder / "bad_config.keras", {"config.json": "{not json", "x": ""})
    with zipfile.ZipFile(folder / "r4.adapter.keras") as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    members["adapter.weights.h5"] = members["adapter.weights.h5"][:200]
    _zip(folder / "truncated.adapter.keras", members)
    return folder


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_clean_error(code, err, command, *words):
    assert code == 1
    assert err.startswith(f"keras-lora {command}: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


def test_inspect_adapter_file(files, capsys):
    code, out, _ = _run(["inspect", files / "r4.adapter.keras"], capsys)
    assert code == 0
    assert "keras-lora adapter (format version 1)" in out
    assert f"Keras {keras.__version__}" in out and keras.backend.backend() in out
    assert "hidden  rank 4   alpha 8 (scale 2)  A (16, 4), B (4, 32)" in out
    assert "trained layer: head (75 params)" in out  # 24 x 3 + 3
    code, out, _ = _run(["inspect", files / "r4.adapter.keras", "--json"], capsys)
    info = json.loads(out)
    assert info["parameters"] == {
        "LoRA": 4 * (16 + 32) + 4 * (32 + 24),
        "trained layers": 24 * 3 + 3,
        "total": 4 * (16 + 32) + 4 * (32 + 24) + 75,
    }
    assert [layer["path"] for layer in info["layers"]] == ["hidden", "proj"]
    assert info["file_bytes"] == os.path.getsize(files / "r4.adapter.keras")
    assert info["trained_layers"] == [{"path": "head", "parameters": 75}]


def test_inspect_dora_adapter_and_model(files, capsys):
    model = keras.saving.load_model(files / "base.keras")
    keras_lora.enable_lora(model, rank=2, targets=["hidden"], use_dora=True)
    keras_lora.save_adapter(model, files / "dora.adapter.keras")
    model.save(files / "dora_model.keras")
    code, out, _ = _run(["inspect", files / "dora.adapter.keras"], capsys)
    assert code == 0
    assert "hidden  rank 2   alpha 2 (scale 1), DoRA  A (16, 2), B (2, 32)" in out
    code, out, _ = _run(["inspect", files / "dora.adapter.keras", "--json"], capsys)
    info = json.loads(out)
    assert info["layers"][0]["use_dora"] is True
    assert info["parameters"]["LoRA"] == 2 * (16 + 32) + 32  # A, B, magnitude
    code, out, _ = _run(["inspect", files / "dora_model.keras"], capsys)
    assert "hidden  rank 2   alpha 2 (scale 1), DoRA" in out


def test_inspect_keras_models(files, capsys):
    code, out, _ = _run(["inspect", files / "base.keras", "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["layers"] == []
    assert info["parameters"] == {
        "total (all weights)": 16 * 32 + 32 + 32 * 24 + 24 + 75
    }
    assert info["model"]["class"] == "Functional" and info["model"]["name"] == "small"
    code, out, _ = _run(["inspect", files / "adapted_model.keras"], capsys)
    assert "adapted with keras-lora" in out
    assert "proj    rank 8   alpha 16 (scale 2)" in out
    assert "trained layer: head" in out


@pytest.mark.parametrize(
    "name,words",
    [
        ("missing.keras", ["No such file or folder"]),
        ("not_a_zip.keras", ["not a zip archive"]),
        ("other_zip.keras", ["neither a keras-lora adapter file nor a .keras model"]),
        ("bad_config.keras", ["config.json is not valid JSON"]),
        ("truncated.adapter.keras", ["truncated.adapter.keras"]),
    ],
)
def test_inspect_malformed_files(files, capsys, name, words):
    code, _, err = _run(["inspect", files / name], capsys)
    _assert_clean_error(code, err, "inspect", *words)


def test_merge_writes_a_plain_model_with_the_adapted_outputs(files, capsys):
    out_path = files / "merged.keras"
    argv = ["merge", files / "base.keras", files / "r4.adapter.keras", out_path]
    code, out, _ = _run(argv, capsys)
    assert code == 0 and "Merged 2 LoRA layers" in out
    merged = keras.saving.load_model(out_path)
    assert not keras_lora.lora_layers(merged)
    adapted = keras.saving.load_model(files / "base.keras")
    keras_lora.load_adapter(adapted, files / "r4.adapter.keras")
    x = np.random.default_rng(0).normal(size=(4, 16)).astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(merged(x)),
        keras.ops.convert_to_numpy(adapted(x)),
        atol=1e-5,
    )


def test_merge_to_onnx_writes_an_artifact_with_the_adapted_outputs(files, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    out_path = files / "merged.onnx"
    argv = ["merge", files / "base.keras", files / "r4.adapter.keras", out_path]
    code, out, _ = _run([*argv, "--format", "onnx"], capsys)
    assert code == 0 and "(onnx," in out
    adapted = keras.saving.load_model(files / "base.keras")
    keras_lora.load_adapter(adapted, files / "r4.adapter.keras")
    x = np.random.default_rng(0).normal(size=(4, 16)).astype("float32")
    session = onnxruntime.InferenceSession(str(out_path))
    np.testing.assert_allclose(
        session.run(None, {session.get_inputs()[0].name: x})[0],
        keras.ops.convert_to_numpy(adapted(x)),
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "argv,words",
    [
        (["missing.keras", "r4.adapter.keras", "m.keras"], ["Base model not found"]),
        (["base.keras", "missing.keras", "m.keras"], ["Adapter file not found"]),
        (["not_a_zip.keras", "r4.adapter.keras", "m.keras"], ["not a zip archive"]),
        (["base.keras", "truncated.adapter.keras", "m.keras"], ["truncated.adapter"]),
        (["base.keras", "r4.adapter.keras", "m.h5"], ["must end in '.keras'"]),
        (["base.keras", "r4.adapter.keras", "base.keras"], ["overwrite an input"]),
        (["adapted_model.keras", "r4.adapter.keras", "m.keras"], ["already has LoRA"]),
    ],
)
def test_merge_errors(files, capsys, argv, words):
    code, _, err = _run(["merge", *[files / a for a in argv]], capsys)
    _assert_clean_error(code, err, "merge", *words)
    assert not (files / "m.keras").exists()


def test_analyze_two_ranks(files, capsys):
    plot = files / "phi.png"
    argv = ["analyze", files / "r4.adapter.keras", files / "r8.adapter.keras"]
    code, out, _ = _run([*argv, "--base", files / "base.keras", "--plot", plot], capsys)
    assert code == 0
    assert "phi(1,1) [chance]" in out and "amplification A/B" in out
    assert "hidden    4/8" in out and "mean phi(1,1) over 2 layers" in out
    assert plot.read_bytes()[:4] == b"\x89PNG"
    code, out, _ = _run([*argv, "--json", "--layer", "proj", "--factor", "b"], capsys)
    result = json.loads(out)
    (row,) = result["layers"]
    assert row["layer"] == "proj" and (row["rank_a"], row["rank_b"]) == (4, 8)
    assert np.array(row["grid"]).shape == (4, 8)
    assert row["chance_top"] == pytest.approx(1 / 24)  # B: the output side
    # The same number as the library computes.
    expected = keras_lora.analysis.subspace_similarity(
        (str(files / "r4.adapter.keras"), "proj"),
        (str(files / "r8.adapter.keras"), "proj"),
        1,
        1,
        factor="b",
    )
    assert row["phi_top"] == pytest.approx(expected)


def test_analyze_errors(files, capsys):
    good = files / "r4.adapter.keras"
    code, _, err = _run(["analyze", good, files / "not_a_zip.keras"], capsys)
    _assert_clean_error(code, err, "analyze", "not_a_zip.keras")
    code, _, err = _run(["analyze", good, files / "missing.keras"], capsys)
    _assert_clean_error(code, err, "analyze", "Adapter file B not found")
    code, _, err = _run(["analyze", good, good, "--layer", "head"], capsys)
    _assert_clean_error(code, err, "analyze", "--layer 'head' is not adapted in both")


def test_inspect_peft_dora_folder_counts_the_magnitudes(tmp_path, capsys):
    backbone = tiny_llama3_backbone()
    keras_lora.enable_lora(backbone, rank=2, use_dora=True)
    keras_lora.save_peft_adapter(backbone, tmp_path / "peft")
    code, out, _ = _run(["inspect", tmp_path / "peft", "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and all(layer["use_dora"] for layer in info["layers"])
    # q: A 2x32, B 32x2, m 32; v: A 2x32, B 16x2, m 16.
    assert info["parameters"]["LoRA"] == (64 + 64 + 32) + (64 + 32 + 16)
    code, out, _ = _run(["inspect", tmp_path / "peft"], capsys)
    assert "layers.0.self_attn.v_proj  rank 2   alpha 2 (scale 1), DoRA" in out


def test_convert_peft_round_trip(tmp_path, capsys):
    """keras-lora file -> PEFT folder -> keras-lora file: the same factors."""
    pytest.importorskip("safetensors")
    backbone = tiny_llama3_backbone()
    backbone.save(tmp_path / "llama.keras")
    keras_lora.enable_lora(backbone, rank=2)
    randomize_factors(backbone)
    keras_lora.save_adapter(backbone, tmp_path / "llama.adapter.keras")
    base = ["--base", tmp_path / "llama.keras"]
    code, out, _ = _run(
        ["convert", tmp_path / "llama.adapter.keras", tmp_path / "peft", *base], capsys
    )
    assert code == 0 and "PEFT adapter folder" in out
    code, out, _ = _run(["inspect", tmp_path / "peft", "--json"], capsys)
    info = json.loads(out)
    assert info["format"] == "PEFT LORA adapter folder"
    assert [layer["path"] for layer in info["layers"]] == [
        "layers.0.self_attn.q_proj",
        "layers.0.self_attn.v_proj",
    ]
    back = tmp_path / "back.adapter.keras"
    code, out, _ = _run(["convert", tmp_path / "peft", back, *base], capsys)
    assert code == 0 and "keras-lora adapter file" in out
    from keras_lora.adapters import read_adapter

    _, before = read_adapter(tmp_path / "llama.adapter.keras")
    _, after = read_adapter(back)
    assert sorted(before) == sorted(after)
    for key in before:
        np.testing.assert_allclose(after[key], before[key], atol=1e-6)
    # Errors: a folder that is not a PEFT adapter, a file as DST of a folder.
    (tmp_path / "empty").mkdir()
    code, _, err = _run(["convert", tmp_path / "empty", back, *base], capsys)
    _assert_clean_error(code, err, "convert", "adapter_config.json")
    code, _, err = _run(
        ["convert", tmp_path / "peft", tmp_path / "x.h5", *base], capsys
    )
    _assert_clean_error(code, err, "convert", "ending in '.keras'")


# --- the real command, as a shell runs it ----------------------------------


def _command(*argv):
    script = os.path.join(os.path.dirname(sys.executable), "keras-lora")
    command = (
        [script] if os.path.exists(script) else [sys.executable, "-m", "keras_lora"]
    )
    return subprocess.run(
        [*command, *map(str, argv)], capture_output=True, text=True, timeout=300
    )


def test_shell_inspect_model_and_malformed_adapter(files):
    """Two subprocesses: a model (no Keras import) and a broken adapter."""
    result = _command("inspect", files / "adapted_model.keras", "--json")
    assert result.returncode == 0, result.stderr
    assert (
        json.loads(result.stdout)["format"] == ".keras model (adapted with keras-lora)"
    )
    result = _command(
        "analyze", files / "truncated.adapter.keras", files / "r4.adapter.keras"
    )
    assert result.returncode == 1
    assert "keras-lora analyze: error: " in result.stderr
    assert "truncated.adapter.keras" in result.stderr
    assert "Traceback" not in result.stderr
