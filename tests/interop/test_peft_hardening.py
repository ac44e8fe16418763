"""PEFT adapters from hostile or broken folders (issue 10, items 6-8).

Every file is crafted here, byte by byte where the point is a malformed
`.safetensors` file; no torch, transformers or peft is needed. The reader is
checked against the `safetensors` package itself: it must refuse exactly
what the package refuses, with a `ValueError` that names the file and the
field, and a failed load must leave the model exactly as it was.
"""

import json
import os
import pickle
import stat
import struct
import time
import tracemalloc

import keras
import numpy as np
import pytest

import keras_lora
from keras_lora import transform
from keras_lora.interop import safetensors_io

keras_hub = pytest.importorskip("keras_hub")
safetensors = pytest.importorskip("safetensors")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from helpers import tiny_llama3_backbone, to_numpy  # noqa: E402

Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"
F32 = np.arange(4, dtype="<f4").tobytes()


def safetensors_bytes(header, body=b"", header_size=None, raw_header=None):
    """A `.safetensors` file: 8-byte length, JSON header, data (as given)."""
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    size = len(text) if header_size is None else header_size
    return struct.pack("<Q", size) + text + body


def tensor(dtype="F32", shape=(2, 2), offsets=(0, 16)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def q_proj_factors(rank=2):
    rng = np.random.default_rng(0)
    return {
        f"{Q_PROJ}.lora_A.weight": rng.normal(size=(rank, 32)).astype("float32"),
        f"{Q_PROJ}.lora_B.weight": rng.normal(size=(32, rank)).astype("float32"),
    }


def write_adapter(folder, config=None, weights=None):
    """A PEFT folder; `weights`: bytes for the safetensors file, or tensors."""
    os.makedirs(folder, exist_ok=True)
    if isinstance(config, (bytes, str)):
        data = config if isinstance(config, bytes) else config.encode()
    else:
        full = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, **(config or {})}
        data = json.dumps(full).encode()
    (folder / "adapter_config.json").write_bytes(data)
    file = folder / "adapter_model.safetensors"
    if isinstance(weights, bytes):
        file.write_bytes(weights)
    else:
        safetensors_io.write(file, q_proj_factors() if weights is None else weights)
    return folder


def tiny_llama():
    return tiny_llama3_backbone()


@pytest.fixture(scope="module")
def llama(one_torch_thread):
    return tiny_llama()


def model_state(model):
    """Everything a failed load must leave as it was."""
    from keras_lora import targets

    layers = [
        (layer.path, type(layer), layer.trainable) for layer in targets.sublayers(model)
    ]
    weights = [(v.path, v.trainable, to_numpy(v)) for v in model.weights]
    return model.trainable, type(model), layers, weights


def assert_same_state(before, after):
    assert before[:3] == after[:3]
    assert [w[:2] for w in before[3]] == [w[:2] for w in after[3]]
    for (path, _, old), (_, _, new) in zip(before[3], after[3]):
        np.testing.assert_array_equal(old, new, err_msg=path)


def assert_refused(model, folder, file, field):
    """Loading raises a ValueError naming the file and field; nothing changes."""
    before = model_state(model)
    try:
        keras_lora.load_peft_adapter(model, folder)
    except ValueError as error:
        message = str(error)
    else:
        transform.revert(model, merge=False)  # the next test's model is clean
        pytest.fail(f"'{folder}' loaded")
    assert file in message and field in message, message
    assert_same_state(before, model_state(model))
    return message


# Item 7: exactly as strict as the safetensors package.

# (name, file bytes, field the message must name)
MALFORMED = [
    (
        "overlapping offsets",
        safetensors_bytes(
            {"a": tensor(), "b": tensor(shape=[2], offsets=[8, 16])}, F32
        ),
        "data_offsets",
    ),
    (
        "gap between tensors",
        safetensors_bytes(
            {
                "a": tensor(shape=[2], offsets=[0, 8]),
                "b": tensor(shape=[1], offsets=[12, 16]),
            },
            F32,
        ),
        "data_offsets",
    ),
    ("trailing bytes", safetensors_bytes({"a": tensor()}, F32 + b"xx"), "data_offsets"),
    ("truncated data", safetensors_bytes({"a": tensor()}, F32[:12]), "data_offsets"),
    (
        "__metadata__ a list",
        safetensors_bytes({"__metadata__": ["x"], "a": tensor()}, F32),
        "__metadata__",
    ),
    (
        "__metadata__ value not a string",
        safetensors_bytes({"__metadata__": {"x": 1}, "a": tensor()}, F32),
        "__metadata__",
    ),
    ("header a list", safetensors_bytes([1, 2]), "header"),
    ("header a string", safetensors_bytes("abc"), "header"),
    (
        "float offsets",
        safetensors_bytes({"a": tensor(offsets=[0.0, 16])}, F32),
        "data_offsets",
    ),
    (
        "string offsets",
        safetensors_bytes({"a": tensor(offsets=["0", 16])}, F32),
        "data_offsets",
    ),
    (
        "three offsets",
        safetensors_bytes({"a": tensor(offsets=[0, 16, 16])}, F32),
        "data_offsets",
    ),
    ("float shape", safetensors_bytes({"a": tensor(shape=[2.0, 2])}, F32), "shape"),
    ("string shape", safetensors_bytes({"a": tensor(shape="22")}, F32), "shape"),
    ("negative shape", safetensors_bytes({"a": tensor(shape=[-2, -2])}, F32), "shape"),
    ("shape vs offsets", safetensors_bytes({"a": tensor(shape=[3])}, F32), "shape"),
    ("unknown dtype", safetensors_bytes({"a": tensor(dtype="F33")}, F32), "dtype"),
    ("entry not an object", safetensors_bytes({"a": [1]}, F32), "tensor 'a'"),
    ("header not JSON", safetensors_bytes(None, F32, raw_header=b"{nope"), "header"),
    (
        "header length over 100 MB",
        safetensors_bytes({"a": tensor()}, F32, header_size=200_000_000),
        "header length",
    ),
    (
        "header length past the end",
        safetensors_bytes({"a": tensor()}, F32, header_size=1000),
        "header length",
    ),
    ("shorter than 8 bytes", b"\x01\x02", "8-byte header length"),
]


@pytest.mark.parametrize(
    "data, field", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_reader_refuses_what_safetensors_refuses(tmp_path, data, field):
    file = tmp_path / "x.safetensors"
    file.write_bytes(data)
    with pytest.raises(safetensors.SafetensorError):
        safetensors_numpy.load_file(file)  # the library's own verdict
    with pytest.raises(ValueError) as info:
        safetensors_io.read(file)
    assert str(file) in str(info.value) and field in str(info.value)


# Files the package accepts, though a hand-written reader might not.
VALID = {
    "null __metadata__": safetensors_bytes({"__metadata__": None, "a": tensor()}, F32),
    "no tensors": safetensors_bytes({}),
    "empty tensor last": safetensors_bytes(
        {"a": tensor(), "z": tensor(shape=[0], offsets=[16, 16])}, F32
    ),
    "unknown key in an entry": safetensors_bytes({"a": {**tensor(), "extra": 1}}, F32),
    "padded header": safetensors_bytes(
        None, F32, raw_header=json.dumps({"a": tensor()}).encode() + b"   "
    ),
}


@pytest.mark.parametrize("data", VALID.values(), ids=list(VALID))
def test_reader_accepts_what_safetensors_accepts(tmp_path, data):
    file = tmp_path / "x.safetensors"
    file.write_bytes(data)
    expected = safetensors_numpy.load_file(file)
    tensors, _ = safetensors_io.read(file)
    assert sorted(tensors) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(tensors[name], value)


def test_reader_widens_bf16_exactly(tmp_path):
    """NumPy has no bf16: the one tensor type read by hand, after the
    package has checked the file."""
    values = np.array([1.5, -2.0, 3.140625, 0.0], "float32")
    bf16 = (values.view("<u4") >> 16).astype("<u2").tobytes()
    file = tmp_path / "x.safetensors"
    file.write_bytes(
        safetensors_bytes(
            {"__metadata__": {"format": "pt"}, "b": tensor("BF16", [2, 2], [0, 8])},
            bf16,
        )
    )
    tensors, metadata = safetensors_io.read(file)
    assert metadata == {"format": "pt"}
    np.testing.assert_array_equal(tensors["b"], values.reshape(2, 2))
    assert tensors["b"].dtype == np.float32


def test_reader_checks_sizes_before_reading_data(tmp_path):
    """A 1 GiB (sparse) file with a bad header, and a tiny file declaring a
    4 TiB tensor, are refused without reading or allocating their data."""
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:
        f.write(safetensors_bytes({"a": tensor()}, F32))
        f.truncate(2**30)  # trailing bytes: invalid
    bomb = tmp_path / "bomb.safetensors"
    bomb.write_bytes(
        safetensors_bytes({"a": tensor(shape=[2**40], offsets=[0, 2**42])}, F32)
    )
    tracemalloc.start()
    try:
        for file in (big, bomb):
            with pytest.raises(ValueError, match="data_offsets"):
                safetensors_io.read(file)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_adapter_larger_than_the_model_is_refused_unread(llama, tmp_path):
    """A valid file too large for any adapter of this model (the real attack
    needs a big file; the check runs on declared sizes, before reading)."""
    values = 3 * llama.count_params() + 1
    weights = {**q_proj_factors(), "base_model.model.extra": np.zeros(values, "f2")}
    folder = write_adapter(tmp_path, {}, weights)
    assert_refused(llama, folder, "adapter_model.safetensors", f"holds {values + 128}")


# Item 8: every malformed adapter is one ValueError naming file and field.

CONFIGS = [
    ({"r": "8"}, "r"),
    ({"lora_alpha": "16"}, "lora_alpha"),
    ({"r": 10**400}, "r"),
    ({"lora_dropout": "0.1"}, "lora_dropout"),
    ({"use_rslora": "yes"}, "use_rslora"),
    ({"target_modules": "(q_proj"}, "target_modules"),
    ({"target_modules": ["q_proj", 3]}, "target_modules"),
    ({"target_modules": {"q_proj": 1}}, "target_modules"),
    ({"exclude_modules": "[k"}, "exclude_modules"),
    ({"rank_pattern": {"q_(proj": 2}}, "rank_pattern"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern"),
    ({"rank_pattern": {"q_proj": "2"}}, "rank_pattern"),
    ({"alpha_pattern": {"*q": 2}}, "alpha_pattern"),
    ({"modules_to_save": ["head("]}, "modules_to_save"),
    ({"modules_to_save": "lm_head"}, "modules_to_save"),
    ({"layers_to_transform": "0", "target_modules": ["q_proj"]}, "layers_to_transform"),
    ({"layers_pattern": "layers(", "target_modules": ["q_proj"]}, "layers_pattern"),
    ({"layers_pattern": "(?P<idx>x)"}, "layers_pattern"),
]


@pytest.mark.parametrize(
    "config, field", CONFIGS, ids=[f"{f}={c[f]!r}"[:40] for c, f in CONFIGS]
)
def test_config_fields_are_checked(llama, tmp_path, config, field):
    folder = write_adapter(tmp_path, config)
    assert_refused(llama, folder, "adapter_config.json", f"`{field}")


@pytest.mark.parametrize(
    "text, what",
    [
        ("[1, 2]", "JSON object"),
        ("{nope", "JSON"),
        (b"\xff\xfe{}", "UTF-8"),
        ("[" * 100_000 + "]" * 100_000, "JSON"),  # RecursionError in json
    ],
    ids=["list", "not JSON", "not UTF-8", "deeply nested"],
)
def test_config_file_is_checked(llama, tmp_path, text, what):
    folder = write_adapter(tmp_path, text)
    assert_refused(llama, folder, "adapter_config.json", what)


def test_config_file_size_is_bounded(llama, tmp_path, monkeypatch):
    from keras_lora.interop import peft_reading

    monkeypatch.setattr(peft_reading, "MAX_CONFIG_BYTES", 1000)
    folder = write_adapter(tmp_path, {"notes": "x" * 2000})
    assert_refused(llama, folder, "adapter_config.json", "size=")


@pytest.mark.parametrize(
    "data, field",
    [
        (safetensors_bytes([1, 2]), "header"),
        (safetensors_bytes("abc"), "header"),
        (safetensors_bytes({"a": tensor(offsets=[0.5, 16])}, F32), "data_offsets"),
        (safetensors_bytes({"a": tensor(shape=["2", 2])}, F32), "shape"),
        (safetensors_bytes({"a": tensor(shape=[-4])}, F32), "shape"),
    ],
    ids=["header list", "header string", "float offsets", "string shape", "negative"],
)
def test_weights_file_errors_name_file_and_field(llama, tmp_path, data, field):
    folder = write_adapter(tmp_path, {}, data)
    assert_refused(llama, folder, "adapter_model.safetensors", field)


def test_integer_factors_are_refused(llama, tmp_path):
    weights = {k: v.astype("int32") for k, v in q_proj_factors().items()}
    folder = write_adapter(tmp_path, {}, weights)
    assert_refused(llama, folder, "adapter_model.safetensors", "dtype=int32")


def test_path_must_be_a_path(llama, adapted):
    for bad in (None, 3, ["folder"]):
        with pytest.raises(ValueError, match="`path` must be a folder path"):
            keras_lora.load_peft_adapter(llama, bad)
        with pytest.raises(ValueError, match="`path` must be a folder path"):
            keras_lora.save_peft_adapter(adapted, bad)


class _Marker:
    """Unpickling this writes a file: proof that a pickle was (not) loaded."""

    path = None

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_adapters_are_never_loaded(llama, tmp_path):
    marker = tmp_path / "pickle-ran"
    _Marker.path = str(marker)
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Marker()))
    message = assert_refused(llama, folder, "adapter_model.safetensors", "pickle")
    assert "safe_serialization=True" in message
    assert not marker.exists()


# load_peft_adapter: all or nothing, even when assigning fails.


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_failure_while_assigning_leaves_model_as_it_was(
    llama, tmp_path, monkeypatch, error
):
    folder = write_adapter(tmp_path, {"target_modules": ["q_proj"]})
    llama.get_layer("token_embedding").trainable = False  # the user's choice
    optimizer = keras.optimizers.Adam()
    llama.compile(optimizer=optimizer, loss="mse")
    optimizer.build(llama.trainable_variables)  # as after `fit`: it has state
    before = model_state(llama)
    variable_class = type(llama.weights[0])
    original = variable_class.assign

    def assign(self, value):
        if "lora_b" in self.path:
            raise error("disk gone")
        return original(self, value)

    monkeypatch.setattr(variable_class, "assign", assign)
    try:
        with pytest.raises(error, match="disk gone"):
            keras_lora.load_peft_adapter(llama, folder)
    finally:
        monkeypatch.undo()
    assert not keras_lora.lora_layers(llama)
    assert_same_state(before, model_state(llama))
    assert llama.optimizer is optimizer
    llama.get_layer("token_embedding").trainable = True


# Item 6: save_peft_adapter's modes, symlinks, and nothing half written.


@pytest.fixture(scope="module")
def adapted(one_torch_thread):
    backbone = tiny_llama()
    keras_lora.enable_lora(backbone, rank=2, targets=["query"])
    return backbone


def _mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_saved_folder_has_the_mode_makedirs_gives(adapted, tmp_path, umask):
    old = os.umask(umask)
    try:
        os.makedirs(tmp_path / "reference")
        keras_lora.save_peft_adapter(adapted, tmp_path / "a" / "adapter")
    finally:
        os.umask(old)
    folder = tmp_path / "a" / "adapter"
    assert _mode(folder) == _mode(tmp_path / "reference") == 0o777 & ~umask
    assert _mode(tmp_path / "a") == 0o777 & ~umask
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert _mode(folder / name) == 0o666 & ~umask, name


def test_existing_modes_and_symlinks_are_kept(adapted, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    os.chmod(folder, 0o750)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(b"old")
    os.chmod(weights, 0o600)
    real_config = tmp_path / "elsewhere" / "config.json"
    real_config.parent.mkdir()
    real_config.write_text("old")
    os.chmod(real_config, 0o640)
    os.symlink(real_config, folder / "adapter_config.json")

    keras_lora.save_peft_adapter(adapted, folder)
    assert _mode(folder) == 0o750
    assert _mode(weights) == 0o600
    assert os.path.islink(folder / "adapter_config.json")
    assert _mode(real_config) == 0o640
    assert json.loads(real_config.read_text())["peft_type"] == "LORA"
    assert safetensors_io.read(weights)[0]  # the new factors
    # No temporary file left beside either.
    assert sorted(os.listdir(folder)) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert os.listdir(real_config.parent) == ["config.json"]


def test_failed_save_writes_nothing(adapted, tmp_path, monkeypatch):
    from keras_lora.interop import peft_writing

    def failing_write(path, tensors, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(peft_writing.safetensors_io, "write", failing_write)
    with pytest.raises(OSError, match="No space"):
        keras_lora.save_peft_adapter(adapted, tmp_path / "new")
    assert os.listdir(tmp_path) == []

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "adapter_config.json").write_text("old config")
    (existing / "adapter_model.safetensors").write_text("old weights")
    with pytest.raises(OSError, match="No space"):
        keras_lora.save_peft_adapter(adapted, existing)
    assert sorted(os.listdir(existing)) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (existing / "adapter_config.json").read_text() == "old config"
    assert (existing / "adapter_model.safetensors").read_text() == "old weights"


def test_catastrophic_patterns_are_matched_under_a_time_bound(llama, tmp_path):
    """Issue 21 item 6: `keras-lora convert` of this folder ran for hours."""
    from test_hardening_round2 import RUN, crafted_peft_folder

    module = RUN + ".model.layers.0.self_attn.q_proj"  # ends in a known module
    folder = crafted_peft_folder(tmp_path / "peft", module)
    before = model_state(llama)
    start = time.perf_counter()
    with pytest.raises(ValueError, match="adapter_config.json.*nested repetition"):
        keras_lora.load_peft_adapter(llama, folder)
    assert time.perf_counter() - start < 2
    assert_same_state(before, model_state(llama))


def test_catastrophic_target_modules_are_matched_under_a_time_bound(llama, tmp_path):
    """Issue 21 item 6: the other regular expressions meet the folder's names too."""
    from test_hardening_round2 import RUN, crafted_peft_folder

    module = RUN + ".model.layers.0.self_attn.q_proj"
    folder = crafted_peft_folder(tmp_path / "peft", module)
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["rank_pattern"], config["alpha_pattern"]
    config["target_modules"] = "(a|aa)+b"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="nested repetition"):
        keras_lora.load_peft_adapter(llama, folder)
    assert time.perf_counter() - start < 2


def test_interrupted_load_leaves_the_model_as_it_was(llama, tmp_path):
    """Issue 21 item 3: a KeyboardInterrupt at each step of the load."""
    from test_hardening_round2 import interrupt_each_step

    folder = write_adapter(tmp_path, {"target_modules": ["q_proj"]})
    # Every 10th of its steps: each try reads and checks the folder again.
    steps = interrupt_each_step(
        llama, lambda: keras_lora.load_peft_adapter(llama, folder), stride=10
    )
    assert steps > 100
    assert len(keras_lora.lora_layers(llama)) == 1
    keras_lora.delete_adapter(llama, "default")  # the module's model, unchanged
