"""PNG figures: φ heatmaps like the paper's Fig. 3, and ΔW spectra.

matplotlib is an optional dependency (`pip install "keras-lora[analysis]"`),
imported only when a figure is drawn.
"""

import numpy as np


def plot_similarity(grids, filepath, title=None):
    """Draws φ grids as heatmaps side by side, like the paper's Fig. 3.

    Args:
        grids: `{panel title: 2-D array}`, e.g. `subspace_similarity` grids
            of several layers (rows: i, columns: j).
        filepath: the PNG to write.
        title: a title over all panels.

    Returns:
        `filepath`.

    Example:

    >>> grid = keras_lora.analysis.subspace_similarity(a_r8, a_r64)
    >>> keras_lora.analysis.plot_similarity({"layer 0 query": grid}, "phi.png")
    """
    figure_class = _figure_class()
    grids = {name: np.asarray(grid) for name, grid in grids.items()}
    if not grids or any(g.ndim != 2 for g in grids.values()):
        raise ValueError(
            "`grids` must map panel titles to 2-D arrays. Received: "
            f"{ {name: np.shape(g) for name, g in grids.items()} }"
        )
    figure = figure_class(figsize=(3.2 * len(grids) + 1, 3.4), layout="constrained")
    axes = figure.subplots(1, len(grids), squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids.items()):
        image = ax.imshow(
            grid,
            vmin=0,
            vmax=1,
            cmap="viridis",
            aspect="auto",
            interpolation="nearest",
            extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5),
        )
        ax.set_title(name, fontsize=9)
        for axis in (ax.xaxis, ax.yaxis):
            axis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("j")
        ax.set_ylabel("i")
    figure.colorbar(image, ax=list(axes[0]), label="φ(i, j)")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.savefig(filepath, dpi=120)
    return filepath


def plot_spectrum(spectra, filepath, title=None):
    """Draws the singular values of each ΔW (normalised by the largest).

    Args:
        spectra: `{label: singular values}`, e.g. the result of `spectrum`.
        filepath: the PNG to write.
        title: the figure's title.

    Returns:
        `filepath`.
    """
    figure_class = _figure_class()
    if not spectra:
        raise ValueError("`spectra` must not be empty. Received: spectra={}")
    figure = figure_class(figsize=(7, 3.8), layout="constrained")
    ax = figure.subplots()
    for label, values in spectra.items():
        values = np.asarray(values, dtype="float64")
        top = values.max() if values.size and values.max() > 0 else 1.0
        ax.plot(np.arange(1, values.size + 1), values / top, marker=".", label=label)
    ax.set_xlabel("singular value index")
    ax.set_ylabel("σ / σ₁")
    ax.set_yscale("log")
    if len(spectra) <= 24:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    if title:
        ax.set_title(title, fontsize=10)
    figure.savefig(filepath, dpi=120)
    return filepath


def _figure_class():
    # A bare Figure draws to a file without pyplot's global state, so the
    # user's matplotlib backend (a notebook's, say) is left alone.
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "Plots need matplotlib: pip install 'keras-lora[analysis]' (or "
            "pip install matplotlib)."
        ) from None
    return Figure
