"""Small file helpers: `.keras` path checks and atomic writes."""

import contextlib
import os
import stat
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
    The file gets the mode a plain `open(filepath, "w")` would give it: an
    existing file keeps its mode, a new one gets 0o666 less the umask (the
    temporary file is 0o600). A symlink stays a link: its target is written.
    """
    target = os.path.realpath(filepath)
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise ValueError(
            f"The folder of `filepath` does not exist: {folder}. "
            f"Received: filepath={filepath!r}"
        )
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    try:
        handle, temporary = tempfile.mkstemp(
            prefix=f".{os.path.basename(target)[:64]}.", suffix=".tmp.keras", dir=folder
        )
    except OSError as error:
        # Name the requested path, not the hidden temporary one.
        raise type(error)(error.errno, error.strerror, filepath) from None
    os.close(handle)
    try:
        yield temporary
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def _umask():
    """The process umask (only readable by setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
