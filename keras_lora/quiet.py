"""Quiet start-up for keras-lora's applications: the CLI and the examples.

KerasHub imports TensorFlow, even on the JAX and torch backends, and
TensorFlow logs from C++ to stderr: at import, lines such as "All log messages
before absl::InitializeLog() is called are written to STDERR", "oneDNN custom
operations are on" and "Could not find cuda drivers"; later, on its first op,
"failed call to cuInit". None of it is about keras-lora, and on a CPU machine
it reads like an error.

Two mechanisms, because TensorFlow has two:
- `TF_CPP_MIN_LOG_LEVEL=3` hides what TensorFlow's runtime logs after import;
- the import-time lines go through absl before it is initialised, which
  ignores that variable, so stderr (file descriptor 2) points to /dev/null
  while the `tensorflow` package is being imported, and only then.

Only applications call this (the `keras-lora` command, `keras_lora.demo`, the
examples): a library must not change its user's logging. It does nothing if
the user set `TF_CPP_MIN_LOG_LEVEL` (they chose what to see) or if TensorFlow
is already imported (too late: with `KERAS_BACKEND=tensorflow`, `import keras`
imports it). JAX sets the variable to "1" when it is imported (a default, not
the user's choice), so that value with JAX imported counts as unset. This
module imports neither Keras nor TensorFlow.
"""

import contextlib
import importlib.abc
import importlib.util
import os
import sys

LOG_LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
_QUIET_MODULES = ("tensorflow",)


def quiet_third_party_logs():
    """Hides TensorFlow's C++ logs in an application, unless the user set them.

    Call it first thing, before Keras or KerasHub is imported. Python's own
    warnings, tracebacks and keras-lora's output are untouched; so is every
    line written to stderr after TensorFlow's import.

    Returns:
        True if it changed anything, False if it left logging alone.

    Example:

    >>> from keras_lora.quiet import quiet_third_party_logs
    >>> quiet_third_party_logs()  # before `import keras`
    >>> import keras
    """
    if _user_set_log_level():
        return False
    if any(name in sys.modules for name in _QUIET_MODULES):
        return False
    os.environ[LOG_LEVEL_VARIABLE] = "3"
    if not any(isinstance(finder, _QuietImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())
    return True


def _user_set_log_level():
    value = os.environ.get(LOG_LEVEL_VARIABLE)
    if value is None:
        return False
    # `jax/__init__.py` does `os.environ.setdefault(LOG_LEVEL_VARIABLE, "1")`.
    return not (value == "1" and "jax" in sys.modules)


@contextlib.contextmanager
def _stderr_to_devnull():
    """Points file descriptor 2 (C++ writes there) to /dev/null, then back."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` like Python would, and imports it with stderr muted."""

    def find_spec(self, name, path=None, target=None):
        if name not in _QUIET_MODULES:
            return None
        sys.meta_path.remove(self)  # once is enough; also avoids recursion
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    """Wraps a loader: its module runs with stderr muted (an error still raises)."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with _stderr_to_devnull():
            self._loader.exec_module(module)

    def __getattr__(self, name):
        # `importlib.resources` and friends ask the loader for more.
        return getattr(self._loader, name)
