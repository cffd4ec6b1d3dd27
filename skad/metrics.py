"""Evaluation metrics for image anomaly detection.

Three scores are standard on MVTec-style benchmarks:

* image-level ROC AUC (:func:`image_roc_auc`), computed by scikit-learn;
* pixel-level ROC AUC (:func:`pixel_roc_auc`) over every pixel of every
  image;
* the per-region overlap score PRO / AUPRO (:func:`pro_score`), which weighs
  every connected defect region equally, so that small defects count as much
  as large ones.

:func:`evaluate` bundles the three in a dictionary.

Masks and anomaly maps are passed either as ndarrays of shape ``(n, h, w)``
or as lists of 2-D arrays whose sizes may differ between images (map ``i``
must have the size of mask ``i``).
"""

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

__all__ = ["evaluate", "image_roc_auc", "pixel_roc_auc", "pro_score"]

# 8-connectivity: diagonal neighbours belong to the same defect region, as in
# the reference MVTec AD evaluation code.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _as_image_list(arrays, name):
    """Return ``arrays`` as a list of 2-D ndarrays.

    Accepts an array-like of shape ``(n, h, w)`` or a list/tuple of 2-D
    array-likes.
    """
    if isinstance(arrays, (list, tuple)):
        images = [np.asarray(a) for a in arrays]
    elif np.ndim(arrays) == 3:
        images = list(np.asarray(arrays))
    else:
        raise ValueError(
            f"{name} must be an array of shape (n, h, w) or a list of 2-D arrays; "
            f"got an array with shape {np.shape(arrays)}."
        )
    if not images:
        raise ValueError(f"{name} is empty.")
    for i, image in enumerate(images):
        if image.ndim != 2:
            raise ValueError(f"{name}[{i}] must be 2-D; got shape {image.shape}.")
    return images


def _check_masks_and_maps(masks, maps):
    """Validate masks and maps; return lists of boolean masks and float maps."""
    mask_list = _as_image_list(masks, "masks")
    map_list = _as_image_list(maps, "maps")
    if len(mask_list) != len(map_list):
        raise ValueError(
            f"masks and maps must hold the same number of images; "
            f"got {len(mask_list)} masks and {len(map_list)} maps."
        )
    bool_masks, float_maps = [], []
    for i, (mask, amap) in enumerate(zip(mask_list, map_list)):
        if mask.shape != amap.shape:
            raise ValueError(f"mask {i} has shape {mask.shape} but map {i} has shape {amap.shape}.")
        if not (np.issubdtype(amap.dtype, np.number) or amap.dtype == bool):
            raise TypeError(f"maps[{i}] must be numeric; got dtype {amap.dtype}.")
        amap = amap.astype(np.float64, copy=False)
        if not np.isfinite(amap).all():
            raise ValueError(f"maps[{i}] contains NaN or infinite values.")
        if not (np.issubdtype(mask.dtype, np.number) or mask.dtype == bool):
            raise TypeError(f"masks[{i}] must be numeric or boolean; got dtype {mask.dtype}.")
        if mask.dtype.kind == "f" and not np.isfinite(mask).all():
            raise ValueError(f"masks[{i}] contains NaN or infinite values.")
        # Any nonzero value marks a defect, so 0/1, bool and 0/255 masks all work.
        bool_masks.append(mask != 0)
        float_maps.append(amap)
    return bool_masks, float_maps


def _check_both_classes(n_defect, n_normal):
    if n_defect == 0:
        raise ValueError("masks contain no defect pixel; the metric is undefined.")
    if n_normal == 0:
        raise ValueError("masks contain no defect-free pixel; the metric is undefined.")


def image_roc_auc(y, scores):
    """Image-level ROC AUC.

    A thin, validating wrapper around :func:`sklearn.metrics.roc_auc_score`.

    Parameters
    ----------
    y : array-like of shape (n_images,)
        Binary labels, 1 (or True) for anomalous images.
    scores : array-like of shape (n_images,)
        Anomaly scores, higher meaning more anomalous.

    Returns
    -------
    float
        Area under the ROC curve.

    Examples
    --------
    >>> from skad.metrics import image_roc_auc
    >>> image_roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    y = np.asarray(y)
    scores = np.asarray(scores)
    if y.ndim != 1 or scores.ndim != 1:
        raise ValueError(f"y and scores must be 1-D; got shapes {y.shape} and {scores.shape}.")
    if y.shape != scores.shape:
        raise ValueError(f"y and scores must have the same length; got {len(y)} and {len(scores)}.")
    if not (np.issubdtype(scores.dtype, np.number) or scores.dtype == bool):
        raise TypeError(f"scores must be numeric; got dtype {scores.dtype}.")
    bad = np.flatnonzero(~np.isfinite(scores.astype(np.float64)))
    if bad.size:
        raise ValueError(f"scores[{bad[0]}] is NaN or infinite.")
    check_image_labels(y)
    return float(roc_auc_score(y.astype(int), scores))


def check_image_labels(y):
    """Image labels of 0 and 1 with both present: the ROC AUC is undefined otherwise."""
    labels = set(np.unique(y).tolist())
    if not labels <= {0, 1}:
        raise ValueError(f"y must contain only 0 and 1; got labels {sorted(labels)}.")
    if labels != {0, 1}:
        raise ValueError("y must contain both normal (0) and anomalous (1) images.")


def pixel_roc_auc(masks, maps):
    """Pixel-level ROC AUC over all pixels of all images.

    Parameters
    ----------
    masks : array-like of shape (n, h, w) or list of 2-D arrays
        Ground-truth masks; any nonzero value marks a defect pixel.
    maps : array-like of shape (n, h, w) or list of 2-D arrays
        Anomaly maps, map ``i`` with the shape of mask ``i``. Raw scores are
        used; higher means more anomalous.

    Returns
    -------
    float
        Area under the pixel-level ROC curve.

    Examples
    --------
    >>> import numpy as np
    >>> from skad.metrics import pixel_roc_auc
    >>> masks = np.array([[[0, 0], [0, 1]]])
    >>> maps = np.array([[[0.1, 0.2], [0.3, 0.9]]])
    >>> pixel_roc_auc(masks, maps)
    1.0
    """
    bool_masks, float_maps = _check_masks_and_maps(masks, maps)
    y_true = np.concatenate([m.ravel() for m in bool_masks])
    y_score = np.concatenate([a.ravel() for a in float_maps])
    n_defect = int(np.count_nonzero(y_true))
    _check_both_classes(n_defect, y_true.size - n_defect)
    return float(roc_auc_score(y_true, y_score))


def _pixel_weights(bool_masks):
    """Label defect regions and return per-pixel weights for the PRO curve.

    Returns ``(is_normal, region_weight, n_regions)`` as flat arrays over all
    pixels of all images: ``region_weight`` is ``1 / size`` of the region a
    defect pixel belongs to and 0 for defect-free pixels.
    """
    is_normal, region_weight = [], []
    n_regions = 0
    for mask in bool_masks:
        labels, n_found = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        sizes = np.bincount(labels.ravel(), minlength=n_found + 1).astype(np.float64)
        inv_size = np.zeros_like(sizes)
        inv_size[1:] = 1.0 / sizes[1:]
        region_weight.append(inv_size[labels.ravel()])
        is_normal.append(~mask.ravel())
        n_regions += n_found
    return np.concatenate(is_normal), np.concatenate(region_weight), n_regions


def _pro_curve(is_normal, region_weight, n_regions, scores):
    """Return FPR and PRO at every distinct threshold, starting at (0, 0)."""
    # One global descending sort: lowering the threshold past a score admits
    # every pixel with that score at once.
    order = np.argsort(-scores)
    sorted_scores = scores[order]
    # Integer counts keep the last FPR exactly 1.0.
    false_pos = np.cumsum(is_normal[order], dtype=np.int64)
    overlap = np.cumsum(region_weight[order])
    # Last index of each group of equal scores, so tied pixels move together.
    last = np.flatnonzero(np.diff(sorted_scores) != 0)
    last = np.append(last, sorted_scores.size - 1)
    fpr = np.concatenate([[0.0], false_pos[last] / np.count_nonzero(is_normal)])
    pro = np.concatenate([[0.0], overlap[last] / n_regions])
    return fpr, pro


def _partial_area(fpr, pro, max_fpr):
    """Trapezoidal area under ``pro(fpr)`` from 0 to ``max_fpr``.

    ``fpr`` must be non-decreasing and start at 0; the curve is linearly
    interpolated at exactly ``max_fpr``.
    """
    k = int(np.searchsorted(fpr, max_fpr, side="right"))
    x, y = fpr[:k], pro[:k]
    if k < fpr.size:
        # fpr[k - 1] <= max_fpr < fpr[k], so the denominator is positive.
        frac = (max_fpr - fpr[k - 1]) / (fpr[k] - fpr[k - 1])
        x = np.append(x, max_fpr)
        y = np.append(y, pro[k - 1] + frac * (pro[k] - pro[k - 1]))
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def pro_score(masks, maps, max_fpr=0.3):
    """Normalized area under the per-region-overlap curve (AUPRO).

    Every connected defect region (8-connectivity) of every mask counts
    equally. Sweeping one global threshold over all pixels, the PRO at a
    threshold is the mean, over all regions, of the fraction of the region's
    pixels scored at or above it; the false positive rate is the fraction of
    all defect-free pixels scored at or above it. The PRO-vs-FPR curve,
    starting at (0, 0), is integrated up to ``max_fpr`` and divided by
    ``max_fpr``, as in the MVTec AD evaluation.

    Parameters
    ----------
    masks : array-like of shape (n, h, w) or list of 2-D arrays
        Ground-truth masks; any nonzero value marks a defect pixel. Images
        without defects contribute defect-free pixels only.
    maps : array-like of shape (n, h, w) or list of 2-D arrays
        Anomaly maps, map ``i`` with the shape of mask ``i``.
    max_fpr : float, default=0.3
        Upper integration limit on the false positive rate, in (0, 1].

    Returns
    -------
    float
        Score in [0, 1]; 1 for a map that ranks every defect pixel above
        every defect-free pixel.

    Notes
    -----
    Runs in O(P log P) for P pixels: each pixel gets a weight (``1 /
    n_normal`` for the FPR, ``1 / (region_size * n_regions)`` for the PRO)
    and both curves are cumulative sums over one sort of all scores.

    Examples
    --------
    >>> import numpy as np
    >>> from skad.metrics import pro_score
    >>> masks = np.zeros((2, 8, 8), dtype=np.uint8)
    >>> masks[0, 1:3, 1:3] = 1
    >>> masks[1, 4:8, 4:8] = 1
    >>> pro_score(masks, masks.astype(float))
    1.0
    """
    if isinstance(max_fpr, bool) or not isinstance(max_fpr, (int, float, np.number)):
        raise TypeError(f"max_fpr must be a number; got {type(max_fpr).__name__}.")
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1]; got {max_fpr}.")
    bool_masks, float_maps = _check_masks_and_maps(masks, maps)
    is_normal, region_weight, n_regions = _pixel_weights(bool_masks)
    _check_both_classes(n_regions, int(np.count_nonzero(is_normal)))
    scores = np.concatenate([a.ravel() for a in float_maps])
    fpr, pro = _pro_curve(is_normal, region_weight, n_regions, scores)
    return _partial_area(fpr, pro, float(max_fpr)) / max_fpr


def evaluate(y, scores, masks=None, maps=None, max_fpr=0.3):
    """Compute the standard image- and pixel-level anomaly detection metrics.

    Parameters
    ----------
    y : array-like of shape (n_images,)
        Binary image labels, 1 for anomalous images.
    scores : array-like of shape (n_images,)
        Image anomaly scores.
    masks : array-like of shape (n, h, w) or list of 2-D arrays, default=None
        Ground-truth masks, one per image; pass all-zero masks for normal
        images.
    maps : array-like of shape (n, h, w) or list of 2-D arrays, default=None
        Anomaly maps, one per image.
    max_fpr : float, default=0.3
        Integration limit of :func:`pro_score`.

    Returns
    -------
    dict
        ``{"image_auroc": ...}``, plus ``"pixel_auroc"`` and ``"pro"`` when
        both ``masks`` and ``maps`` are given.

    Examples
    --------
    >>> import numpy as np
    >>> from skad.metrics import evaluate
    >>> masks = np.zeros((2, 4, 4), dtype=np.uint8)
    >>> masks[1, :2, :2] = 1
    >>> res = evaluate([0, 1], [0.2, 0.7], masks, masks * 0.9)
    >>> sorted(res)
    ['image_auroc', 'pixel_auroc', 'pro']
    >>> res["pro"]
    1.0
    """
    if (masks is None) != (maps is None):
        raise ValueError("masks and maps must be given together (or both left as None).")
    result = {"image_auroc": image_roc_auc(y, scores)}
    if masks is None:
        return result
    n_images = len(np.asarray(y))
    n_masks = len(masks)
    if n_masks != n_images:
        raise ValueError(
            f"masks must hold one mask per image; got {n_masks} masks for {n_images} images."
        )
    result["pixel_auroc"] = pixel_roc_auc(masks, maps)
    result["pro"] = pro_score(masks, maps, max_fpr=max_fpr)
    return result
