"""Decisions from anomaly scores and maps: conformal thresholds, p-values, tuned thresholds
and defect regions.

An inspection engineer signs off a rate: the share of good parts the line may
reject. Conformal calibration turns the scores of a few defect-free reference
images into a threshold with that rate as a stated guarantee, whatever the
detector and its units (Laxhammar & Falkman 2015; Bates et al. 2023):

* :func:`conformal_threshold`: the order statistic of the reference scores
  that a new normal image exceeds with probability at most ``false_reject_rate``;
* :func:`conformal_pvalues`: each score as the share of references (plus
  one) scoring at least as high; small = anomalous, readable in any method;
* :func:`false_reject_bound`: the guaranteed false-reject rate of any
  threshold, for example one tuned on labelled images with :func:`tune_threshold`;
* :func:`threshold_map` and :func:`find_regions`: a map's predicted defect
  pixels and their connected regions.

Every detector uses them (:class:`skad.base.BaseDetector`): ``threshold_``,
``pixel_threshold_``, ``predict_pvalue``, ``predict_mask`` and
``predict_regions``.

The guarantee
-------------
Let ``s_1..s_n`` be the reference images' scores and ``s`` the score of a new
normal image, all ``n + 1`` exchangeable (drawn alike, in any order; for
example the references and the new part are good parts of the same line,
none of them seen in training). Then ``s`` is equally likely to take any rank
among the ``n + 1``, and for ``k = ceil((n + 1)(1 - alpha))``, the ``k``-th
smallest reference score ``s_(k)`` satisfies::

    P(s > s_(k)) = (n + 1 - k) / (n + 1) <= alpha

(exactly ``(n + 1 - k) / (n + 1)`` for scores without ties, at most that with
ties). The probability is over the references and the new image together: a
guarantee on average over calibrations. One calibration's own rate is random:
for scores without ties it follows ``Beta(n + 1 - k, k)``, so with few
references it is often above ``alpha`` (``scipy.stats.beta.sf(eps, n + 1 - k,
k)`` is the chance that it exceeds ``eps``); more references narrow it. With
``k > n`` (``alpha < 1 / (n + 1)``) no reference score gives the guarantee:
the smallest rate ``n`` references support is ``1 / (n + 1)``. A detector
that compares an image with its references (PatchCore, MetaComparer) scores
each reference without its own patches, against the others; a single
reference it can only score against its own other patches, which is not how
a new image is scored: no rate is guaranteed then (CalibrationWarning at
any rate).

Names
-----
``false_reject_rate`` says what the engineer signs off, in the words of
inspection (a false reject: a good part rejected). scikit-learn's and PyOD's
``contamination`` (``IsolationForest``, ``LocalOutlierFactor``) is a different
idea: the share of outliers assumed in the training data, whose quantile of the
training scores becomes the threshold; a statement about the training set, not
a guarantee for new good parts. ``predict_pvalue`` follows scikit-learn's
``predict_proba`` (one value per sample, from a fitted estimator); PyOD's
``predict_proba`` and ``predict_confidence`` are not p-values, and
``score_samples`` is scikit-learn's raw score (higher = more normal), which the
skad detectors do not define (``decision_function`` is theirs, higher = more
anomalous).

References
----------
R. Laxhammar and G. Falkman, "Inductive conformal anomaly detection for
sequential detection of anomalous sub-trajectories", Annals of Mathematics and
Artificial Intelligence 74, 2015.

S. Bates, E. Candès, L. Lei, Y. Romano and M. Sesia, "Testing for outliers
with conformal p-values", The Annals of Statistics 51(1), 2023.
"""

import numbers
from typing import NamedTuple

import numpy as np
from scipy import ndimage

__all__ = ["CalibrationWarning", "Region", "conformal_pvalues", "conformal_threshold",
           "false_reject_bound", "find_regions", "min_references", "threshold_map",
           "tune_threshold"]

# 8-connectivity: diagonal neighbours belong to one region, as in skad.metrics' PRO
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class CalibrationWarning(UserWarning):
    """Too few reference images for the false-reject rate asked for.

    The threshold is then the largest reference score, whose guaranteed rate
    is ``1 / (n_references + 1)``. A detector that compares images with its
    references' patches (PatchCore, MetaComparer) and has a single reference
    warns at any rate: that reference is scored against its own other patches,
    not exchangeable with a new image, so no rate is guaranteed (on real
    fabrics, new good images lie far above it: docs/benchmarks.md, "False
    rejects with a single reference"). Silence it, where the threshold is not used
    (ranking metrics), with
    ``warnings.filterwarnings("ignore", category=CalibrationWarning)``.
    """


# ------------------------------------------------------------------ conformal calibration
def _check_scores(reference_scores):
    scores = np.asarray(reference_scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) == 0:
        raise ValueError(f"reference_scores must be a non-empty 1-D array; got shape "
                         f"{scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("reference_scores contains NaN or infinite values")
    return scores


def _check_rate(false_reject_rate):
    if not (isinstance(false_reject_rate, numbers.Real) and 0 < false_reject_rate < 1):
        raise ValueError(f"false_reject_rate must be a float in (0, 1); got {false_reject_rate!r}")
    return float(false_reject_rate)


def _n_allowed(n, rate):
    """The most references ``m`` that may score at or above a rejected image: the largest
    ``m`` in ``0..n-1`` with ``(1 + m) / (n + 1) <= rate``; -1 when even ``m = 0`` fails.

    The comparison is the one :func:`conformal_pvalues` makes, in the same floats, so that
    ``score > threshold`` and ``p-value <= rate`` agree exactly.
    """
    m = min(max(int(np.floor(rate * (n + 1))) - 1, -1), n - 1)
    while m + 1 <= n - 1 and (m + 2) / (n + 1) <= rate:
        m += 1
    while m >= 0 and (m + 1) / (n + 1) > rate:
        m -= 1
    return m


def min_references(false_reject_rate):
    """The fewest reference images that support ``false_reject_rate``: the smallest ``n``
    with ``1 / (n + 1) <= false_reject_rate``.

    >>> from skad.thresholds import min_references
    >>> min_references(0.05), min_references(0.01), min_references(0.3)
    (19, 99, 3)
    """
    rate = _check_rate(false_reject_rate)
    n = max(1, int(np.ceil(1 / rate)) - 1)
    while n > 1 and 1 / n <= rate:
        n -= 1
    while 1 / (n + 1) > rate:
        n += 1
    return n


def conformal_threshold(reference_scores, false_reject_rate, *, warn=True):
    """The threshold a new normal image exceeds with probability at most ``false_reject_rate``.

    The ``k``-th smallest of the ``n`` reference scores, ``k = ceil((n + 1)(1 - alpha))``
    (module docstring: the guarantee and its conditions). Images scoring
    strictly above it are rejected.

    Parameters
    ----------
    reference_scores : array-like of shape (n,)
        Scores of defect-free reference images (leave-one-out where the
        references are also what images are compared with), higher = more
        anomalous.
    false_reject_rate : float in (0, 1)
        ``alpha``: the accepted probability of rejecting a good part.
    warn : bool, default=True
        Warn (:class:`CalibrationWarning`) when ``n`` references cannot
        support ``false_reject_rate``.

    Returns
    -------
    threshold : float
        ``s_(k)``; the largest reference score when ``k > n``
        (``false_reject_rate < 1 / (n + 1)``), whose guaranteed rate is then
        ``1 / (n + 1)`` (see :func:`false_reject_bound`).

    Examples
    --------
    >>> import numpy as np
    >>> from skad.thresholds import conformal_threshold, false_reject_bound
    >>> scores = np.arange(1.0, 40.0)                 # 39 references: 1, 2, ..., 39
    >>> t = conformal_threshold(scores, 0.05)         # k = ceil(40 * 0.95) = 38
    >>> t, false_reject_bound(scores, t)              # (1 + 1) / 40
    (38.0, 0.05)
    """
    scores = _check_scores(reference_scores)
    rate = _check_rate(false_reject_rate)
    n = len(scores)
    m = _n_allowed(n, rate)
    if m < 0 and warn:
        import warnings

        warnings.warn(too_few_references_message(n, rate), CalibrationWarning, stacklevel=2)
    return float(np.sort(scores)[n - 1 - max(m, 0)])


def too_few_references_message(n, false_reject_rate, what="the threshold is the largest "
                               "reference score"):
    """What :class:`CalibrationWarning` says: the rate ``n`` references support, what the
    threshold is then, and how many references ``false_reject_rate`` needs."""
    return (f"{n} reference image{'s' if n != 1 else ''} cannot support "
            f"false_reject_rate={false_reject_rate:g}: the smallest rate they support is "
            f"1/(n+1) = {1 / (n + 1):.3g}, so {what}, which rejects a good part with "
            f"probability up to {1 / (n + 1):.3g}. Pass at least "
            f"{min_references(false_reject_rate)} defect-free references for "
            f"{false_reject_rate:g}, or raise false_reject_rate.")


def false_reject_bound(reference_scores, threshold):
    """The guaranteed false-reject rate of ``threshold``: ``(1 + #{s_i > threshold}) / (n + 1)``.

    For any threshold (conformal, tuned or set by hand), the probability that
    a new normal image, exchangeable with the references, scores above it is
    at most this (module docstring). For :func:`conformal_threshold` it is at
    most the ``false_reject_rate`` asked for, or ``1 / (n + 1)`` when that was
    too small.

    Examples
    --------
    >>> from skad.thresholds import false_reject_bound
    >>> false_reject_bound([0.1, 0.2, 0.3, 0.4], 0.25)   # (1 + 2) / 5
    0.6
    """
    scores = _check_scores(reference_scores)
    return float((1 + np.count_nonzero(scores > threshold)) / (len(scores) + 1))


def conformal_pvalues(reference_scores, scores):
    """Conformal p-values: ``(1 + #{reference scores >= s}) / (n + 1)`` for each score ``s``.

    Small = anomalous. For a normal image exchangeable with the references,
    ``P(p <= u) <= u`` for every ``u`` (Bates et al. 2023, marginal p-values):
    rejecting at ``p <= alpha`` rejects a good part with probability at most
    ``alpha``, and equals ``scores > conformal_threshold(reference_scores,
    alpha)`` whenever ``alpha >= 1 / (n + 1)``. Unlike a raw score, a p-value
    reads the same for every detector: 0.02 means that 2 % of good parts (plus
    one) score as high.

    Parameters
    ----------
    reference_scores : array-like of shape (n,)
    scores : array-like of shape (n_samples,)

    Returns
    -------
    p_values : ndarray of shape (n_samples,)
        In ``[1 / (n + 1), 1]``, non-increasing in the score.

    Examples
    --------
    >>> from skad.thresholds import conformal_pvalues
    >>> conformal_pvalues([1.0, 2.0, 3.0, 4.0], [0.5, 2.0, 3.5, 9.0])
    array([1. , 0.8, 0.4, 0.2])
    """
    refs = np.sort(_check_scores(reference_scores))
    scores = np.asarray(scores, dtype=np.float64)
    n_at_or_above = len(refs) - np.searchsorted(refs, scores, side="left")
    return (1 + n_at_or_above) / (len(refs) + 1)


# ------------------------------------------------------------------ pixel decisions
class Region(NamedTuple):
    """A connected region of predicted defect pixels (8-connected).

    Attributes
    ----------
    bbox : tuple of int
        ``(row0, col0, row1, col1)``, half-open as slices: the region lies in
        ``amap[row0:row1, col0:col1]``.
    area : int
        Its pixels.
    peak_score : float
        The largest map value in it.
    mean_score : float
        The mean map value over its pixels.
    """

    bbox: tuple
    area: int
    peak_score: float
    mean_score: float


def check_min_area(min_area):
    """``min_area`` as an int >= 1, or a ValueError naming it."""
    if isinstance(min_area, bool) or not isinstance(min_area, numbers.Integral) or min_area < 1:
        raise ValueError(f"min_area must be an int >= 1 (pixels); got {min_area!r}")
    return int(min_area)


def _labelled(amap, threshold, min_area):
    """``(amap, labels, kept)``: the 8-connected regions of ``amap > threshold`` labelled,
    those under ``min_area`` pixels set to 0, and the labels kept."""
    min_area = check_min_area(min_area)
    amap = np.asarray(amap)
    if amap.ndim != 2:
        raise ValueError(f"amap must be a 2-D map; got shape {amap.shape}")
    labels, n = ndimage.label(amap > threshold, structure=_EIGHT_CONNECTED)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    small = areas < min_area
    small[0] = True  # the background
    if small[1:].any():
        labels[small[labels]] = 0
    return amap, labels, areas, np.flatnonzero(~small)


def threshold_map(amap, threshold, *, min_area=1):
    """The predicted defect pixels of a map: ``amap > threshold``, without regions smaller
    than ``min_area`` pixels (8-connected).

    Examples
    --------
    >>> import numpy as np
    >>> from skad.thresholds import threshold_map
    >>> amap = np.zeros((6, 6)); amap[1:3, 1:3] = 5; amap[5, 5] = 5
    >>> int(threshold_map(amap, 1).sum()), int(threshold_map(amap, 1, min_area=2).sum())
    (5, 4)
    """
    return _labelled(amap, threshold, min_area)[1] > 0


def find_regions(amap, threshold, *, min_area=1, return_mask=False):
    """The connected regions (8-connected) of ``amap > threshold`` with at least ``min_area``
    pixels, the most anomalous (highest peak) first.

    Parameters
    ----------
    amap : ndarray of shape (height, width)
        An anomaly map, higher = more anomalous.
    threshold : float
        Pixels strictly above it are predicted defective.
    min_area : int, default=1
        Smaller regions are dropped (isolated noisy pixels).
    return_mask : bool, default=False
        Also return the pixels of the regions, as :func:`threshold_map` gives
        them, from the same labelling of the map.

    Returns
    -------
    regions : list of Region
    mask : ndarray of bool, shape (height, width)
        Only with ``return_mask=True``.

    Examples
    --------
    >>> import numpy as np
    >>> from skad.thresholds import find_regions
    >>> amap = np.zeros((8, 8)); amap[1:3, 1:4] = 2.0; amap[5:8, 6] = 3.0
    >>> for r in find_regions(amap, 1.0):
    ...     print(r.bbox, r.area, r.peak_score, r.mean_score)
    (5, 6, 8, 7) 3 3.0 3.0
    (1, 1, 3, 4) 6 2.0 2.0
    """
    amap, labels, areas, kept = _labelled(amap, threshold, min_area)
    regions = []
    if len(kept):
        peaks = ndimage.maximum(amap, labels, index=kept)
        means = ndimage.mean(amap, labels, index=kept)
        boxes = ndimage.find_objects(labels)
        for i, peak, mean in zip(kept, peaks, means):
            rows, cols = boxes[i - 1]
            regions.append(Region((rows.start, cols.start, rows.stop, cols.stop),
                                  int(areas[i]), float(peak), float(mean)))
        regions.sort(key=lambda r: -r.peak_score)
    return (regions, labels > 0) if return_mask else regions


# ------------------------------------------------------------------ thresholds from labels
_OBJECTIVES = ("f1", "balanced_accuracy", "recall_at_frr", "cost")


def _candidate_thresholds(scores):
    """Ascending thresholds, one per way ``scores > t`` can split the scores: midway between
    neighbouring distinct scores, below the lowest (reject all) and at the highest (none)."""
    u = np.unique(scores)
    below = u[0] - (u[1] - u[0]) / 2 if len(u) > 1 else np.nextafter(u[0], -np.inf)
    return np.r_[below, (u[:-1] + u[1:]) / 2, u[-1]]


def _objective_values(objective, y, flagged, max_false_reject_rate, false_reject_cost,
                      miss_cost):
    """The objective (higher = better) of each row of ``flagged (n_thresholds, n)``."""
    if callable(objective):
        return np.array([float(objective(y, f.astype(np.int64))) for f in flagged])
    n_pos, n_neg = int(y.sum()), int((y == 0).sum())
    tp = flagged[:, y == 1].sum(axis=1)
    fp = flagged[:, y == 0].sum(axis=1)
    recall, frr = tp / n_pos, fp / n_neg
    if objective == "f1":
        return 2 * tp / (2 * tp + fp + (n_pos - tp))
    if objective == "balanced_accuracy":
        return (recall + 1 - frr) / 2
    if objective == "recall_at_frr":
        return np.where(frr <= max_false_reject_rate, recall, -np.inf)
    return -(false_reject_cost * fp + miss_cost * (n_pos - tp))


def tune_threshold(detector, X, y, *, objective="f1", max_false_reject_rate=None,
                   false_reject_cost=1.0, miss_cost=1.0):
    """Set a detector's ``threshold_`` from labelled validation images, for an objective.

    The conformal ``threshold_`` needs normal images only and guarantees a
    false-reject rate; with labelled defective images as well, the threshold
    can be chosen for what the line values: F1, a catch rate at a bounded
    false-reject rate, or the cost of errors. Every way ``score > t`` splits
    the validation scores is tried (midway between neighbouring scores); of
    equally good thresholds the highest (fewest rejects) is kept.

    The detector keeps its reference: ``threshold_`` and ``false_reject_rate_``
    (now :func:`false_reject_bound` of the tuned threshold on the reference
    scores: the guaranteed false-reject rate that goes with it) change, and
    ``predict`` uses the tuned threshold until the next ``fit``,
    ``set_reference`` or ``recalibrate``, which recalibrate it conformally.
    ``pixel_threshold_`` is not changed. ``predict_pvalue`` is unchanged
    (p-values do not depend on the threshold).

    Why not scikit-learn's ``TunedThresholdClassifierCV`` or
    ``FixedThresholdClassifier``: they wrap binary classifiers (``classes_``
    and the classifier tag, checked by ``cv="prefit"`` and by
    ``FixedThresholdClassifier``), which a one-class detector fitted on
    normal images is not; and a threshold held by a wrapper would not reach
    ``predict_mask``, ``false_reject_rate_`` or ``skad score``.

    Parameters
    ----------
    detector : skad detector
        Fitted and with its reference set; the validation images must not be
        its references.
    X : ndarray, list of ndarray or list of path-like
        Validation images, normal and defective.
    y : array-like of shape (n_samples,)
        0 = normal, 1 = anomalous; both must be present.
    objective : {"f1", "balanced_accuracy", "recall_at_frr", "cost"} or callable, default="f1"
        What the threshold maximises on the validation images:

        - "f1": F1 of the anomalous class;
        - "balanced_accuracy": the mean of the catch rate (recall of the
          anomalous) and the pass rate of the normal images;
        - "recall_at_frr": the catch rate, among thresholds that reject at
          most ``max_false_reject_rate`` of the validation normals;
        - "cost": minus ``false_reject_cost * false rejects + miss_cost *
          missed defects``;
        - a callable ``objective(y_true, y_pred) -> float`` (higher is
          better), such as ``sklearn.metrics.fbeta_score`` with ``beta`` bound.
    max_false_reject_rate : float in [0, 1), optional
        For "recall_at_frr"; default: the detector's ``false_reject_rate``.
    false_reject_cost, miss_cost : float, default=1.0
        For "cost": the cost of rejecting a good part and of passing a
        defective one.

    Returns
    -------
    detector : skad detector
        The same detector, its ``threshold_`` tuned.

    Examples
    --------
    >>> from skad import PatchCore
    >>> from skad.datasets import make_textures
    >>> from skad.thresholds import tune_threshold
    >>> data = make_textures(n_domains=1, n_normal=16, n_anomalous=8, image_size=32,
    ...                      random_state=0)
    >>> normal = data.images[data.y == 0]
    >>> det = PatchCore(backbone="test_resnet", weights=None, image_size=32,
    ...                 false_reject_rate=0.2, random_state=0).fit(normal[:8])
    >>> X_val, y_val = data.images[8:], data.y[8:]      # 8 normal, 8 defective
    >>> det = tune_threshold(det, X_val, y_val, objective="f1")
    >>> bool((det.predict(X_val) == (det.decision_function(X_val) > det.threshold_)).all())
    True
    >>> 0 < det.false_reject_rate_ <= 1
    True
    """
    from ._images import check_images, check_labels
    from .metrics import check_image_labels

    if not (callable(objective) or objective in _OBJECTIVES):
        raise ValueError(f"objective must be one of {_OBJECTIVES} or a callable "
                         f"objective(y_true, y_pred); got {objective!r}")
    if max_false_reject_rate is None:
        max_false_reject_rate = getattr(detector, "false_reject_rate", None)
    if objective == "recall_at_frr" and not (
            isinstance(max_false_reject_rate, numbers.Real) and 0 <= max_false_reject_rate < 1):
        raise ValueError("max_false_reject_rate must be a float in [0, 1); got "
                         f"{max_false_reject_rate!r}")
    for name, cost in (("false_reject_cost", false_reject_cost), ("miss_cost", miss_cost)):
        if not (isinstance(cost, numbers.Real) and cost >= 0):
            raise ValueError(f"{name} must be a float >= 0; got {cost!r}")
    images = check_images(X)
    y = check_labels(y, len(images))
    check_image_labels(y)
    scores = detector.decision_function(images)
    thresholds = _candidate_thresholds(scores)
    flagged = scores[None, :] > thresholds[:, None]
    values = _objective_values(objective, y, flagged, max_false_reject_rate,
                               false_reject_cost, miss_cost)
    best = int(np.flatnonzero(values == values.max()).max())
    detector.threshold_ = float(thresholds[best])
    detector.false_reject_rate_ = false_reject_bound(detector.reference_scores_,
                                                     detector.threshold_)
    return detector
