"""`keras_lora.analysis`: the paper's §7 measures on matrices with known answers."""

import keras
import numpy as np
import pytest

import keras_lora
from keras_lora.analysis import (
    amplification_factor,
    effective_rank,
    spectrum,
    subspace_similarity,
)


def _orthonormal(rows, cols, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((rows, cols)))
    return q


# --- subspace_similarity ---------------------------------------------------


def test_identical_subspaces_give_one():
    a = _orthonormal(32, 8) * np.arange(8, 0, -1)  # distinct singular values
    grid = subspace_similarity(a, a)
    assert grid.shape == (8, 8)
    np.testing.assert_allclose(grid, 1.0, atol=1e-12)
    # The same span, other directions inside it: all r directions still agree.
    mixed = a @ np.random.default_rng(1).standard_normal((8, 8))
    assert subspace_similarity(a, mixed, 8, 8) == pytest.approx(1.0)


def test_orthogonal_subspaces_give_zero():
    q = _orthonormal(40, 12)
    grid = subspace_similarity(q[:, :4], q[:, 4:])
    assert grid.shape == (4, 8)
    np.testing.assert_allclose(grid, 0.0, atol=1e-12)


def test_one_shared_direction_gives_one_over_min_i_j():
    q = _orthonormal(50, 11)
    # The shared direction is the strongest of both, so every top-i holds it.
    a1 = q[:, [0, 1, 2, 3]] * [4.0, 3.0, 2.0, 1.0]
    a2 = q[:, [0, 4, 5, 6, 7, 8, 9]] * [9.0, 6, 5, 4, 3, 2, 1]
    grid = subspace_similarity(a1, a2)
    i, j = np.meshgrid(np.arange(1, 5), np.arange(1, 8), indexing="ij")
    np.testing.assert_allclose(grid, 1.0 / np.minimum(i, j), atol=1e-12)
    assert subspace_similarity(a1, a2, 4, 7) == pytest.approx(1 / 4)
    assert subspace_similarity(a1, a2, 1, 1) == pytest.approx(1.0)
    assert subspace_similarity(a1, a2, i=2).shape == (1, 7)


def test_factor_b_uses_the_output_side():
    q_in, q_out = _orthonormal(20, 4), _orthonormal(30, 4, seed=2)
    # keras-lora's B layout, (r, d_out); q_out[:, 0] is the top direction of both.
    b1 = np.diag([2.0, 1.0]) @ q_out[:, :2].T
    b2 = np.diag([2.0, 1.0]) @ q_out[:, [0, 2]].T
    np.testing.assert_allclose(
        subspace_similarity(b1, b2, factor="b"), [[1.0, 1.0], [1.0, 0.5]], atol=1e-9
    )
    # A factors of shape (d_in, r) are read on the input side.
    assert subspace_similarity(q_in[:, :2], q_in[:, 2:], 2, 2) == pytest.approx(0)


def test_random_subspaces_are_near_chance():
    d = 200
    phi = subspace_similarity(_orthonormal(d, 4, 3), _orthonormal(d, 32, 4), 4, 32)
    assert 0.5 * 32 / d < phi < 2 * 32 / d  # expected max(i, j) / d


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(a2=np.ones((9, 2))), "same number of features: 10 != 9"),
        (dict(i=0), "`i` must be an int from 1 to the rank (3)"),
        (dict(j=5), "`j` must be an int from 1 to the rank (2)"),
        (dict(i=1.5), "Received: i=1.5"),
        (dict(factor="c"), "`factor` must be 'a' or 'b'"),
        (dict(a1=np.ones(10)), "at least 2 dimensions"),
        (dict(a1="not a factor"), "`a1` must be an array, a LoRA layer"),
        (dict(a1=np.full((10, 3), np.nan)), "NaN or infinite"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = {"a1": np.eye(10)[:, :3], "a2": np.eye(10)[:, 3:5], **kwargs}
    with pytest.raises(
        ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        subspace_similarity(**args)


# --- real layers, models and adapter files ---------------------------------

D_IN, D_OUT = 6, 5


def _known_update_model():
    """A Dense layer whose W and ΔW have known singular directions and values.

    W = P·diag(10, 5, 1, 0.5, 0.1)·Qᵀ. ΔW = s·A·B = 2·p₃q₃ᵀ + 1·p₄q₄ᵀ (s = 2): its
    top-2 directions are W's 3rd and 4th, so UᵀWV = diag(1, 0.5), and the
    amplification is ‖ΔW‖/‖UᵀWV‖ = √5 / √1.25 = 2.
    """
    p, q = _orthonormal(D_IN, D_IN, 5), _orthonormal(D_OUT, D_OUT, 6)
    kernel = p[:, :D_OUT] @ np.diag([10.0, 5.0, 1.0, 0.5, 0.1]) @ q.T
    inputs = keras.Input((D_IN,))
    outputs = keras.layers.Dense(D_OUT, name="proj")(inputs)
    model = keras.Model(inputs, outputs, name="known")
    model.get_layer("proj").kernel.assign(kernel.astype("float32"))
    keras_lora.enable_lora(model, rank=2, alpha=4.0, targets=["proj"])
    layer = model.get_layer("proj")
    layer.lora_a.assign(p[:, 2:4].astype("float32"))
    layer.lora_b.assign((np.diag([1.0, 0.5]) @ q[:, 2:4].T).astype("float32"))
    return model


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    """The model above, its adapter file and its base model file."""
    folder = tmp_path_factory.mktemp("analysis")
    model = _known_update_model()
    keras_lora.save_adapter(model, folder / "known.adapter.keras")
    base = _known_update_model()
    keras_lora.merge_lora(base)
    base.get_layer("proj").kernel.assign(
        keras.ops.convert_to_numpy(model.get_layer("proj").kernel)
    )
    base.save(folder / "base.keras")
    return model, folder / "known.adapter.keras", base, folder / "base.keras"


def _check_known(result):
    assert result["layer"] == "proj" and result["rank"] == 2
    assert result["amplification"] == pytest.approx(2.0, rel=1e-5)
    assert result["delta_norm"] == pytest.approx(np.sqrt(5.0), rel=1e-5)
    assert result["projection_norm"] == pytest.approx(np.sqrt(1.25), rel=1e-5)
    assert result["kernel_norm"] == pytest.approx(np.sqrt(126.26), rel=1e-5)
    assert result["kernel_top_projection_norm"] == pytest.approx(np.sqrt(125), rel=1e-5)
    assert 0 < result["random_projection_norm"] < result["kernel_top_projection_norm"]


def test_amplification_of_a_constructed_update(known):
    model, adapter_file, base, base_file = known
    _check_known(amplification_factor(model, "proj"))
    _check_known(amplification_factor(str(adapter_file), "proj", base=base))
    _check_known(amplification_factor(adapter_file, "proj", base=base_file))


def test_spectrum_and_effective_rank(known):
    model, adapter_file, _, _ = known
    for source in (model, adapter_file, model.get_layer("proj"), (model, "proj")):
        values = spectrum(source)
        assert list(values) == ["proj"]
        np.testing.assert_allclose(values["proj"], [2.0, 1.0], rtol=1e-5)
    assert effective_rank([1.0, 1.0, 1.0]) == pytest.approx(3.0)
    assert effective_rank([1.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert effective_rank([0.0, 0.0]) == 0.0


def test_layers_models_and_files_give_the_arrays_answer(known):
    model, adapter_file, _, _ = known
    layer = model.get_layer("proj")
    a = keras.ops.convert_to_numpy(layer.lora_a)
    expected = subspace_similarity(a, a[:, :1] + a[:, 1:] * 0.3)
    other = a[:, :1] + a[:, 1:] * 0.3
    for source in (layer, (model, "proj"), (str(adapter_file), "proj")):
        np.testing.assert_allclose(subspace_similarity(source, other), expected)
    b = keras.ops.convert_to_numpy(layer.lora_b)
    np.testing.assert_allclose(
        subspace_similarity((adapter_file, "proj"), b, factor="b"), 1.0, atol=1e-6
    )


def test_einsum_kernel_is_read_in_the_updates_layout():
    """A kernel whose axes are not (input, output) in order: "abc,dce->abde"."""
    inputs = keras.Input((3, 4))
    layer = keras.layers.EinsumDense("abc,dce->abde", (None, 2, 5), name="mix")
    model = keras.Model(inputs, layer(inputs))
    keras_lora.enable_lora(model, rank=2, targets=["mix"])
    rng = np.random.default_rng(0)
    layer.lora_a.assign(rng.normal(size=layer.lora_a.shape).astype("float32"))
    layer.lora_b.assign(rng.normal(size=layer.lora_b.shape).astype("float32"))
    # W = 3·ΔW laid out like the kernel: UᵀWV = 3·diag(σ), amplification 1/3.
    delta = keras.ops.convert_to_numpy(layer.merged_kernel() - layer.kernel)
    layer.kernel.assign(3 * delta)
    result = amplification_factor(model, "mix")
    assert result["amplification"] == pytest.approx(1 / 3, rel=1e-4)
    assert result["delta_norm"] == pytest.approx(np.linalg.norm(delta), rel=1e-4)


def test_errors_name_what_is_wrong(known):
    model, adapter_file, _, _ = known
    with pytest.raises(ValueError, match="`base` is required with an adapter file"):
        amplification_factor(str(adapter_file), "proj")
    with pytest.raises(ValueError, match="no layer with path 'nope'"):
        amplification_factor(model, "nope")
    with pytest.raises(ValueError, match="has no adapted layer 'nope'"):
        subspace_similarity((adapter_file, "nope"), np.ones((D_IN, 2)))
    with pytest.raises(ValueError, match="not a readable keras-lora adapter|not found"):
        spectrum("missing.adapter.keras")
    with pytest.raises(ValueError, match="names layers that are not adapted"):
        spectrum(model, layers=["proj", "other"])


def test_plots_write_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    from keras_lora.analysis import plot_similarity, plot_spectrum

    grid = subspace_similarity(_orthonormal(30, 4), _orthonormal(30, 8, 1))
    path = plot_similarity({"q": grid, "v": grid}, tmp_path / "phi.png", title="φ")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    path = plot_spectrum({"q": [3.0, 1.0, 0.1]}, tmp_path / "s.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="2-D arrays"):
        plot_similarity({"q": np.ones(3)}, tmp_path / "bad.png")
