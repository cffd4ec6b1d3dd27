"""Pictures of anomaly maps: overlays that ``skad score`` writes, and figures.

One palette for the library, :data:`CMAP` (matplotlib's), on a colour scale
that the model fixes (:func:`colour_range`), never the images of a run: the
same image gets the same colours whether it is scored alone or with others.
"""

import numpy as np
from scipy import ndimage

from ._images import check_images

__all__ = ["CMAP", "colour_range", "overlay", "plot_maps"]

#: matplotlib colormap of every map skad draws: low blue, the threshold green-yellow,
#: high red
CMAP = "turbo"


def colour_range(threshold):
    """``(low, high)``: the map values drawn from the first to the last colour of
    :data:`CMAP`, with ``threshold`` in the middle (``threshold -/+ |threshold|``, or
    ``-/+ 1`` for a threshold of 0).

    The range depends on the model only, so that every overlay of every run can be
    compared and a quiet map looks quiet.

    Examples
    --------
    >>> from skad.viz import colour_range
    >>> colour_range(2.5)
    (0.0, 5.0)
    """
    half = abs(threshold) or 1.0
    return threshold - half, threshold + half


def _colormap():
    try:
        import matplotlib
    except ImportError as err:  # a dependency of skad: only a broken install lacks it
        raise ImportError("skad's pictures need matplotlib: pip install matplotlib") from err
    return matplotlib.colormaps[CMAP]


def overlay(image, amap, threshold, *, mask=None, text=None, alpha=0.5):
    """An RGB picture of ``amap`` over ``image``, on the model's fixed colour scale.

    Parameters
    ----------
    image : ndarray of shape (height, width, 3)
        Float RGB in [0, 1] (as detectors read images).
    amap : ndarray of shape (height, width)
        The image's anomaly map (``predict_map``).
    threshold : float
        The map value drawn mid-scale (:func:`colour_range`): the detector's
        ``pixel_threshold_`` where it has one, else its ``threshold_``.
    mask : ndarray of bool, shape (height, width), optional
        Predicted defect pixels (``predict_mask``): their regions' outlines are
        drawn in white.
    text : str, optional
        Written on a black band added above the image (the score, p-value and
        verdict), which hides none of it.
    alpha : float, default=0.5
        Weight of the colours over the image.

    Returns
    -------
    PIL.Image.Image
        RGB, the image's size; with ``text``, taller by the band (and wider if the
        text is wider than the image), the image at the bottom left.

    Examples
    --------
    >>> import numpy as np
    >>> from skad.viz import overlay
    >>> amap = np.zeros((32, 32)); amap[8:16, 8:16] = 4.0
    >>> picture = overlay(np.full((32, 32, 3), 0.5), amap, 2.0, mask=amap > 2.0,
    ...                   text="reject")
    >>> picture.mode, picture.height > 32
    ('RGB', True)
    >>> overlay(np.full((32, 32, 3), 0.5), amap, 2.0).size
    (32, 32)
    """
    from PIL import Image, ImageDraw

    image, amap = np.asarray(image, dtype=np.float32), np.asarray(amap, dtype=np.float32)
    if image.shape[:2] != amap.shape:
        raise ValueError(f"image {image.shape[:2]} and map {amap.shape} differ in size")
    lo, hi = colour_range(threshold)
    heat = _colormap()(np.clip((amap - lo) / (hi - lo), 0, 1))[..., :3]
    rgb = image * (1 - alpha) + heat * alpha
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        rgb[mask & ~ndimage.binary_erosion(mask, border_value=1)] = 1.0  # outlines
    picture = Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    if not text:
        return picture
    # the text goes on a band above the image, so that it hides no pixel of it
    _, _, right, bottom = ImageDraw.Draw(picture).textbbox((2, 1), text)
    framed = Image.new("RGB", (max(picture.width, right + 2), picture.height + bottom + 2))
    framed.paste(picture, (0, bottom + 2))
    ImageDraw.Draw(framed).text((2, 1), text, fill=(255, 255, 255))
    return framed


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
        raise ImportError("skad's pictures need matplotlib: pip install matplotlib") from err
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
        axes[1, j].imshow(np.asarray(maps[j]), cmap=CMAP)
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
