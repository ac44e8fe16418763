"""The `keras-lora` command: `demo` end to end (tiny settings) and bad input."""

import json
import os
import runpy
import subprocess
import sys
import time
import zipfile

import keras
import pytest

from keras_lora import cli

pytest.importorskip("keras_hub")


# Tiny models: one torch thread is faster, much faster on a busy CPU.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One tiny demo run shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("demo") / "out"
    code = cli.main(
        [
            "demo",
            "--out",
            str(out),
            "--pretrain-epochs",
            "0",
            "--epochs",
            "3",
            "--sequence-length",
            "16",
            "--sample-length",
            "8",
        ]
    )
    return code, out


def test_demo_runs_and_reports(demo_run, capsys):
    code, out = demo_run
    assert code == 0
    assert sorted(os.listdir(out)) == [
        "adapter.keras",
        "base.keras",
        "merged.keras",
        "report.json",
        "report.md",
    ]
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report["backend"] == keras.backend.backend()
    assert report["merged_matches"] and report["adapter_matches"]
    assert report["merged_has_no_lora_names"]
    assert report["target_loss_after"] < report["target_loss_before"]
    assert 0 < report["trainable_percent"] < 20
    assert report["adapter_bytes"] < report["merged_bytes"] / 4
    assert report["sample_before"].startswith(report["prompt"])
    assert report["sample_after"].startswith(report["prompt"])
    markdown = (out / "report.md").read_text()
    assert f"{keras.backend.backend()} backend" in markdown
    assert "trainable params" in markdown and "perplexity" in markdown


def test_demo_files_are_what_they_claim(demo_run):
    import keras_lora

    _, out = demo_run
    with zipfile.ZipFile(out / "merged.keras") as archive:
        config = archive.read("config.json").decode()
    assert "GPT2CausalLM" in config and "LoRA" not in config
    base = keras.saving.load_model(out / "base.keras", compile=False)
    assert not keras_lora.lora_layers(base)
    keras_lora.load_adapter(base, out / "adapter.keras")
    assert keras_lora.lora_layers(base)


def test_demo_on_an_int8_base(tmp_path):
    out = tmp_path / "q"
    argv = ["demo", "--out", str(out), "--quantize", "int8", "--epochs", "2"]
    argv += ["--pretrain-epochs", "0", "--sequence-length", "16"]
    # q/v only (all-linear runs in `demo_run`): fewer layers to compile.
    argv += ["--targets", "qv", "--sample-length", "8"]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["quantize"] == "int8" and report["quantized_weight_ratio"] < 0.5
    assert report["adapter_matches"]  # the fresh base quantizes identically
    assert report["merged_matches"]  # re-quantized, within 2x the base's error
    assert report["target_loss_after"] < report["target_loss_before"]
    merged = keras.saving.load_model(out / "merged.keras", compile=False)
    modes = {
        getattr(layer, "quantization_mode", None) for layer in merged._flatten_layers()
    }
    assert "int8" in modes  # the export stayed quantized
    assert "model.quantize('int8')" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "argv,message",
    [
        ([], "required: COMMAND"),
        (["nonsense"], "invalid choice: 'nonsense'"),
        (["demo", "--epochs", "0"], "--epochs: must be at least 1, got 0"),
        (["demo", "--epochs", "two"], "expected an integer, got 'two'"),
        (["demo", "--rank", "-1"], "--rank: must be at least 1"),
        (["demo", "--pretrain-epochs", "-2"], "must be 0 or more"),
        (["demo", "--sequence-length", "500"], "must be at most 128"),
        (["demo", "--targets", "everything"], "invalid choice: 'everything'"),
        (["demo", "--quantize", "float8"], "invalid choice: 'float8'"),
        (["demo", "--prompt", "  "], "--prompt must not be empty"),
    ],
)
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        cli.main(argv)
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_out_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "a_file"
    path.write_text("x")
    with pytest.raises(SystemExit) as error:
        cli.main(["demo", "--out", str(path)])
    assert error.value.code == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_runtime_error_is_one_line_not_a_traceback(tmp_path, capsys):
    missing = tmp_path / "no_such_preset"
    code = cli.main(["demo", "--out", str(tmp_path / "o"), "--preset", str(missing)])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("keras-lora demo: error: ") and "Traceback" not in err
    assert "--debug" in err


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as error:
        cli.main(["demo", "--help"])
    assert error.value.code == 0
    out = capsys.readouterr().out
    for option in ("--out", "--preset", "--epochs", "--rank", "KERAS_BACKEND"):
        assert option in out
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert "keras-lora 0." in capsys.readouterr().out


def test_python_m_keras_lora(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["keras_lora", "demo", "--epochs", "0"])
    with pytest.raises(SystemExit) as error:
        runpy.run_module("keras_lora", run_name="__main__")
    assert error.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_console_script(tmp_path):
    """The installed `keras-lora` command: a bad option of a command is one
    usage line, not a traceback (`merge` parses without importing Keras: a
    subprocess of a fraction of a second; `demo`'s options import it)."""
    script = os.path.join(os.path.dirname(sys.executable), "keras-lora")
    command = (
        [script] if os.path.exists(script) else [sys.executable, "-m", "keras_lora"]
    )
    out = str(tmp_path / "model.onnx")
    result = subprocess.run(
        [*command, "merge", "base.keras", "a.keras", out, "--format", "onnx2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "--format: invalid choice: 'onnx2'" in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []


HEAVY_MODULES = ("keras", "tensorflow", "jax", "torch", "keras_hub")


def _imported_modules(command):
    """Runs `command` with Python's import log; returns (result, module names)."""
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=120
    )
    # Lines look like "import time:       123 |        456 |   keras.src".
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }
    return result, modules


def _command():
    script = os.path.join(os.path.dirname(sys.executable), "keras-lora")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "keras_lora"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        ["nonsense"],
        *([name, "--help"] for name in ("inspect", "merge", "convert", "analyze")),
    ],
)
def test_help_and_version_do_not_import_keras(argv):
    """Issue 16: `keras-lora --help` took 23 s because it imported Keras and TF."""
    for command in (_command(), [sys.executable, "-m", "keras_lora"]):
        started = time.perf_counter()
        result, modules = _imported_modules([*command, *argv])
        elapsed = time.perf_counter() - started
        print(f"{' '.join([os.path.basename(command[-1]), *argv])}: {elapsed:.2f} s")
        assert result.returncode == (2 if argv == ["nonsense"] else 0), result.stderr
        assert "keras_lora.cli" in modules  # the log is read correctly
        heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY_MODULES)
        assert not heavy, heavy[:5]
