"""What the benchmarks need to know of the device: its name, its peak memory.

On a GPU, a step's time means something only once the device has finished
(every timed function here converts its result to NumPy, which waits), and
its memory is the device's, not the process's RSS: JAX's `memory_stats()`
and `torch.cuda.max_memory_allocated()` report the allocator's peak.
"""

import functools


def _backend():
    import keras

    return keras.backend.backend()


def describe():
    """A short description of the device the backend computes on."""
    backend = _backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return f"jax {jax.__version__} {device.platform}: {device.device_kind}"
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return f"torch {torch.__version__} cuda: {torch.cuda.get_device_name()}"
        return f"torch {torch.__version__} cpu"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return f"tensorflow {tf.__version__} {'gpu' if gpus else 'cpu'}"


def reset_peak_memory():
    """Starts a new peak (PyTorch; JAX keeps one peak per process)."""
    if _backend() == "torch":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes():
    """The device allocator's peak, or None on a CPU (use RSS there)."""
    backend = _backend()
    if backend == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated())
    return None


def print_and_write(results, path=None):
    """Prints `results` as JSON and, with a `path`, writes them there too."""
    import json
    import os

    print(json.dumps(results, indent=1))
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    return results


def no_grad(function):
    """`function` run without recording gradients (PyTorch; others as is)."""
    if _backend() != "torch":
        return function
    import torch

    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with torch.no_grad():
            return function(*args, **kwargs)

    return wrapped


def add_torch_threads_argument(parser, default_help="default: torch's"):
    """`--torch-threads N`: `torch.set_num_threads` (1 on a shared CPU, where
    PyTorch's intra-op threads otherwise fight other processes for cores)."""
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help=f"torch.set_num_threads (PyTorch only; {default_help})",
    )


def set_torch_threads(count):
    """Applies `--torch-threads` (nothing on other backends, or for None)."""
    if count and _backend() == "torch":
        import torch

        torch.set_num_threads(count)
