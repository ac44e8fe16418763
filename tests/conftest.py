import ctypes
import ctypes.util
import gc
import os
import sys

import keras
import pytest

sys.path.insert(0, os.path.dirname(__file__))


def _pin_float32_on_gpus():
    """Full float32 matmuls and convolutions when the tests run on a GPU.

    The tests compare layers with float64 NumPy references (and merged with
    unmerged models) at about 1e-5. On Ampere and later GPUs cuDNN runs
    float32 convolutions in TF32 by default (10 mantissa bits: errors near
    1e-3), which failed the conv tests on an H200 (issue 24). Pinning the
    precision keeps the references exact; the GPU benchmark keeps the
    defaults. Nothing changes on a CPU.
    """
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
    elif backend == "jax":
        import jax

        if jax.default_backend() == "gpu":
            jax.config.update("jax_default_matmul_precision", "highest")


_pin_float32_on_gpus()

# A test may grow the process by this much before the tests' memory is freed
# at its end (a full collection costs ~0.5 s, so not after every test).
FREE_MEMORY_ABOVE_MB = 1024


@pytest.fixture(autouse=True)
def _seed():
    # No `keras.backend.clear_session()` here: it costs ~0.5 s per test (a full
    # garbage collection) and the tests name the layers they look up.
    keras.utils.set_random_seed(1234)
    yield
    if _rss_mb() > _memory["after_last_free"] + FREE_MEMORY_ABOVE_MB:
        _free_memory()


@pytest.fixture(autouse=True, scope="module")
def _free_memory_between_modules():
    """Frees what a test module left: models, compiled functions, Keras state.

    Measured on the whole suite (jax, 2 cores): without it one pytest process
    peaked at 10.9 GB. Keras models are reference cycles, so they outlive their
    test until a full collection; compiled functions (XLA executables, torch
    dynamo caches, TensorFlow kernels) stay cached; and glibc keeps freed
    memory in its arenas unless asked to give it back.
    """
    yield
    keras.backend.clear_session()  # Keras state, backend caches, then gc
    if keras.backend.backend() == "jax":
        import jax

        jax.clear_caches()
    _free_memory()


_memory = {"after_last_free": 0}


def _free_memory():
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)  # return freed heap pages to the system
    _memory["after_last_free"] = _rss_mb()


def _load_libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_libc = _load_libc()  # glibc only: elsewhere memory is freed without trimming


def _rss_mb():
    """Resident memory of this process in MB (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE") // 2**20


@pytest.fixture
def no_openvino_telemetry(monkeypatch):
    """OpenVINO's converter sends telemetry, each event in a subprocess given
    3 s: with no network every OpenVINO export waited about 3 s. Its opt-in
    check declines in CI (`disable_in_ci`), which it reads from `CI`."""
    monkeypatch.setenv("CI", "true")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Runs a module's tests on one torch thread (a no-op on other backends)."""
    if keras.backend.backend() != "torch":
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
