import os
import sys

import keras
import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    # No `keras.backend.clear_session()` here: it costs ~0.5 s per test (a full
    # garbage collection) and the tests name the layers they look up.
    keras.utils.set_random_seed(1234)
    yield


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
