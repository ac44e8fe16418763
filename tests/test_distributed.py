"""LoRA past one device: factor layouts, and each backend's own engine.

The layout rules (`keras_lora/layers/layouts.py`) are checked in this process
under every backend: they only read a layout map and build `TensorLayout`s.
Each backend's run then trains on its own engine in subprocesses (a fresh
process is the only way to get 8 virtual JAX devices, 2 logical TensorFlow
CPUs or a gloo group), against one-device training on the same global batch:

- jax: `DataParallel` and `ModelParallel` on 8 devices (GPT-2 with a
  hand-written layout map, Gemma with `GemmaBackbone.get_layout_map`), and a
  2-process `jax.distributed` data-parallel run;
- tensorflow: `tf.distribute.MirroredStrategy` with `model.fit`;
- torch: `DistributedDataParallel` (gloo, 2 processes) with a custom loop.
"""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_lora
from keras_lora.layers import layouts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tests", "distributed")
sys.path[:0] = [SCRIPTS, ROOT]

import common  # noqa: E402

from benchmarks import distributed as benchmark  # noqa: E402

BACKEND = keras.backend.backend()
# Training on several devices sums gradients in another order: float32 noise.
TOLERANCE = 1e-5
# How far 2 steps must move the factors, so that equal adapters mean something.
MOVED = 1e-3


# ----------------------------------------------------------------------------
# Layout rules, in this process, on every backend.


def model_parallel(entries, shape=(2, 4)):
    """A `ModelParallel` over placeholder devices (only layouts are computed)."""
    devices = [f"cpu:{i}" for i in range(int(np.prod(shape)))]
    mesh = keras.distribution.DeviceMesh(shape, ("batch", "model"), devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    for key, axes in entries.items():
        layout_map[key] = axes
    return keras.distribution.ModelParallel(layout_map=layout_map)


def layouts_of(layer, distribution):
    """(A axes, B axes) that `layer`'s factors get under `distribution`."""
    return tuple(
        layouts.factor_layout(layer, role, factor.path, factor.shape, distribution).axes
        for role, factor in (("lora_a", layer.lora_a), ("lora_b", layer.lora_b))
    )


def built(layer, input_shape):
    layer.build(input_shape)
    return layer


@pytest.mark.parametrize(
    "kernel_axes, expected",
    [
        ((None, "model"), ((None, None), (None, "model"))),
        (("model", None), (("model", None), (None, None))),
        (("batch", "model"), (("batch", None), (None, "model"))),
    ],
)
def test_dense_factors_take_the_kernels_input_and_output_sharding(
    kernel_axes, expected
):
    layer = built(keras_lora.LoRADense(16, rank=4, name="proj"), (None, 8))
    distribution = model_parallel({"proj/kernel": kernel_axes})
    assert layouts_of(layer, distribution) == expected


@pytest.mark.parametrize(
    "equation, output_shape, input_shape, kernel_axes, expected",
    [
        # GPT-2 / BERT query (hidden, heads, head_dim).
        (
            "abc,cde->abde",
            (None, 4, 8),
            (None, 3, 16),
            (None, "model", None),
            ((None, None), (None, "model", None)),
        ),
        # Gemma query (heads, hidden, head_dim), get_layout_map's sharding.
        (
            "btd,ndh->btnh",
            (None, 4, 8),
            (None, 3, 16),
            ("model", "batch", None),
            (("batch", None), (None, "model", None)),
        ),
        # Gemma attention output (heads, head_dim, hidden).
        (
            "btnh,nhd->btd",
            (None, 16),
            (None, 3, 4, 8),
            ("model", None, "batch"),
            (("model", None, None), (None, "batch")),
        ),
        # A group axis (in input and output) keeps its sharding in both.
        (
            "abc,bcd->abd",
            (4, 8),
            (None, 4, 16),
            ("model", None, None),
            (("model", None, None), ("model", None, None)),
        ),
    ],
)
def test_einsum_factors_follow_the_kernel_in_any_axis_order(
    equation, output_shape, input_shape, kernel_axes, expected
):
    layer = built(
        keras_lora.LoRAEinsumDense(equation, output_shape, rank=4, name="query"),
        input_shape,
    )
    distribution = model_parallel({".*query/kernel": kernel_axes})
    assert layouts_of(layer, distribution) == expected


def test_embedding_factors_follow_the_table():
    layer = built(
        keras_lora.LoRAEmbedding(64, 16, rank=4, name="token_embedding"), None
    )
    distribution = model_parallel({"token_embedding/embeddings": ("model", "batch")})
    assert layouts_of(layer, distribution) == (("model", None), (None, "batch"))


def test_axis_that_does_not_divide_is_replicated_not_an_error():
    # A model built before the distribution: its 6-row kernel could not be
    # split 4 ways, and neither can A's rows; B's 16 columns can.
    layer = built(keras_lora.LoRADense(16, rank=2, name="proj"), (None, 6))
    distribution = model_parallel({"proj/kernel": ("model", "batch")})
    assert layouts_of(layer, distribution) == ((None, None), (None, "batch"))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_base_factors_follow_the_kernel_path(mode):
    # The int8 (or packed int4) kernel keeps the float kernel's path, so the
    # layout map's kernel entry still places the factors.
    layer = keras.layers.Dense(16, name="proj")
    layer.build((None, 8))
    layer.quantize(mode)
    keras_lora.LoRADense.adapt(layer, rank=4)
    distribution = model_parallel({"proj/kernel": ("model", "batch")})
    assert layouts_of(layer, distribution) == (("model", None), (None, "batch"))


def test_layout_map_entry_naming_a_factor_wins():
    layer = built(keras_lora.LoRADense(16, rank=4, name="proj"), (None, 8))
    distribution = model_parallel(
        {
            "proj/kernel": (None, "model"),
            ".*proj/lora_a": ("model", None),
            # A broad key that does not name a factor is not applied to one
            # (keras issue 19496: such keys gave factors the kernel's layout).
            ".*proj.*": (None, None),
        }
    )
    assert layouts_of(layer, distribution) == (("model", None), (None, "model"))


def test_two_layout_map_entries_naming_one_factor_raise():
    layer = built(keras_lora.LoRADense(16, rank=4, name="proj"), (None, 8))
    distribution = model_parallel(
        {".*lora_a": ("model", None), ".*proj/lora.*": (None, None)}
    )
    with pytest.raises(ValueError, match="proj/lora_a"):
        layouts_of(layer, distribution)


def test_factor_layout_rejects_an_unknown_role():
    layer = built(keras_lora.LoRADense(16, rank=4, name="proj"), (None, 8))
    with pytest.raises(ValueError, match="role='kernel'"):
        layouts.factor_layout(
            layer, "kernel", "proj/kernel", (8, 16), model_parallel({})
        )


@pytest.mark.skipif(BACKEND != "torch", reason="torch parameters only exist on torch")
def test_torch_parameters_list_the_factors_after_enable_and_merge():
    model = common.adapted_mlp()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == [
        "_torch_params.head/lora_a",
        "_torch_params.head/lora_b",
        "_torch_params.hidden/lora_a",
        "_torch_params.hidden/lora_b",
    ]
    keras_lora.merge_lora(model)
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if "lora" in n]
    assert "_torch_params.hidden/kernel" in names


def test_benchmark_reads_all_reduced_bytes_from_hlo():
    hlo = """
  %p = f32[16,8]{1,0} parameter(0)
  %all-reduce = f32[16,8]{1,0} all-reduce(f32[16,8]{1,0} %p), replica_groups={}
  %ars = (f32[4]{0}, bf16[2,3]{1,0}) all-reduce-start(%a, %b), to_apply=%sum
  %add = f32[16,8]{1,0} add(%all-reduce, %p)
"""
    assert benchmark.all_reduce_bytes(hlo) == 16 * 8 * 4 + 4 * 4 + 2 * 3 * 2


# ----------------------------------------------------------------------------
# Each backend's engine, in subprocesses.


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def script_env(**extra):
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, KERAS_BACKEND=BACKEND)
    env.pop("XLA_FLAGS", None)  # each script chooses its own devices
    env.update(extra)
    return env


def facts_of(output):
    lines = [line for line in output.splitlines() if line.startswith("FACTS ")]
    assert lines, f"No FACTS line in the script's output:\n{output[-4000:]}"
    return json.loads(lines[-1][len("FACTS ") :])


def run_script(name, *args, timeout=400, **extra_env):
    """Runs tests/distributed/<name> and returns the facts it printed."""
    result = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, name), *map(str, args)],
        env=script_env(**extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{name} failed:\n{output[-6000:]}"
    return facts_of(result.stdout)


def trained_reference():
    """The adapted MLP trained in this process on the whole global batch."""
    reference = common.fit(common.adapted_mlp(), common.mlp_data())
    return reference, common.factors(common.adapted_mlp())


GPT2_LAYER = "transformer_layer_0/"
GPT2_FACTOR_SPECS = {
    GPT2_LAYER + "self_attention/query/lora_a": [None, None],
    GPT2_LAYER + "self_attention/query/lora_b": [None, "model", None],
    # The layout map's own entry for this factor wins over the derived one.
    GPT2_LAYER + "self_attention/value/lora_a": ["model", None],
    GPT2_LAYER + "self_attention/value/lora_b": [None, "model", None],
    GPT2_LAYER + "feedforward_intermediate_dense/lora_a": [None, None],
    GPT2_LAYER + "feedforward_intermediate_dense/lora_b": [None, "model"],
    GPT2_LAYER + "feedforward_output_dense/lora_a": ["model", None],
    GPT2_LAYER + "feedforward_output_dense/lora_b": [None, None],
    "token_embedding/lora_a": ["model", None],
    "token_embedding/lora_b": [None, None],
}
GEMMA_LAYER = "decoder_block_0/"
GEMMA_FACTOR_SPECS = {
    GEMMA_LAYER + "attention/query/lora_a": ["batch", None],
    GEMMA_LAYER + "attention/query/lora_b": [None, "model", None],
    GEMMA_LAYER + "attention/value/lora_a": ["batch", None],
    GEMMA_LAYER + "attention/value/lora_b": [None, "model", None],
    GEMMA_LAYER + "ffw_gating/lora_a": ["batch", None],
    GEMMA_LAYER + "ffw_gating/lora_b": [None, "model"],
    GEMMA_LAYER + "ffw_linear/lora_a": ["model", None],
    GEMMA_LAYER + "ffw_linear/lora_b": [None, "batch"],
    "token_embedding/lora_a": ["model", None],
    "token_embedding/lora_b": [None, "batch"],
}


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
def test_jax_data_and_model_parallel_on_8_devices(tmp_path):
    facts = run_script(
        "jax_single_host.py",
        tmp_path,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
    )
    assert facts["devices"] == 8
    # DataParallel: every factor replicated; the same adapter as one device.
    assert facts["dp_specs"] == {
        k: [None] * len(v) for k, v in GPT2_FACTOR_SPECS.items()
    }
    assert facts["dp_difference"] < TOLERANCE
    # ModelParallel, LoRA added after the model was built under it.
    assert facts["mp_specs"] == GPT2_FACTOR_SPECS
    assert facts["mp_slot_specs"] == GPT2_FACTOR_SPECS
    assert facts["mp_difference"] < TOLERANCE
    assert facts["mp_moved"] > MOVED
    # Adapter files and full models come back with values and layouts.
    assert facts["load_adapter_difference"] == 0.0
    assert facts["load_adapter_specs"] == GPT2_FACTOR_SPECS
    # A named adapter's factors (`lora_a_second`, ...) follow the kernels too;
    # the map's `.*value/lora_a` key does not name them.
    named = {
        path.replace("lora_a", "lora_a_second").replace("lora_b", "lora_b_second"): axes
        for path, axes in GPT2_FACTOR_SPECS.items()
    }
    named[GPT2_LAYER + "self_attention/value/lora_a_second"] = [None, None]
    assert facts["named_adapter_specs"] == named
    assert facts["load_model_difference"] == 0.0
    assert facts["load_model_specs"] == GPT2_FACTOR_SPECS
    assert facts["load_model_slot_specs"] == GPT2_FACTOR_SPECS
    assert facts["resume_difference"] < TOLERANCE
    # Exported and merged models compute what the adapted one did; merging
    # in place keeps every kernel's layout.
    assert facts["export_difference"] < TOLERANCE
    assert facts["merge_lora_difference"] < TOLERANCE
    assert facts["merged_kernel_specs"] == facts["mp_kernel_specs"]
    # Gemma under KerasHub's own layout map.
    assert facts["gemma_specs"] == GEMMA_FACTOR_SPECS
    assert facts["gemma_difference"] < TOLERANCE


@pytest.mark.skipif(BACKEND != "jax", reason="jax.distributed is JAX's")
def test_jax_two_processes_data_parallel_equals_one_process(tmp_path):
    port = free_port()
    script = os.path.join(SCRIPTS, "jax_multi_process.py")
    processes = [
        subprocess.Popen(
            [sys.executable, script, str(i), "2", str(port), str(tmp_path)],
            env=script_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=300)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-6000:]
        assert facts_of(output)["global_devices"] == 2
    reference, untrained = trained_reference()
    distributed = common.factors(
        keras_lora.load_adapter(common.adapted_mlp(seed=3), tmp_path / "adapter.keras")
    )
    assert common.max_difference(distributed, reference) < TOLERANCE
    assert common.max_difference(reference, untrained) > MOVED


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute is TensorFlow's")
def test_tf_mirrored_strategy_fit_equals_one_device(tmp_path):
    facts = run_script("tf_mirrored.py", tmp_path)
    assert facts["replicas"] == 2
    assert facts["factor_variable"] == "MirroredVariable"
    assert facts["difference"] < TOLERANCE
    assert facts["saved_difference"] < TOLERANCE
    assert facts["moved"] > MOVED


@pytest.mark.skipif(BACKEND != "torch", reason="DistributedDataParallel is torch's")
def test_torch_ddp_two_gloo_processes_equals_one_process(tmp_path):
    facts = run_script("torch_ddp.py", free_port(), tmp_path)
    assert facts["trained_parameters"] == [
        "_torch_params.head/lora_a",
        "_torch_params.head/lora_b",
        "_torch_params.hidden/lora_a",
        "_torch_params.hidden/lora_b",
    ]
    assert facts["difference"] < TOLERANCE
    assert facts["moved"] > MOVED
