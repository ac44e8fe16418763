"""Guards for reading files from strangers: bounded zip members, plain HDF5.

Adapter files are untrusted input, read with the care Keras's own `.keras`
loader takes (`keras.src.saving.saving_lib`): nothing is pickled or executed,
no byte is read before the size it may have is known, and HDF5's features
that reach outside the file (external storage, virtual datasets, soft and
external links) or that expand it (filters: a 2 KB dataset may declare a
compressed terabyte) are refused.
"""

import h5py
import numpy as np

# config.json / metadata.json are a few KB; a spec for thousands of layers
# stays far below this.
MAX_JSON_BYTES = 16 * 2**20


def read_member(archive, name, max_bytes, source):
    """Returns the bytes of zip member `name`, refusing more than `max_bytes`.

    Args:
        archive: an open `zipfile.ZipFile`.
        name: the member's name.
        max_bytes: the most bytes the member may have, known before reading.
        source: the file, for messages.
    """
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise ValueError(f"{source} has no '{name}'.") from None
    if info.file_size > max_bytes:
        raise ValueError(
            f"{source}: '{name}' declares {info.file_size} bytes, more than the "
            f"{max_bytes} it may have."
        )
    with archive.open(info) as member:
        data = member.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{source}: '{name}' holds more than {max_bytes} bytes.")
    return data


def read_flat_dataset(group, name, dtype, length, source):
    """Reads a 1-D dataset of exactly `length` items of `dtype`, stored plainly.

    Everything is checked on the dataset's metadata before its data is read:
    a hard link to a dataset in this file, no external storage, not virtual,
    no filter, and the declared dtype and shape.
    """
    where = f"{source}: dataset '{name}'"
    link = group.get(name, default=None, getlink=True)
    if link is None:
        raise ValueError(f"{where} is missing.")
    if not isinstance(link, h5py.HardLink):
        raise ValueError(f"{where} is a {type(link).__name__}: links are refused.")
    dataset = group[name]
    if not isinstance(dataset, h5py.Dataset):
        raise ValueError(f"{where} is not a dataset.")
    if dataset.external:
        raise ValueError(f"{where} uses external storage: refused.")
    if dataset.is_virtual:
        raise ValueError(f"{where} is a virtual dataset: refused.")
    if dataset.id.get_create_plist().get_nfilters():
        raise ValueError(f"{where} is compressed or filtered: refused.")
    if dataset.dtype != np.dtype(dtype) or dataset.shape != (length,):
        raise ValueError(
            f"{where} is {dataset.dtype}{list(dataset.shape)}, but the adapter's "
            f"config.json declares {dtype}[{length}]."
        )
    # Unallocated storage would read as fill values: a terabyte of zeros.
    if dataset.id.get_storage_size() != length * dataset.dtype.itemsize:
        raise ValueError(
            f"{where} stores {dataset.id.get_storage_size()} bytes, not the "
            f"{length * dataset.dtype.itemsize} its shape declares."
        )
    return dataset[()]
