"""The paragraphs of the detectors' docstrings that every detector shares, written once.

A detector's class docstring names a shared paragraph on a line of its own,
``%(name)s``, at the indentation the paragraph takes there; :func:`fill_doc`,
a class decorator, puts the paragraph (:data:`PARAGRAPHS`) in its place at
import, so that ``help()``, the API pages and the docstring's examples read
the whole text. A paragraph may leave a few words to the detector as
``{field}``: the detector passes them to :func:`fill_doc`, or takes the
default of :data:`FIELDS`; a description that the words make too long is
wrapped again. One paragraph is written from the class itself: ``%(deprecated)s``,
the entry of the old names of its renamed parameters (``_deprecated_parameters``,
:mod:`skad._params`). As matplotlib's ``_docstring.interpd``, but only whole
placeholder lines are replaced, so that the rest of a docstring keeps its
``%`` signs and braces as they are.
"""

import re
import string
import textwrap

from ._params import REMOVED_IN, RENAMED_IN, renamed_target

__all__ = ["FIELDS", "PARAGRAPHS", "fill_doc", "renamed_entry"]

#: the shared paragraphs, as they read at the indentation of a Parameters entry
PARAGRAPHS = {
    # the continuation of every detector's image_size entry
    "image_size_pair": """\
An int resizes to a square; a ``(height, width)`` pair keeps the aspect ratio
of images far from square (250 x 630 images: ``(256, 640)``, not 256,
which squashes them). Maps come back at each input's own size.""",
    "standardize_positions": """\
standardize_positions : bool, default=True
    Score each map position against the same position in the references' maps: ``(map -
    position_mean_) / position_std_``, both set by :meth:`set_reference`, and take the
    image score as the standardised map's maximum. Not in {not_in}: without
    it the border cells, where {border_cells}, set most normal images'
    scores (docs/benchmarks.md, "Border cells"). False: the paper's maps and image score
    ({equation}).""",
    "false_reject_rate": """\
false_reject_rate : float in (0, 1), default=0.05
    The accepted rate of good parts rejected: ``threshold_`` and ``pixel_threshold_``
    are the conformal thresholds that reject a good part with at most this
    probability (:meth:`~skad.base.BaseDetector.set_reference`).
max_calibration_references : int or None, default=200
    At most this many references are scored to calibrate ``threshold_`` and
    ``pixel_threshold_``: with more, that many drawn at random (``random_state``;
    ``calibration_indices_``); the guarantee of ``false_reject_rate`` holds with
    that many, which must be at least ``1 / false_reject_rate - 1`` (19 for 0.05, 99
    for 0.01). All of them still serve as the reference. None: all of them.{calibration_cost}
threshold_quantile : float, default="deprecated"
    Deprecated since 0.2: ``threshold_`` as this quantile of the references'
    scores, without a guarantee. Use ``false_reject_rate``.""",
    "device": """\
device : str, default="auto"
    "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...""",
    "verbose": """\
verbose : int, default=0
    When > 0, progress bars on stderr (count, rate, time left) for feature
    extraction, {progress} and scoring.
    Messages go to the ``skad`` logger whatever its value; show them with
    :mod:`logging`.""",
    # attributes
    "n_samples_fit": """\
n_samples_fit_ : int
    Number of training images ``fit`` learned from ({trained_on}).""",
    "position_statistics": """\
position_mean_, position_std_ : ndarray of shape image_size
    Mean and standard deviation of the references' maps at each position, at
    ``image_size`` (``standardize_positions=True`` only).""",
    "thresholds": """\
reference_scores_ : ndarray of shape (n_calibration,)
    {reference_scores}
threshold_ : float
    ``predict`` flags images scoring above it.
false_reject_rate_ : float
    The rate ``threshold_`` guarantees (``false_reject_rate``, or
    ``1 / (n_calibration + 1)`` when the calibrating references are too few;
    1.0 for PatchCore's and MetaComparer's single reference, scored against
    its own patches, and for references GeneralAD's, MMR's or GlobalLocal's
    networks were trained on (after ``fit``, until ``set_reference``): no
    rate is guaranteed).
n_references_trained_on_ : int
    How many references are images the networks were trained on: all of
    them after a one-class ``fit`` of GeneralAD, MMR or GlobalLocal; after
    ``set_reference``, those with the same decoded pixels as a training
    image (``training_digests_``: a 63-bit digest of each training image).
    Above 0, no rate is guaranteed (``false_reject_rate_`` 1.0).
reference_digests_ : ndarray of shape (n_distinct_references,)
    A 63-bit digest of each reference's decoded pixels (sorted): scoring warns
    when it meets a reference that images are compared with (its score is
    in-sample, lower than a new good part's; ``ReferenceScoredWarning``).
reference_map_maxima_ : ndarray of shape (n_calibration,)
    Maxima of the references' maps, as ``reference_scores_``.
calibration_indices_ : ndarray of shape (n_calibration,)
    Indices (sorted) of the references whose scores are ``reference_scores_``:
    all of them, or ``max_calibration_references`` drawn at random.
calibrated_params_ : dict
    The parameters scoring reads (``image_size`` as a pair, and the
    detector's own, such as ``sigma``; ``standardize_positions`` where it has
    it), as they were when the reference was set: changed since with
    ``set_params``, decisions and position-standardised scoring raise
    ``ValueError`` until ``set_reference`` (plain scores warn).
pixel_threshold_ : float
    ``predict_mask`` flags the pixels above it.""",
}

#: the default words of the paragraphs' ``{field}`` gaps
FIELDS = {
    "progress": "the training epochs (with their loss)",
    "not_in": "the paper or the released code",
    "reference_scores": "Scores of the reference images.",
    "trained_on": "the normal ones among ``X``",
    "calibration_cost": "",
}

# every ``{field}`` of the paragraphs
_FIELD_NAMES = {name for text in PARAGRAPHS.values()
                for _, name, _, _ in string.Formatter().parse(text) if name}
# a line longer than this, once the fields are in, has its block wrapped again
_WIDTH = 88
_PLACEHOLDER = re.compile(r"^( *)%\((\w+)\)s$", re.MULTILINE)


def _rewrapped(text):
    """``text`` with each indented run of lines (a description) that holds a line over
    :data:`_WIDTH` wrapped again; the other runs, and the entries' names, as they are."""
    lines, out = text.split("\n"), []
    while lines:
        indent = len(lines[0]) - len(lines[0].lstrip())
        run = [lines.pop(0)]
        while lines and lines[0].strip() and len(lines[0]) - len(lines[0].lstrip()) == indent:
            run.append(lines.pop(0))
        if indent and max(map(len, run)) > _WIDTH:
            run = textwrap.wrap(" ".join(line.strip() for line in run), _WIDTH,
                                initial_indent=" " * indent, subsequent_indent=" " * indent,
                                break_long_words=False, break_on_hyphens=False)
        out += run
    return "\n".join(out)


def _paragraph(match, paragraphs, fields):
    indent, name = match.groups()
    text = _rewrapped(paragraphs[name].format_map(fields))
    return "\n".join(indent + line if line else line for line in text.split("\n"))


def _and(words):
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def renamed_entry(renames):
    """The Parameters entry of the old names of a detector's renamed parameters.

    Parameters
    ----------
    renames : dict
        A detector's ``_deprecated_parameters`` (not empty): old name -> new
        name, or ``(new name, convert)`` where ``convert``'s docstring says how
        an old value reads.

    Returns
    -------
    str
        ``"old_a, old_b : deprecated"`` and its description.
    """
    news = []
    for spec in renames.values():
        new, convert = renamed_target(spec)
        how = f" ({convert.__doc__.strip().rstrip('.')})" if convert is not None else ""
        news.append(f"``{new}``{how}")
    names = "names" if len(news) > 1 else "name"
    return (f"{', '.join(renames)} : deprecated\n"
            f"    Deprecated in {RENAMED_IN}, removed in {REMOVED_IN}: the old {names} of "
            f"{_and(news)}{', in this order' if len(news) > 1 else ''}; set the new "
            f"{names} (an old one still works, with a FutureWarning).")


def fill_doc(**fields):
    """A class decorator that puts the shared paragraphs into the class's docstring.

    Parameters
    ----------
    **fields : str
        Words of the paragraphs' ``{field}`` gaps, where the defaults of
        :data:`FIELDS` do not fit the detector.

    Raises
    ------
    TypeError
        For a field that no paragraph has.
    KeyError
        At import, for a placeholder that names no paragraph, or a gap
        without words.
    """
    unknown = set(fields) - _FIELD_NAMES
    if unknown:
        raise TypeError(f"no shared paragraph has the fields {sorted(unknown)}")
    fields = {**FIELDS, **fields}

    def decorate(cls):
        if cls.__doc__:  # None under python -OO
            renames = getattr(cls, "_deprecated_parameters", None)
            paragraphs = {**PARAGRAPHS, **({"deprecated": renamed_entry(renames)}
                                           if renames else {})}
            cls.__doc__ = _PLACEHOLDER.sub(lambda m: _paragraph(m, paragraphs, fields),
                                           cls.__doc__)
        return cls

    return decorate
