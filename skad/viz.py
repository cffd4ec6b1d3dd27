"""Figures of anomaly maps (needs matplotlib: ``pip install "skad[viz]"``)."""

import numpy as np

from ._images import check_images

__all__ = ["plot_maps"]


def plot_maps(images, maps, masks=None, *, path=None, scores=None):
    """A figure with one column per image: the image, its map and, if given, its mask.

    Parameters
    ----------
    images : array-like or list
        Images in any form a detector accepts (arrays, mixed sizes, paths).
    maps : list or ndarray
        One anomaly map per image, as ``predict_map`` returns them.
    masks : list or ndarray, optional
        Ground-truth masks, drawn as a third row.
    path : str or path-like, optional
        Where to save the figure (PNG, 100 dpi); the figure is returned either way.
    scores : array-like, optional
        Image scores, written above each column.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> from skad.viz import plot_maps
    >>> fig = plot_maps(np.zeros((2, 16, 16)), np.ones((2, 16, 16)), scores=[0.1, 0.9])
    >>> len(fig.axes)
    4
    """
    try:
        # a Figure without pyplot: no backend is switched and nothing is kept open
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError('plot_maps needs matplotlib: pip install "skad[viz]"') from err
    images = check_images(images, name="images")
    if len(maps) != len(images) or (masks is not None and len(masks) != len(images)):
        raise ValueError(f"got {len(images)} images, {len(maps)} maps"
                         + ("" if masks is None else f" and {len(masks)} masks"))
    rows = 2 if masks is None else 3
    n = len(images)
    fig = Figure(figsize=(2.2 * n, 2.2 * rows))
    axes = fig.subplots(rows, n, squeeze=False)
    for j in range(n):
        axes[0, j].imshow(images.read(j))
        axes[1, j].imshow(np.asarray(maps[j]), cmap="inferno")
        if masks is not None:
            axes[2, j].imshow(np.asarray(masks[j]), cmap="gray")
        if scores is not None:
            axes[0, j].set_title(f"{float(scores[j]):.3g}", fontsize=9)
    for ax, name in zip(axes[:, 0], ("image", "map", "ground truth")):
        ax.set_ylabel(name)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
