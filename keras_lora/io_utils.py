"""Small file helpers: `.keras` path checks and atomic writes."""

import contextlib
import os
import tempfile


def check_keras_path(filepath, argument="filepath"):
    """Returns `filepath` as a str if it ends in `.keras`, else raises."""
    if not isinstance(filepath, (str, os.PathLike)):
        raise ValueError(
            f"`{argument}` must be a path ending in '.keras'. "
            f"Received: {argument}={filepath!r}"
        )
    filepath = os.fspath(filepath)
    if not filepath.endswith(".keras"):
        raise ValueError(
            f"`{argument}` must end in '.keras'. Received: {argument}={filepath!r}"
        )
    return filepath


@contextlib.contextmanager
def atomic_write(filepath):
    """Yields a temporary path beside `filepath`, moved onto it on success.

    A failure (or an interrupt) removes the temporary file and leaves any
    existing `filepath` as it was: no partial file, no clobbered good one.
    """
    folder = os.path.dirname(os.path.abspath(filepath))
    if not os.path.isdir(folder):
        raise ValueError(
            f"The folder of `filepath` does not exist: {folder}. "
            f"Received: filepath={filepath!r}"
        )
    handle, temporary = tempfile.mkstemp(
        prefix=f".{os.path.basename(filepath)}.", suffix=".tmp.keras", dir=folder
    )
    os.close(handle)
    try:
        yield temporary
        os.replace(temporary, filepath)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
