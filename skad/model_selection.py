"""Reference-aware scoring for domain-wise cross-validation.

In a held-out domain a detector is told what normal looks like by a few
normal images (:meth:`~skad.base.BaseDetector.set_reference`), then scores the
rest. :class:`ReferenceScorer` does exactly that inside ``cross_validate`` or
``GridSearchCV``, so no reference image is ever scored.
"""

import warnings

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from ._images import check_images, check_labels
from ._params import REMOVED_IN, RENAMED_IN
from .thresholds import CalibrationWarning

__all__ = ["ReferenceScorer"]

_METRICS = {"roc_auc": roc_auc_score, "average_precision": average_precision_score}


class ReferenceScorer:
    """Score a fitted detector on a test fold after declaring references from it.

    In each test fold, ``n_references`` normal images (``y == 0``) are drawn
    with ``random_state``, passed to ``set_reference``, and the remaining
    images are scored with ``decision_function`` against their labels.

    Parameters
    ----------
    n_references : int, default=10
        Normal images of the test fold used as references (never scored).
    metric : {"roc_auc", "average_precision"}, default="roc_auc"
        Image-level metric on the remaining images (1 = anomalous).
    random_state : int, default=0
        Seeds the draw, so every candidate of a grid search sees the same
        references in the same fold.

    Notes
    -----
    The scorer calls ``set_reference`` on the estimator it is given (the
    fold's fitted copy in ``cross_validate`` and ``GridSearchCV``). It needs
    at least ``n_references + 1`` normal images and one anomalous image in
    each test fold. Its metrics rank the scores and do not use the
    threshold, so it silences the
    :class:`~skad.thresholds.CalibrationWarning` of references too few for
    the detector's ``false_reject_rate``.

    Examples
    --------
    >>> from sklearn.model_selection import LeaveOneGroupOut, cross_val_score
    >>> from skad import PatchCore
    >>> from skad.datasets import make_textures
    >>> from skad.model_selection import ReferenceScorer
    >>> data = make_textures(n_domains=2, n_normal=8, n_anomalous=4, image_size=32,
    ...                      random_state=0)
    >>> # 3 references per fold calibrate false-reject rates of 1/4 and above
    >>> det = PatchCore(backbone="test_resnet", weights=None, image_size=32,
    ...                 false_reject_rate=0.25)
    >>> scores = cross_val_score(det, data.images, data.y, groups=data.groups,
    ...                          cv=LeaveOneGroupOut(), scoring=ReferenceScorer(n_references=3))
    >>> scores.shape
    (2,)
    """

    def __init__(self, *, n_references=10, metric="roc_auc", random_state=0):
        self.n_references = n_references
        self.metric = metric
        self.random_state = random_state

    def split_references(self, y):
        """Indices ``(references, scored)`` of a fold with labels ``y``.

        Not a cross-validation splitter's ``split``: it divides one test fold
        into the references given to ``set_reference`` and the images scored.
        """
        y = np.asarray(y)
        normals = np.flatnonzero(y == 0)
        if self.n_references < 1:
            raise ValueError(f"n_references must be >= 1; got {self.n_references}")
        if len(normals) <= self.n_references:
            raise ValueError(
                f"the test fold has {len(normals)} normal images; the scorer needs more "
                f"than n_references={self.n_references} (some to reference, some to score)"
            )
        rng = np.random.default_rng(self.random_state)
        refs = np.sort(rng.choice(normals, size=self.n_references, replace=False))
        scored = np.setdiff1d(np.arange(len(y)), refs)
        if y[scored].min() == y[scored].max():
            raise ValueError("the scored part of the test fold holds one class only: "
                             "it needs normal and anomalous images")
        return refs, scored

    def __call__(self, estimator, X, y):
        if self.metric not in _METRICS:
            raise ValueError(f"metric must be one of {sorted(_METRICS)}; got {self.metric!r}")
        images = check_images(X)
        y = check_labels(y, len(images))
        refs, scored = self.split_references(y)
        with warnings.catch_warnings():
            # the metrics rank the scores: the threshold's rate does not matter here
            warnings.simplefilter("ignore", CalibrationWarning)
            estimator.set_reference(images.subset(refs))
        scores = estimator.decision_function(images.subset(scored))
        return float(_METRICS[self.metric](y[scored], scores))

    def split(self, y):
        """Deprecated in 0.2, removed in 0.3: :meth:`split_references`.

        Renamed because a scikit-learn ``split`` is a cross-validation
        splitter's, which yields train and test indices.
        """
        warnings.warn(f"ReferenceScorer.split was renamed split_references in {RENAMED_IN} and "
                      f"will be removed in {REMOVED_IN}", FutureWarning, stacklevel=2)
        return self.split_references(y)

    def __repr__(self):
        return (f"ReferenceScorer(n_references={self.n_references}, metric={self.metric!r}, "
                f"random_state={self.random_state})")
