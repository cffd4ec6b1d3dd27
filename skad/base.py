"""BaseDetector: the estimator contract every skad detector keeps.

The base class owns what is the same for every method: input checks, lazy
batched reading, device resolution, the reference and its conformal
thresholds (:mod:`skad.thresholds`), the decisions (``predict``,
``predict_pvalue``, ``predict_mask``, ``predict_regions``), ``score``,
metadata routing of ``groups`` and pickling with fitted state on the CPU. A
detector implements three hooks:

``_fit(images, y, groups)``
    Learn from the training images (an :class:`~skad._images.ImageSet`;
    one-class detectors get the normal images only).
``_set_reference(images, calibration)``
    Keep what scoring needs from all the reference images and return the
    scores and the maxima of the maps of the references at ``calibration``
    (sorted indices into ``images``, all of them unless
    ``max_calibration_references`` draws a subset; two arrays of shape
    ``(len(calibration),)``, the maps as ``_score_batch`` makes them at
    ``image_size``), leave-one-image-out where the references are the
    comparison set. The default scores and maps those references with
    ``_score_batch`` and keeps nothing: right for detectors whose references
    only calibrate the thresholds.
``_empty_networks(shapes)``
    Build the fitted networks' architectures without weights, for
    :func:`skad.load` (``skad._serialization``) to fill with saved tensors.
``_score_batch(batch, return_maps)``
    Score a batch ``(B, 3, H, W)`` of images in [0, 1] at ``image_size``:
    return ``(scores (B,), maps (B, h, w) or None)``, the maps only when
    ``return_maps`` is true.

A detector with a ``standardize_positions`` parameter gets the position
standardisation of :meth:`BaseDetector.set_reference` for free: its maps are
compared, position by position, with the references' maps.

Parameters are declared once, with their constraints, in scikit-learn's
``_parameter_constraints`` style (``sklearn.utils._param_validation``, and
:mod:`skad._params` for tuples, devices and integers that are not booleans).
:class:`BaseDetector` declares the eight every detector has (``image_size``,
``batch_size``, ``false_reject_rate``, ``max_calibration_references``,
``threshold_quantile`` (deprecated), ``device``, ``verbose``,
``random_state``); a detector merges its own into them::

    _parameter_constraints = {**BaseDetector._parameter_constraints,
                              "coreset_ratio": [Reals(0, 1, closed="right")], ...}

and covers every constructor parameter. They are validated at the start of
``fit`` and ``set_reference``, and again before scoring, because
``set_params`` may have changed a parameter since; a bad value raises
scikit-learn's ``InvalidParameterError`` (a ``ValueError`` and ``TypeError``)
naming the parameter and what it accepts, before any work starts. Checks that
relate several parameters (or a parameter and the backbone) stay in the
detector, where it builds what they concern. A renamed parameter keeps its old
name for one release (``_deprecated_parameters``, :mod:`skad._params`): the
detector reads it with ``self._param(new_name)``.

The docstring paragraphs of the shared parameters and fitted attributes are
written once too, in :mod:`skad._docstrings`: a detector's class docstring
names them (a line ``%(false_reject_rate)s``) and its ``@fill_doc`` decorator
puts them in at import.
"""

import contextlib
import copy
import warnings
from typing import ClassVar

import numpy as np
import torch
from sklearn import get_config
from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import Hidden, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._images import (
    aspect_warning,
    check_groups,
    check_images,
    check_labels,
    image_hw,
    iter_batches,
)
from ._maps import resize_maps
from ._params import Devices, Ints, Reals, Sequences, renamed_value, upgrade_state, warn_renamed
from ._random import seed_from
from ._threads import split_batch
from .metrics import check_image_labels, image_roc_auc
from .thresholds import (
    CalibrationWarning,
    check_min_area,
    conformal_pvalues,
    conformal_threshold,
    false_reject_bound,
    find_regions,
    min_references,
    threshold_map,
    too_few_references_message,
)

__all__ = ["BaseDetector", "resolve_device"]

#: what a detector without a reference needs, said to a Python user
_SET_REFERENCE = ("call set_reference(normals) with a few defect-free images of the target "
                  "domain")


def resolve_device(device):
    """``"auto"`` -> CUDA when available, else CPU; anything else -> ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} was asked for but CUDA is not available")
    return device


def row_blocks(n_rows, rows):
    """Slices of ``rows`` rows that cover ``range(n_rows)``: the blocks that bound the
    memory of a computation over many rows.

    A single slice of all rows while ``torch.export`` traces the scoring path
    (:mod:`skad._onnx`): there ``n_rows`` grows with the batch size, which the
    graph leaves open, and a loop over blocks would fix it.
    """
    if is_exporting():
        return [slice(None)]
    return [slice(start, start + rows) for start in range(0, n_rows, rows)]


def is_exporting():
    """Whether ``torch.export`` is tracing the code (never before torch 2.6, which cannot
    export skad's detectors: :mod:`skad._onnx`)."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(exporting is not None and exporting())


def check_reference(detector, *, subject=None, remedy=_SET_REFERENCE, error=RuntimeError):
    """Raise ``error`` unless ``detector`` has a reference (its ``threshold_``).

    An unfitted detector has none either. The message names the detector as
    ``subject`` (default: its class) and ends with ``remedy``, what the caller's
    user does about it: the command line and :mod:`skad.scoring` say it their way.
    """
    if not hasattr(detector, "threshold_"):
        raise error(f"{subject or type(detector).__name__} has no reference yet: {remedy}")


def _to_cpu(obj):
    """A copy of ``obj`` whose modules and tensors live on the CPU (``obj`` if already)."""
    if isinstance(obj, torch.nn.Module):
        on_cpu = all(t.device.type == "cpu" for t in obj.state_dict().values())
        return obj if on_cpu else copy.deepcopy(obj).cpu()
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


#: the default false_reject_rate of every detector: the smallest rate that 19 references
#: support (skad.thresholds.min_references)
_DEFAULT_FALSE_REJECT_RATE = 0.05
#: images a warning names one by one (the rest are counted)
_NAMED_IMAGES = 5
#: why a reference's own score says little (ReferenceScoredWarning)
_IN_SAMPLE = ("A reference is part of what it is compared with, so it scores lower than a new "
              "good part would; judge the detector on images held out of its references")
#: references needed to estimate the spread of the maps at each position
_MIN_POSITION_REFERENCES = 3
#: the spread at a position is at least this share of the spread over all positions:
#: where the references' maps hardly vary (a uniform background), float noise would
#: otherwise become a large standardised score
_SPREAD_FLOOR = 0.1


class ReferenceScoredWarning(UserWarning):
    """Scored images were references of the detector: their scores are in-sample.

    A reference is part of what it is compared with (PatchCore's memory bank,
    the position statistics of ``standardize_positions``), so it scores lower
    than a new good part would. Told by the decoded pixels
    (``reference_digests_``). ``indices`` holds their positions among the
    images scored.
    """

    def __init__(self, message, indices=()):
        super().__init__(message)
        self.indices = list(indices)


def _spread(var):
    """Standard deviation per position from a variance map, floored (``_SPREAD_FLOOR``)."""
    std = var.clamp(min=0).sqrt()
    return std.clamp(min=_SPREAD_FLOOR * float(var.clamp(min=0).mean().sqrt()) + 1e-12)


def _self_calibration_message(false_reject_rate):
    """What :class:`CalibrationWarning` says of a single reference scored against itself."""
    return ("its one reference image was scored against its own patches (each without "
            "its 3 x 3 neighbourhood), which resemble it more than a new image of the "
            "surface does, so threshold_ and pixel_threshold_ carry no false-reject "
            "guarantee, whatever the rate: good parts may be rejected far more often "
            f"than {false_reject_rate:g}. Pass at least "
            f"{max(2, min_references(false_reject_rate))} defect-free references.")


def _training_set_message(false_reject_rate, n_trained_on, n_references):
    """What :class:`CalibrationWarning` says of references the networks were trained on:
    all of them (after ``fit``) or ``n_trained_on`` of the ``n_references``."""
    if n_trained_on == n_references:
        which = ("the training images, which the networks learned from and score lower than "
                 "new good parts")
    else:
        one = n_trained_on == 1
        which = (f"{n_references} reference images, {n_trained_on} of which "
                 f"{'is a training image' if one else 'are training images'} (the same "
                 "decoded pixels, such as a blank tile past a part's edge): the networks "
                 f"learned from {'it' if one else 'them'} and score {'it' if one else 'them'} "
                 "lower than new good parts")
    return (f"threshold_ and pixel_threshold_ were calibrated on {which}, so they carry no "
            "false-reject guarantee: good parts may be rejected far more often than "
            f"{false_reject_rate:g}. Call set_reference with at least "
            f"{max(2, min_references(false_reject_rate))} defect-free images held out from "
            "training (skad fit --reference) for the guarantee.")


class BaseDetector(BaseEstimator):
    """Base class for skad detectors; see the module docstring for the hooks.

    Scores follow the PyOD convention: higher is more anomalous.
    """

    # `groups` is requested for `fit` under metadata routing by default, so that
    # GridSearchCV(..., cv=LeaveOneGroupOut()).fit(X, y, groups=g) reaches `fit`.
    __metadata_request__fit = {"groups": True}

    #: one-class detectors learn from the normal images only
    _one_class = True

    #: detectors that compare an image with their references' patches (PatchCore,
    #: MetaComparer) score a single reference against its own other patches
    _compares_with_references = False

    # the parameters every detector has; a detector adds its own (module docstring)
    _parameter_constraints: ClassVar[dict] = {
        "image_size": [Ints(1), Sequences(Ints(1), length=2)],
        "batch_size": [Ints(1)],
        "false_reject_rate": [Reals(0, 1, closed="neither")],
        "max_calibration_references": [Ints(1), None],
        # deprecated in 0.2 for false_reject_rate: taken with a FutureWarning, not advertised
        "threshold_quantile": [Reals(0, 1), Hidden(StrOptions({"deprecated"}))],
        # None is read as "auto" (resolve_device): still taken, not advertised
        "device": [Devices(), Hidden(None)],
        "verbose": ["verbose"],
        # sklearn's "random_state" and numpy's Generator (skad._random.seed_from)
        "random_state": [Ints(0, 2**32 - 1), np.random.RandomState, np.random.Generator, None],
    }

    #: renamed parameters, old name -> new name (or ``(new name, convert)``): the old
    #: names work for one release, with a FutureWarning (skad._params)
    _deprecated_parameters: ClassVar[dict] = {}

    #: the parameters scoring reads that change the scores or maps: the thresholds, reference
    #: scores and position statistics that set_reference calibrates hold at their values then
    #: (``calibrated_params_``; :meth:`_check_calibrated`). A detector adds its own.
    _scoring_parameters: ClassVar[tuple] = ("image_size",)

    def _check_params(self):
        """Validate every parameter against ``_parameter_constraints``.

        Skipped, as scikit-learn skips it, under
        ``sklearn.config_context(skip_parameter_validation=True)``. Warns
        (``FutureWarning``) for each deprecated old name that is set.
        """
        if not get_config()["skip_parameter_validation"]:
            self._validate_params()
        warn_renamed(self)

    def _check_param_relations(self):
        """What ``_parameter_constraints`` cannot say (one parameter against another);
        ``fit`` checks it before reading an image. Detectors override it."""

    def _param(self, name):
        """Parameter ``name``, or its deprecated old name's value where that is set."""
        return renamed_value(self, name)

    def _store_parameters(self, arguments):
        """Store a constructor's arguments as attributes, as given.

        scikit-learn's constructors only store their parameters (``self.x =
        x``), under the names of the signature, where :meth:`get_params` and
        ``clone`` read them back. A detector's ``__init__`` calls
        ``self._store_parameters(locals())`` and does nothing else, so each of
        its parameters is written once, in its signature (with its default);
        nothing is validated or converted here (:meth:`_check_params` does
        that in ``fit``).

        Parameters
        ----------
        arguments : dict
            The constructor's ``locals()``: every name of its signature.
        """
        for name in self._get_param_names():
            setattr(self, name, arguments[name])

    # ----------------------------------------------------------- fitting
    def fit(self, X, y=None, groups=None):
        """Fit the detector.

        Parameters
        ----------
        X : ndarray, list of ndarray or list of path-like
            Training images (see :func:`skad._images.check_images`).
        y : array-like of shape (n_samples,), optional
            0 = normal, 1 = anomalous. One-class detectors use the normal
            images only (all of ``X`` when ``y`` is None) and warn how many
            anomalous images they left out.
        groups : array-like of shape (n_samples,), optional
            Domain of each image. Requested by default under metadata routing;
            one-class detectors ignore it.

        Returns
        -------
        self : object

        Warns
        -----
        UserWarning, skad.thresholds.CalibrationWarning
            As :meth:`set_reference`, where the training images are the
            references (one-class detectors); and, at any rate, where the
            detector learned from them (GeneralAD, MMR, GlobalLocal: they score
            lower than new good parts, so ``false_reject_rate_`` is 1.0 until
            :meth:`set_reference` gives other images).
        UserWarning
            Before the training, where resizing to ``image_size`` changes the
            height-to-width ratio of training images more than 1.5 times (an int
            ``image_size`` squashes 1240 x 500 images 2.5 times): it names the
            count, the most distorted image and an ``image_size`` pair that keeps
            their ratio, or, where their ratios lie too far apart for any, the
            pair that distorts the worst of them least.

        Raises
        ------
        sklearn.utils._param_validation.InvalidParameterError
            A ``ValueError`` naming the parameter, if one is out of its
            constraints; before any image is read.
        ValueError
            If ``standardize_positions=True`` and fewer than 3 normal images are
            given; before the training.
        """
        self._check_params()
        self._check_param_relations()
        images = check_images(X)
        if y is not None:
            y = check_labels(y, len(images))
        if groups is not None:
            groups = check_groups(groups, len(images))
        # a failed fit leaves a previously fitted detector exactly as it was
        snapshot = dict(self.__dict__)
        try:
            learned = self._one_class and not self._compares_with_references
            if learned:  # set_reference tells these images among its references
                images.record_digests()
            if self._one_class:
                images = self._normal_subset(images, y)
                # before the training, not after
                self._check_reference_count(len(images), "training images (its first references)")
            distorted = aspect_warning(images, self.image_size)
            if distorted:  # before the training: a long fit can be stopped at once
                warnings.warn(distorted, UserWarning, stacklevel=2)
            self._fit(images, y, groups)
            self.n_samples_fit_ = len(images)
            if learned:
                self.training_digests_ = np.array(sorted(images.read_digests()),
                                                  dtype=np.int64)
            if self._one_class:
                # a detector that learned from these images scores them lower than new
                # good parts: no false-reject rate is guaranteed until set_reference
                self._update_reference(images, trained_on=learned, role="training images")
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(snapshot)
            raise
        return self

    def _normal_subset(self, images, y):
        if y is None:
            return images
        n_anomalous = int(y.sum())
        if n_anomalous:
            warnings.warn(
                f"{type(self).__name__} is a one-class detector: left out {n_anomalous} "
                f"anomalous images (y == 1) of {len(y)}; fitting on {len(y) - n_anomalous}.",
                UserWarning,
                stacklevel=3,
            )
        if n_anomalous == len(y):
            raise ValueError("y marks every image anomalous: no normal image to fit on")
        return images.subset(np.flatnonzero(y == 0))

    def set_reference(self, normals):
        """Declare the normal appearance of the domain to be scored next.

        Keeps what scoring needs from the reference images (one forward pass,
        no retraining), scores them (``reference_scores_``, and the maxima of
        their maps, ``reference_map_maxima_``), leave-one-image-out where the
        references are also the comparison set, and calibrates the thresholds
        on them (:meth:`recalibrate`): ``threshold_``, rejecting a good part
        with probability at most ``false_reject_rate``, and
        ``pixel_threshold_``. With more references than
        ``max_calibration_references``, all of them serve as the reference
        (a comparison set keeps them all) and that many of them, drawn at
        random with ``random_state`` (``calibration_indices_``), are scored
        and calibrate: a random subset is exchangeable with new good parts as
        the whole set is, so the guarantee holds with ``n`` the subset's
        size, and the time of the scoring no longer grows with the number of
        references. The guarantee holds for references the detector
        was not trained on: after ``fit``, a detector that learned from its
        training images (GeneralAD, MMR, GlobalLocal) scores them lower than
        new good parts, so call ``set_reference`` with held-out normals before
        relying on the rate (until then ``false_reject_rate_`` is 1.0; references
        with the same pixels as a training image are recognised and keep it
        there: ``n_references_trained_on_``). A
        single reference of a detector whose references are the comparison
        set (PatchCore, MetaComparer) is scored against its own other
        patches, not as a new image is: no rate is guaranteed then
        (:class:`~skad.thresholds.CalibrationWarning` at any rate; two
        references are scored against each other). A detector with
        ``standardize_positions=True`` also keeps the mean and standard
        deviation of the references' maps at each position (``position_mean_``,
        ``position_std_``, arrays of shape ``image_size``) and scores an image
        by its standardised map (see
        :meth:`predict_map`); the references' own scores are then each computed
        against the other references' statistics.

        Parameters
        ----------
        normals : ndarray, list of ndarray or list of path-like
            Defect-free images of the target domain (1 to a few hundred; at
            least 3 with ``standardize_positions=True``; at least
            ``skad.thresholds.min_references(false_reject_rate)`` for the
            guarantee, 19 for the default 0.05).

        Warns
        -----
        skad.thresholds.CalibrationWarning
            When the references are too few for ``false_reject_rate``
            (``false_reject_rate < 1 / (n + 1)``): the thresholds are then the
            largest reference score and map maximum, ``false_reject_rate_`` is
            ``1 / (n + 1)``; and, at any rate, for PatchCore's and
            MetaComparer's single reference.
        UserWarning
            When reference images are one uniform value (a blank tile past a
            part's or fabric's edge), with their count, indices and paths (the
            first five); they are kept.

        Raises
        ------
        ValueError
            If ``standardize_positions=True`` and fewer than 3 images are given,
            or a parameter is out of its constraints (``InvalidParameterError``).
            A failed call keeps the previous reference.

        Returns
        -------
        self : object
        """
        self._check_params()
        check_is_fitted(self)
        return self._update_reference(check_images(normals, name="normals"))

    def _update_reference(self, images, trained_on=False, role="reference images"):
        """:meth:`set_reference` on checked images and parameters; ``trained_on``: the
        images are those the detector just learned from; ``role``: what the warnings
        call them (``fit``: the training images, which are its first references)."""
        snapshot = dict(self.__dict__)
        # to tell training images among the references, and the references among scored images
        images.record_digests()
        try:
            calibration = self._calibration_indices(len(images))
            if self._standardizes_positions():
                # an image's score is the maximum of its standardised map
                scores = maxima = self._set_position_statistics(images, calibration)
            else:
                scores, maxima = self._set_reference(images, calibration)
                # statistics of an earlier reference must not outlive it
                self.__dict__.pop("position_mean_", None)
                self.__dict__.pop("position_std_", None)
            self.reference_scores_ = np.asarray(scores, dtype=np.float64)
            self.reference_map_maxima_ = np.asarray(maxima, dtype=np.float64)
            self.n_references_ = len(images)
            self.calibration_indices_ = calibration
            self.n_references_trained_on_ = (len(images) if trained_on else
                                             self._count_training_images(images))
            self.reference_digests_ = np.array(sorted(images.read_digests()), dtype=np.int64)
            self.calibrated_params_ = self._scoring_values()
            self._calibrate(stacklevel=4)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(snapshot)
            raise
        self._warn_constant_references(images, role, stacklevel=4)
        return self

    def _warn_constant_references(self, images, role, stacklevel):
        """Warn when reference (or training: ``role``) images read were one uniform value:
        a blank tile (past a part's or fabric's edge) holds nothing to compare with."""
        constant = sorted(getattr(images, "constant", ()))
        if constant:
            named = ", ".join(images.describe(i) for i in constant[:_NAMED_IMAGES])
            if len(constant) > _NAMED_IMAGES:
                named += f" and {len(constant) - _NAMED_IMAGES} more"
            verb = "is" if len(constant) == 1 else "are"
            warnings.warn(
                f"{type(self).__name__}: {len(constant)} of the {len(images)} {role} {verb} "
                f"one uniform value (every pixel alike): {named}. A blank image holds no "
                f"texture to compare with: leave such images out of the {role} unless blank "
                "parts are normal here", UserWarning, stacklevel=stacklevel)

    def _calibration_indices(self, n_references):
        """Sorted indices of the references whose scores calibrate the thresholds.

        All of them (``arange``, nothing drawn) when ``max_calibration_references``
        is None or at least ``n_references``; else that many, drawn without
        replacement from a generator seeded by ``random_state``. A subset drawn
        independently of the images is exchangeable with new good parts as the
        whole set is: the conformal guarantee holds with ``n`` the subset's size.
        """
        size = self.max_calibration_references
        if size is None or n_references <= size:
            return np.arange(n_references)
        rng = np.random.default_rng(seed_from(self.random_state))
        return np.sort(rng.choice(n_references, size, replace=False))

    def _empty_networks(self, shapes):
        """The fitted networks' architectures, randomly initialised, by attribute name.

        :func:`skad.load` fills them with the saved tensors. Built from the
        parameters and the fitted attributes that are not networks, without
        reading or downloading pretrained weights; ``shapes`` maps each saved
        tensor's name (``"<attribute>.<parameter name>"``) to its shape, for
        sizes the parameters do not fix.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be loaded from a model file")

    def _set_reference(self, images, calibration):
        """Default: the own scores and map maxima of the references at ``calibration``, for
        detectors that compare an image with itself (its reconstruction, its surroundings),
        where references only calibrate."""
        def outputs(batch):
            scores, maps = self._score_batch(batch, True)
            return scores.float(), maps.flatten(1).amax(dim=1).float()

        scores, maxima = self._map_images_multi(images.subset(calibration), outputs,
                                                desc="reference scores", split=True)
        return scores.numpy(), maxima.numpy()

    # ----------------------------------------------------------- calibration
    def recalibrate(self):
        """Recompute the thresholds from the stored reference scores, for the current
        ``false_reject_rate``.

        :meth:`set_reference` and ``fit`` calibrate; after
        ``set_params(false_reject_rate=...)`` this applies the new rate at
        once, without reading any image: ``threshold_`` and
        ``pixel_threshold_`` become the conformal order statistics of
        ``reference_scores_`` and ``reference_map_maxima_``
        (:func:`skad.thresholds.conformal_threshold`), ``false_reject_rate_``
        the rate ``threshold_`` guarantees. It also undoes
        :func:`skad.thresholds.tune_threshold`.

        Returns
        -------
        self : object

        Warns
        -----
        skad.thresholds.CalibrationWarning
            When the references are too few for ``false_reject_rate``, or are
            PatchCore's or MetaComparer's single reference.
        """
        self._check_ready()
        self._check_params()
        self._check_calibrated(decisions=True)
        if not hasattr(self, "reference_map_maxima_"):
            raise RuntimeError(self._needs_new_reference("its reference maps' maxima"))
        self._calibrate(stacklevel=3)
        return self

    def _calibrate(self, stacklevel):
        """``threshold_``, ``false_reject_rate_`` and ``pixel_threshold_`` from the stored
        reference scores and map maxima (module :mod:`skad.thresholds`)."""
        scores, maxima = self.reference_scores_, self.reference_map_maxima_
        on_itself = self._calibrated_on_itself()
        if self.threshold_quantile != "deprecated":
            warnings.warn(
                "threshold_quantile is deprecated since skad 0.2 and will be removed in 0.3: "
                "set false_reject_rate (the accepted rate of good parts rejected; about "
                f"1 - threshold_quantile) instead. threshold_ is still the "
                f"threshold_quantile={self.threshold_quantile:g} quantile of the reference "
                "scores, without the conformal guarantee.", FutureWarning, stacklevel=stacklevel)
            threshold = float(np.quantile(scores, self.threshold_quantile))
            pixel_threshold = float(np.quantile(maxima, self.threshold_quantile))
        else:
            rate = self.false_reject_rate
            if on_itself:
                warnings.warn(f"{type(self).__name__}: " + _self_calibration_message(rate),
                              CalibrationWarning, stacklevel=stacklevel)
            elif self._calibrated_on_training_set():
                message = _training_set_message(rate, self.n_references_trained_on_,
                                                self.n_references_)
                warnings.warn(f"{type(self).__name__}: " + message, CalibrationWarning,
                              stacklevel=stacklevel)
            elif len(scores) < min_references(rate):
                what = ("threshold_ is the largest reference score (and pixel_threshold_ the "
                        "largest maximum of their maps)")
                message = too_few_references_message(len(scores), rate, what)
                n_references = getattr(self, "n_references_", len(scores))
                if len(scores) < n_references:  # the cap, not the references, limits it
                    need = min_references(rate)
                    message += (f" Only max_calibration_references={len(scores)} of the "
                                f"{n_references} references calibrate: "
                                + (f"set it to at least {need} (or None)."
                                   if n_references >= need else
                                   f"even all {n_references} (None) are fewer than {need}."))
                warnings.warn(f"{type(self).__name__}: " + message, CalibrationWarning,
                              stacklevel=stacklevel)
            threshold = conformal_threshold(scores, rate, warn=False)
            pixel_threshold = conformal_threshold(maxima, rate, warn=False)
        self.threshold_ = threshold
        # a reference scored against itself, or by networks trained on it, bounds nothing:
        # 1.0, the trivial bound
        self.false_reject_rate_ = (1.0 if on_itself or self._calibrated_on_training_set()
                                   else false_reject_bound(scores, threshold))
        self.pixel_threshold_ = pixel_threshold

    def _calibrated_on_itself(self):
        """Whether the one reference was scored against its own patches: not a new image's
        score, so no rate is guaranteed."""
        return self._compares_with_references and getattr(self, "n_references_", 0) == 1

    def _calibrated_on_training_set(self):
        """Whether references are images the networks were trained on (after a
        one-class ``fit`` of GeneralAD, MMR or GlobalLocal, all of them): they score lower
        than new good parts, so no rate is guaranteed."""
        return getattr(self, "n_references_trained_on_", 0) > 0

    def _count_training_images(self, images):
        """How many of the reference ``images`` read are training images of a detector
        that learned from them, told by their decoded pixels (``training_digests_``)."""
        trained = getattr(self, "training_digests_", None)
        if trained is None:  # PatchCore, MetaComparer, or a model saved before
            return 0
        return len(images.read_digests() & set(trained.tolist()))

    def _needs_new_reference(self, what):
        return (f"{type(self).__name__} was calibrated by an earlier skad without {what}: "
                "call set_reference(normals) again")

    def _scoring_values(self):
        """The current values of ``_scoring_parameters`` (``image_size`` as a pair, as
        scoring reads it; ``standardize_positions`` where the detector has it)."""
        names = list(self._scoring_parameters)
        if "standardize_positions" in self._get_param_names():
            names.append("standardize_positions")
        values = {name: self._param(name) for name in names}
        if "image_size" in values:
            values["image_size"] = tuple(image_hw(values["image_size"]))
        return values

    def _changed_since_calibration(self):
        """``(how many, "sigma from 4.0 to 2.0, ...")``: the scoring parameters ``set_params``
        changed since the reference was set (``calibrated_params_``); ``(0, "")`` if none."""
        then = getattr(self, "calibrated_params_", None)
        if then is None:  # a model saved before skad recorded them
            return 0, ""
        now = self._scoring_values()
        changed = [name for name in now if name in then and now[name] != then[name]]
        return len(changed), ", ".join(f"{name} from {then[name]!r} to {now[name]!r}"
                                       for name in changed)

    def _check_calibrated(self, decisions, stacklevel=4):
        """Raise, or warn, when ``set_params`` changed a scoring parameter since
        ``set_reference`` (or ``fit``) calibrated at its earlier value.

        The thresholds, the reference scores (p-values) and the position
        statistics hold for scores at the values they were computed at
        (``calibrated_params_``). Decisions (``decisions``: :meth:`predict`,
        :meth:`predict_pvalue`, :meth:`predict_mask`, :meth:`recalibrate`,
        ONNX export, :func:`skad.scoring.score_files`) and maps standardised by
        position (``standardize_positions`` now true) would be wrong:
        ``ValueError``; scores and maps alone are right at the new value:
        :class:`~skad.thresholds.CalibrationWarning`.
        """
        n_changed, changed = self._changed_since_calibration()
        if not n_changed:
            return
        calibrated = "threshold_, pixel_threshold_ and reference_scores_"
        if self._standardizes_positions():  # and the maps are standardised by them
            calibrated += " and the position statistics"
        several = n_changed > 1
        message = (f"{type(self).__name__}: set_params changed {changed} since set_reference "
                   f"(or fit) calibrated {calibrated} on the scores at the earlier "
                   f"value{'s' if several else ''}")
        remedy = (f"call set_reference(normals) to calibrate at the new "
                  f"value{'s' if several else ''}, or set {'them' if several else 'it'} back")
        if decisions or self._standardizes_positions():
            raise ValueError(f"{message}: {remedy}")
        warnings.warn(CalibrationWarning(
            f"{message}. The scores are at the new value{'s' if several else ''}; every "
            "decision (predict, predict_pvalue, predict_mask, predict_regions, recalibrate, "
            "ONNX export, skad score) refuses until set_reference(normals) calibrates at "
            f"{'them' if several else 'it'}, or {'they are' if several else 'it is'} set back"),
            stacklevel=stacklevel)

    def _standardizes_positions(self):
        # a bool: the constraints of the detectors that have the parameter say so
        return bool(getattr(self, "standardize_positions", False))

    def _check_reference_count(self, n, what="reference images"):
        """Raise if ``n`` reference images (``what``, as the message names them) are
        fewer than the detector can calibrate on."""
        need, param = self._min_references()
        if n < need:
            raise ValueError(
                f"{type(self).__name__}({param}=True) needs at least {need} reference "
                f"images to estimate the spread of the maps at each position; got {n} {what}. "
                f"Pass more defect-free images, or {param}=False")

    def _min_references(self):
        """The fewest reference images ``fit`` (one-class) or ``set_reference`` accepts,
        and the parameter that sets it (None: any one image will do): position
        statistics need a spread, so a few images."""
        if self._standardizes_positions():
            return _MIN_POSITION_REFERENCES, "standardize_positions"
        return 1, None

    def _set_position_statistics(self, images, calibration):
        """Keep the mean and spread of the references' maps at each position.

        A detector whose maps run systematically higher or noisier at some
        positions (the border cells, where convolutions see padding and context
        windows reach past the image) would otherwise score every normal image
        by those positions. The statistics come from every reference; returns
        the scores of the references at ``calibration``, each against the
        statistics of the other references (leave one image out), so that the
        threshold is not calibrated on images that set their own statistics.
        """
        n = len(images)
        self._check_reference_count(n)
        maps = self._map_images(images, lambda batch: self._score_batch(batch, True)[1],
                                desc="reference maps", split=True).double()
        s1, s2 = maps.sum(dim=0), maps.square().sum(dim=0)
        mean = s1 / n
        self.position_mean_ = mean.float().numpy()
        self.position_std_ = _spread(s2 / n - mean.square()).float().numpy()
        scores = np.empty(len(calibration))
        for k, i in enumerate(calibration.tolist()):
            amap = maps[i]
            loo_mean = (s1 - amap) / (n - 1)
            loo_var = (s2 - amap.square()) / (n - 1) - loo_mean.square()
            scores[k] = float(((amap - loo_mean) / _spread(loo_var)).max())
        return scores

    # ----------------------------------------------------------- scoring
    def decision_function(self, X):
        """Anomaly score of each image; higher is more anomalous.

        Returns
        -------
        scores : ndarray of shape (n_samples,)

        Warns
        -----
        ReferenceScoredWarning
            Where images scored are references of the detector (the same
            decoded pixels), named, and references are part of what images are
            compared with (PatchCore, MetaComparer, ``standardize_positions``):
            their scores are in-sample, lower than a new good part's. Every
            scoring method warns alike.
        skad.thresholds.CalibrationWarning
            When ``set_params`` changed a parameter that scoring reads since the
            reference was set (``calibrated_params_``): the scores are at the
            new value, the thresholds are not.

        Raises
        ------
        ValueError
            Instead of that warning, with ``standardize_positions=True``: the
            position statistics follow the maps (call ``set_reference``).
        """
        return self._predict(X, return_maps=False)[0]

    def predict_map(self, X):
        """Anomaly maps aligned pixel for pixel with the input images.

        Returns
        -------
        maps : ndarray of shape (n_samples, height, width) or list of ndarray
            An array when all images share one size, else a list of 2-D arrays.
            In the detector's own units; with ``standardize_positions=True``, in
            standard deviations above the references' mean at the same position
            (``(map - position_mean_) / position_std_``, computed at
            ``image_size`` before resizing to each image's size).
        """
        return self.score_and_map(X)[1]

    def score_and_map(self, X):
        """``decision_function(X)`` and ``predict_map(X)`` in one pass over the images."""
        scores, maps = self._predict(X, return_maps=True)
        if len({m.shape for m in maps}) == 1:
            maps = np.stack(maps)
        return scores, maps

    def predict(self, X):
        """0 (normal) / 1 (anomalous): ``decision_function(X) > threshold_``.

        With the conformal ``threshold_`` (the default), a good part
        exchangeable with the references is rejected with probability at most
        ``false_reject_rate_``, and ``predict(X) == (predict_pvalue(X) <=
        false_reject_rate_)`` exactly.

        Raises ``ValueError`` when ``set_params`` changed a parameter that
        scoring reads since the reference was set (``calibrated_params_``), as
        :meth:`predict_pvalue`, :meth:`predict_mask` and :meth:`recalibrate` do:
        ``threshold_`` holds at the earlier value (call ``set_reference``).
        """
        self._check_ready()
        self._check_calibrated(decisions=True)
        return (self.decision_function(X) > self.threshold_).astype(np.int64)

    def predict_pvalue(self, X):
        """Conformal p-value of each image against the references; small = anomalous.

        ``(1 + #{reference_scores_ >= s}) / (n + 1)`` for each score ``s`` of
        :meth:`decision_function`, ``n = len(reference_scores_)`` (the
        references that calibrate: ``n_references_``, or
        ``max_calibration_references`` of them)
        (:func:`skad.thresholds.conformal_pvalues`): the share of good parts
        (plus one) that score at least as high, so that a good part gets
        ``p <= u`` with probability at most ``u``, whatever the detector and
        its units. Named as scikit-learn's ``predict_proba``, but not a
        probability of being anomalous: good parts get p-values spread evenly
        over ``(0, 1]``, and an image scoring above every reference gets the
        smallest, ``1 / (n + 1)`` (:mod:`skad.thresholds` says why this name).

        Returns
        -------
        p_values : ndarray of shape (n_samples,)
            In ``[1 / (n + 1), 1]``, non-increasing in the score.
        """
        self._check_ready()
        self._check_calibrated(decisions=True)
        return conformal_pvalues(self.reference_scores_, self.decision_function(X))

    def predict_mask(self, X, *, min_area=1):
        """Predicted defect pixels: ``predict_map(X) > pixel_threshold_``, aligned with each
        image.

        ``pixel_threshold_`` is calibrated like ``threshold_``, on the maxima
        of the references' maps (leave-one-image-out where the references are
        the comparison set), so that a good part gets an empty mask except
        with probability at most ``false_reject_rate`` (at most
        ``1 / (n_references_ + 1)`` when the references are too few). This is
        an image-level guarantee on the whole mask, not a rate per pixel.

        Parameters
        ----------
        X : ndarray, list of ndarray or list of path-like
        min_area : int, default=1
            Regions (8-connected) of fewer pixels are left out of the mask,
            counted at each image's own size. Dropping pixels keeps the
            guarantee.

        Returns
        -------
        masks : ndarray of bool, shape (n_samples, height, width), or list of ndarray
            As :meth:`predict_map`: an array when all images share one size,
            else a list of 2-D arrays.
        """
        check_min_area(min_area)
        self._check_pixel_ready()
        maps = self.predict_map(X)
        masks = [threshold_map(m, self.pixel_threshold_, min_area=min_area) for m in maps]
        return np.stack(masks) if isinstance(maps, np.ndarray) else masks

    def predict_regions(self, X, *, min_area=1):
        """Defect regions of each image: the connected regions of :meth:`predict_mask`.

        Parameters
        ----------
        X : ndarray, list of ndarray or list of path-like
        min_area : int, default=1
            Regions of fewer pixels (at each image's own size) are left out.

        Returns
        -------
        regions : list of list of skad.thresholds.Region
            Per image, its regions, highest peak first, each with ``bbox``
            ``(row0, col0, row1, col1)`` (half-open, in the image's pixels),
            ``area`` (pixels), ``peak_score`` and ``mean_score`` (map values).
            An empty list for an image without predicted defect pixels.

        Examples
        --------
        >>> from skad.datasets import make_textures
        >>> from skad import PatchCore
        >>> data = make_textures(n_domains=1, n_normal=24, n_anomalous=4, image_size=32,
        ...                      random_state=0)
        >>> normal = data.images[data.y == 0]
        >>> det = PatchCore(backbone="test_resnet", weights=None, image_size=32,
        ...                 false_reject_rate=0.1, random_state=0).fit(normal[:20])
        >>> det.false_reject_rate_ <= 0.1
        True
        >>> test = data.images[data.y == 1]
        >>> p = det.predict_pvalue(test)
        >>> bool(((p <= det.false_reject_rate_) == det.predict(test)).all())
        True
        >>> det.predict_mask(test).shape
        (4, 32, 32)
        >>> regions = det.predict_regions(test, min_area=4)
        >>> all(r.area >= 4 for image in regions for r in image)
        True
        """
        min_area = check_min_area(min_area)
        self._check_pixel_ready()
        maps = self.predict_map(X)
        return [find_regions(m, self.pixel_threshold_, min_area=min_area) for m in maps]

    def _check_pixel_ready(self):
        self._check_ready()
        if not hasattr(self, "pixel_threshold_"):
            raise RuntimeError(self._needs_new_reference("a pixel threshold"))
        self._check_calibrated(decisions=True)

    def score(self, X, y):
        """Image-level ROC AUC of ``decision_function(X)`` against ``y`` (1 = anomalous).

        Raises
        ------
        ValueError
            If ``y`` does not hold both classes (as
            :func:`skad.metrics.image_roc_auc`), before any image is scored.
        """
        images = check_images(X)
        y = check_labels(y, len(images))
        check_image_labels(y)
        return image_roc_auc(y, self.decision_function(images))

    def _predict(self, X, return_maps):
        self._check_ready()
        # set_params after fit may have changed what scoring reads (batch_size, device,
        # iad_score_weight, ...): a bad value is named here rather than failing inside a batch
        self._check_params()
        self._check_calibrated(decisions=False)
        images = check_images(X)
        device = resolve_device(self.device)
        self._to_device(device)
        statistics = (self._position_statistics(device) if self._standardizes_positions()
                      else None)
        # a reference scores in-sample where it is part of what images are compared with (not
        # where references only calibrate); None: a model saved before the digests
        references = (getattr(self, "reference_digests_", None)
                      if self._compares_with_references or self._standardizes_positions()
                      else None)
        if references is not None:
            images.watch_for(references.tolist())
        scores, out_maps = [], []
        with torch.inference_mode():
            for idx, batch in iter_batches(images, self.batch_size, self.image_size,
                                           verbose=self.verbose, desc="scoring"):
                s, m = split_batch(
                    lambda part: self._score_standardized(part, return_maps, statistics),
                    batch.to(device))
                scores.append(s.float().cpu())
                if return_maps:
                    out_maps.extend(resize_maps(m, [images.size(int(i)) for i in idx]))
        if references is not None:
            self._warn_scored_references(images)
        return torch.cat(scores).numpy().astype(np.float64), out_maps

    def _warn_scored_references(self, images):
        """Warn when scored images are references: each is part of what it is compared with
        (a memory bank, position statistics), so its score is lower than a new good
        part's; judged on them, a detector looks better than it is."""
        found = images.found()
        if found:
            named = ", ".join(images.describe(i) for i in found[:_NAMED_IMAGES])
            warnings.warn(ReferenceScoredWarning(
                f"{type(self).__name__}: {len(found)} of the {len(images)} images scored "
                f"{'has' if len(found) == 1 else 'have'} the same decoded pixels as "
                f"references of this detector: {named}. {_IN_SAMPLE}", found),
                stacklevel=4)

    def _score_standardized(self, batch, return_maps, statistics):
        """``_score_batch``, its maps standardised by position where ``statistics`` is given.

        Parameters
        ----------
        batch : torch.Tensor of shape (B, 3, H, W)
            Images in [0, 1] at ``image_size``, on the compute device.
        return_maps : bool
            Whether the maps are wanted (the standardised score needs them anyway).
        statistics : (torch.Tensor, torch.Tensor) or None
            ``position_mean_`` and ``position_std_`` as tensors ``(H, W)`` on the
            batch's device (:meth:`_position_statistics`), or None: the maps and
            scores as ``_score_batch`` gives them.

        Returns
        -------
        scores : torch.Tensor of shape (B,)
        maps : torch.Tensor of shape (B, H, W) or None
            With ``statistics``, in standard deviations above the references' mean
            at each position, and each score is its map's maximum.

        Shared by scoring and by the ONNX graph (:mod:`skad._onnx`), which must
        compute exactly what scoring does.
        """
        s, m = self._score_batch(batch, return_maps or statistics is not None)
        if statistics is not None:
            mean, std = statistics
            m = (m.float() - mean) / std
            s = m.flatten(1).amax(dim=1)
        return s, m

    def _check_ready(self):
        check_is_fitted(self)
        check_reference(self)

    def _position_statistics(self, device):
        if not hasattr(self, "position_mean_"):
            raise RuntimeError(
                f"{type(self).__name__} has standardize_positions=True but its reference was "
                "set without it: call set_reference(normals) again"
            )
        return (torch.from_numpy(self.position_mean_).to(device),
                torch.from_numpy(self.position_std_).to(device))

    # ----------------------------------------------------------- compute
    def _device(self):
        return resolve_device(self.device)

    def _to_device(self, device):
        """Move the fitted modules to ``device`` (override when there are others)."""
        for value in self.__dict__.values():
            if isinstance(value, torch.nn.Module):
                value.to(device)

    def _autocast(self, device):
        """Mixed precision (float16) on CUDA, nothing on the CPU."""
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _map_images(self, images, fn, *, desc="features", split=False):
        """Run ``fn`` on every batch under inference mode; concatenate its outputs on the CPU.

        ``fn(batch)`` gets ``(B, 3, H, W)`` on the compute device and returns a
        tensor with the batch first (``B * r`` rows for a fixed ``r`` rows per
        image); the result is their concatenation, one tensor. ``split``: run
        ``fn`` on parts of each batch on parallel threads
        (:func:`skad._threads.split_batch`), for an ``fn`` that computes each
        image's rows from that image alone and draws no random numbers. For several
        outputs per batch use :meth:`_map_images_multi`.
        """
        return self._map_images_multi(images, lambda batch: (fn(batch),), desc=desc,
                                      split=split)[0]

    def _map_images_multi(self, images, fn, *, desc="features", split=False):
        """:meth:`_map_images` for an ``fn`` that returns a tuple or list of tensors.

        Returns a list of tensors, one per output of ``fn``, each concatenated
        over the batches. The outputs are written into tensors allocated after
        the first batch, so that they are held once (a list of batches and
        their concatenation would hold them twice).
        """
        device = self._device()
        self._to_device(device)
        outs = None
        with torch.inference_mode():
            for idx, batch in iter_batches(images, self.batch_size, self.image_size,
                                           verbose=self.verbose, desc=desc):
                out = split_batch(fn, batch.to(device)) if split else fn(batch.to(device))
                if outs is None:
                    outs = [o.new_empty((len(images) * (len(o) // len(idx)), *o.shape[1:]),
                                        device="cpu") for o in out]
                for buf, o in zip(outs, out):
                    r = len(o) // len(idx)
                    buf[idx[0] * r:(idx[-1] + 1) * r] = o
        return outs

    def __getstate__(self):
        # fitted modules and tensors travel on the CPU, so a model fitted on a
        # GPU machine loads on a CPU-only one
        return {k: _to_cpu(v) for k, v in self.__dict__.items()}

    def __setstate__(self, state):
        # pickles of earlier versions hold renamed parameters under their old names; one
        # pickled before false_reject_rate existed (skad 0.1) keeps its threshold_quantile,
        # and its rule, with the FutureWarning at the next calibration
        state = upgrade_state(state, self._deprecated_parameters)
        state.setdefault("false_reject_rate", _DEFAULT_FALSE_REJECT_RATE)
        # before max_calibration_references every reference calibrated; a pickle of then
        # keeps doing so at its next set_reference
        state.setdefault("max_calibration_references", None)
        if "reference_scores_" in state:
            state.setdefault("calibration_indices_", np.arange(len(state["reference_scores_"])))
        super().__setstate__(state)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags
