"""What skad score writes for each image: its row, its overlay, its raw map; the folder.

:class:`Renderer` makes a scored image's row (every column of :data:`COLUMNS` but
``path``) and writes its files under names that depend on its position in the listing
only (:func:`map_name`), each by an atomic rename, so that it runs wherever the image is
scored (a Dask worker included) and a chunk scored twice writes the same files.
:func:`score_chunk` reads, scores and renders one chunk. :func:`prepare_output` keeps one
run's files from mixing with another's.
"""

import csv
import hashlib
import os
import re
import threading
import warnings
import weakref
from pathlib import Path

import numpy as np

from ._files import is_debris

__all__ = ["COLUMNS", "FORMATS", "MAP_FORMATS", "OVERLAYS", "Renderer", "map_name",
           "prepare_output", "score_chunk"]

# the columns of scores.csv, in order, and what each holds (docs/usage.md says the same)
COLUMNS = {
    "path": "the image file",
    "score": "anomaly score, higher = more anomalous",
    "p_value": "conformal p-value against the reference images: small = anomalous",
    "predicted_label": "1 when score > threshold (predicted anomalous), else 0",
    "threshold": "the model's threshold_ that predicted_label compares with",
    "n_regions": "defect regions: connected pixels of the map above pixel_threshold_",
    "largest_region_area": "pixels of the largest defect region (0 when none)",
    "map": ("the overlay PNG's file name, in the results folder (empty when --overlays "
            "skips the image): the map on the model's fixed colour scale (pixel threshold "
            "mid-scale), the regions outlined in white, score, p-value and verdict on it"),
    "raw_map": "with --save-maps: the float32 map's file name (.npy or .tiff), else empty",
    "error": "why the image could not be scored (the other columns are then empty)",
}
#: what ``save_maps`` writes: the suffix of each format
MAP_FORMATS = {"npy": ".npy", "tiff": ".tiff"}
#: which images get an overlay PNG
OVERLAYS = ("all", "rejects", "none")
#: the output formats: scores.csv always, scores.parquet as well with "parquet"
FORMATS = ("csv", "parquet")

CSV_NAME = "scores.csv"
PARQUET_NAME = "scores.parquet"
MANIFEST_NAME = "skad-run.json"
# held by a run (flock): hidden, so that no listing takes it for data
LOCK_NAME = ".skad-score.lock"
MANIFEST_FORMAT = "skad.score-run"

# headers of the scores.csv that skad score writes, and wrote before (without the raw maps;
# without the p-value and region columns; without the threshold column)
_RESULTS_HEADERS = (tuple(COLUMNS),
                    tuple(c for c in COLUMNS if c != "raw_map"),
                    ("path", "score", "predicted_label", "threshold", "map", "error"),
                    ("path", "score", "label", "map", "error"))
# overlay names keep this much of the image's name (UTF-8 bytes), far below the
# 255-byte limit of file names
_MAX_STEM_BYTES = 120


def map_name(index, path):
    """``{index:06d}_{stem}.png``: unique in its run and valid on any file system.

    Characters Windows forbids become "_"; a stem longer than ``_MAX_STEM_BYTES``
    is cut and followed by a short hash of the whole name.

    Examples
    --------
    >>> map_name(7, "/data/line 3/part:12.png")
    '000007_part_12.png'
    """
    # undecodable bytes (surrogate escapes) become U+FFFD: valid Unicode everywhere
    stem = os.fsencode(Path(path).stem).decode("utf-8", "replace")
    stem = re.sub(r'[\x00-\x1f<>:"/\\|?*]', "_", stem).rstrip(". ")
    raw = stem.encode()
    if len(raw) > _MAX_STEM_BYTES:
        digest = hashlib.sha256(raw).hexdigest()[:8]
        stem = raw[:_MAX_STEM_BYTES].decode("utf-8", "ignore") + "-" + digest
    return f"{index:06d}_{stem}.png"


def _previous_outputs(csv_path):
    """The overlays and raw maps a run recorded in its ``scores.csv`` (plain names only),
    one at a time."""
    with open(csv_path, newline="", encoding="utf-8", errors="replace") as fh:
        for row in csv.DictReader(fh):
            for column in ("map", "raw_map"):
                name = row.get(column)
                if name and name == Path(name).name and name not in (".", ".."):
                    yield name


def recorded_overlays(folder):
    """The overlay names that a ``skad score`` run recorded in ``folder/scores.csv``, if any."""
    table = Path(folder) / CSV_NAME
    try:
        with open(table, newline="", encoding="utf-8", errors="replace") as fh:
            if tuple(next(csv.reader(fh), ())) not in _RESULTS_HEADERS:
                return frozenset()  # no table, or a table of the user's own
        return frozenset(_previous_outputs(table))
    except OSError:
        return frozenset()


def output_folder(out):
    """``out`` as a folder, made if new; a file there is a one-line error, not an OSError."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out must be a folder; {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    return out


def prepare_output(out, *, overwrite=False):
    """Make ``out`` ready for one run's results, never mixed with another run's.

    ``out`` must be new or empty (hidden entries and system debris aside).
    With ``overwrite``, the files a previous run recorded in its
    ``scores.csv`` are removed first, with the table, its Parquet copy and
    the run manifest; other files are left alone.

    Parameters
    ----------
    out : str or path-like
    overwrite : bool, default=False

    Returns
    -------
    Path
        The folder, created if new.

    Raises
    ------
    ValueError
        If ``out`` is a file, or holds files and ``overwrite`` is false.
    """
    out = output_folder(out)
    if not any(not is_debris(p.name) for p in out.iterdir()):
        return out
    previous = out / CSV_NAME
    if not overwrite:
        held = " holds a previous run's results" if previous.is_file() else " is not empty"
        resume = (", --resume (resume=True) to continue it," if
                  (out / MANIFEST_NAME).is_file() else "")
        raise ValueError(f"{out}{held}: choose a new or empty folder{resume} or pass "
                         "--overwrite (overwrite=True) to replace the files a previous run "
                         "wrote there")
    if previous.is_file():
        for name in _previous_outputs(previous):
            (out / name).unlink(missing_ok=True)
        previous.unlink()
    for name in (PARQUET_NAME, MANIFEST_NAME):
        (out / name).unlink(missing_ok=True)
    return out


def replace_atomically(path, write):
    """``write(tmp)`` then rename to ``path``: a reader never sees a half-written file.

    The temporary name is hidden (a leading dot: never listed as data) and
    unique to this process and thread; it is created with ``open``, so that the
    file gets the user's umask.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Renderer:
    """A scored image's row (every column but ``path``), its overlay and raw map.

    Runs wherever the image is scored, a cluster's worker included: it needs
    only the detector and the results folder.
    """

    def __init__(self, det, out, *, overlays="all", min_area=1, save_maps=None):
        self.out = Path(out)
        self.threshold = det.threshold_
        self.reference_scores = det.reference_scores_
        # models saved before pixel thresholds existed leave the region columns empty
        # and colour their maps around the image threshold
        self.pixel_threshold = getattr(det, "pixel_threshold_", None)
        self.overlays = overlays
        self.min_area = min_area
        self.save_maps = save_maps

    def row(self, index, path, score, amap, image):
        """The columns after ``path`` of image ``index`` of the listing; writes its files."""
        from .thresholds import conformal_pvalues, find_regions

        name = map_name(index, path)
        label = int(score > self.threshold)
        (p_value,) = conformal_pvalues(self.reference_scores, [score])
        n_regions = largest = ""
        mask = None
        if self.pixel_threshold is not None:  # one labelling for the columns and the outlines
            regions, mask = find_regions(amap, self.pixel_threshold, min_area=self.min_area,
                                         return_mask=True)
            n_regions, largest = len(regions), max((r.area for r in regions), default=0)
        drawn = self.overlays == "all" or (self.overlays == "rejects" and label)
        if drawn:
            self._overlay(name, image, amap, mask, score, p_value, label, n_regions)
        raw = self._save_map(name, amap) if self.save_maps else ""
        return (f"{score:.6g}", f"{p_value:.6g}", str(label), f"{self.threshold:.6g}",
                str(n_regions), str(largest), name if drawn else "", raw, "")

    def _overlay(self, name, image, amap, mask, score, p_value, label, n_regions):
        from .viz import overlay

        # the image threshold decides; the two thresholds are calibrated apart, so a reject
        # whose map has no pixel above the pixel threshold says so rather than show
        # nothing, and a pass with regions outlined says they did not decide it
        if label:
            verdict = "REJECT, no region" if n_regions == 0 else "REJECT"
        else:
            verdict = (f"pass, {n_regions} region{'s' if n_regions > 1 else ''} below the "
                       "image threshold" if n_regions else "pass")
        text = f"{score:.4g}  p={p_value:.3g}  {verdict}"
        mid = self.pixel_threshold if self.pixel_threshold is not None else self.threshold
        picture = overlay(image, amap, mid, mask=mask, text=text)
        replace_atomically(self.out / name, lambda tmp: picture.save(tmp, format="PNG"))

    def _save_map(self, overlay_name, amap):
        """The raw map as float32 beside its overlay; returns its file name."""
        name = Path(overlay_name).stem + MAP_FORMATS[self.save_maps]
        amap = np.asarray(amap, dtype=np.float32)
        if self.save_maps == "npy":
            def write(tmp):
                with open(tmp, "wb") as fh:
                    np.save(fh, amap)
        else:
            from PIL import Image

            def write(tmp):  # float32 -> mode F: a 32-bit float TIFF
                Image.fromarray(amap).save(tmp, format="TIFF")
        replace_atomically(self.out / name, write)
        return name

    @staticmethod
    def error_row(message):
        """The columns after ``path`` of an image that could not be scored."""
        return ("",) * (len(COLUMNS) - 2) + (message,)


# where the warnings re-issued by _warn_again have been shown (Python's per-module registry)
_WARNED = {}
# the detectors whose scoring run has said that it meets their references: once a run
_SAID_REFERENCES = weakref.WeakSet()


def _warn_again(caught, det, paths):
    """Re-issue the warnings of scoring a chunk; one of references scored, which names the
    decoded arrays (``X[i]``), by the files they came from, and once a run (``det``)."""
    from .base import _IN_SAMPLE, _NAMED_IMAGES, ReferenceScoredWarning

    for w in caught:
        if isinstance(w.message, ReferenceScoredWarning):
            if det in _SAID_REFERENCES:
                continue
            _SAID_REFERENCES.add(det)
            named = ", ".join(paths[i] for i in w.message.indices[:_NAMED_IMAGES])
            warnings.warn(ReferenceScoredWarning(
                f"scoring images with the same decoded pixels as references of the model, "
                f"such as {named}. {_IN_SAMPLE}: leave them out of --images (or list the "
                "others with --file-list)"), stacklevel=2)
        else:  # once per place, as if not caught
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno,
                                   registry=_WARNED)


def score_chunk(det, renderer, start, paths):
    """Rows (without ``path``) of the images ``paths``, at listing positions ``start``...

    Each file is decoded once: the images that decode are scored together, so
    that one bad file does not fail the others; the others get error rows. They
    are scored as decoded (the detector reads them to float RGB, as it reads
    files), so that it tells its references among them by their pixels.
    """
    from ._images import _to_float_rgb, read_decoded

    decoded, errors = {}, {}
    for k, path in enumerate(paths):
        try:  # named by its position in the whole listing
            decoded[k] = read_decoded(path, where=f"images[{start + k}] ({path!r})")
        except ValueError as exc:
            errors[k] = str(exc)
    scored = {}
    if decoded:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scores, maps = det.score_and_map(list(decoded.values()))
        _warn_again(caught, det, [paths[k] for k in decoded])
        scored = dict(zip(decoded, zip(scores, maps)))
    return [renderer.error_row(errors[k]) if k in errors else
            renderer.row(start + k, paths[k], *scored[k], _to_float_rgb(decoded[k]))
            for k in range(len(paths))]
