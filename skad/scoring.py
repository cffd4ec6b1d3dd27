"""Scoring many images: streamed, resumable, in one process or on a Dask cluster.

:func:`score_files` is what ``skad score`` runs. It reads its listing lazily
(:class:`ImageFolder`, :class:`FileList`, :class:`Glob` or any iterable of
paths), scores a chunk of images at a time, and appends each chunk's rows to
``scores.csv`` (and ``scores.parquet``) as soon as the chunk is done, with one
overlay PNG per image, so that memory holds a chunk whatever the number of
images, and an interrupted run keeps what it scored: ``resume=True`` continues
it without scoring those images again. With ``scheduler``, the chunks are
scored by the workers of a Dask cluster; the rows, their order and the files
are those a single process writes.

How it is built, and why:

- One writer. Rows are written by the calling process only, in listing order.
  On a cluster, chunks finish out of order; a finished chunk waits (its rows,
  a few hundred bytes each, held in memory) until every chunk before it is
  written, and at most ``window`` chunks are submitted beyond the first one not
  yet written, so memory stays bounded. A task that runs twice (its worker died
  and the scheduler ran it again elsewhere) is written once. Part files merged
  at the end were the alternative: they need a merge pass over every row, and
  ``scores.csv`` would not be the in-order, growing table that ``--resume``,
  ``tail -f`` and a reader of a half-done run rely on.
- Overlays and raw maps are written by whoever scored the image (a worker, on
  a cluster), under names that depend on the image's position in the listing
  only (``{index:06d}_{stem}.png``), each by an atomic rename. A worker thus
  needs the results folder at the same path as the caller (a shared file
  system, as it needs the images), and a task that runs again rewrites the same
  files with the same content. Sending the maps back to the caller instead
  would move every map and image over the network and draw every picture in
  one process.
- ``scores.csv`` is the run's journal: its complete rows say what is done.
  Beside it, ``skad-run.json`` records what the run is (the model's
  fingerprint, the inputs, the settings that change rows), so that a resume
  with another model, other inputs or other settings is refused.

Examples
--------
>>> import os, tempfile
>>> import numpy as np
>>> from PIL import Image
>>> from skad import PatchCore
>>> from skad.scoring import ImageFolder, score_files
>>> folder = tempfile.mkdtemp()
>>> rng = np.random.default_rng(0)
>>> for i in range(6):
...     Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
...         os.path.join(folder, f"{i:03d}.png"))
>>> det = PatchCore(backbone="test_resnet", weights=None, image_size=32,
...                 random_state=0).fit(list(ImageFolder(folder)))
>>> out = os.path.join(tempfile.mkdtemp(), "results")
>>> summary = score_files(det, folder, out, chunk_size=4)
>>> summary.n_images, summary.n_failed, summary.complete
(6, 0, True)
>>> sorted(os.listdir(out))[:3]
['000000_000.png', '000001_001.png', '000002_002.png']
"""

import csv
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
import warnings
from itertools import chain, islice
from pathlib import Path

import numpy as np

from ._files import IMAGE_EXTENSIONS, is_debris, iter_images

__all__ = ["COLUMNS", "MAP_FORMATS", "OVERLAYS", "FileList", "Glob", "ImageFolder", "Results",
           "ScoringSummary", "prepare_output", "score_files"]

logger = logging.getLogger(__name__)

# the columns of scores.csv, in order, and what each holds (docs/usage.md says the same)
COLUMNS = {
    "path": "the image file",
    "score": "anomaly score, higher = more anomalous",
    "p_value": "conformal p-value against the reference images: small = anomalous",
    "predicted_label": "1 when score > threshold (predicted anomalous), else 0",
    "threshold": "the model's threshold_ that predicted_label compares with",
    "n_regions": "defect regions: connected pixels of the map above pixel_threshold_",
    "largest_region_area": "pixels of the largest defect region (0 when none)",
    "map": ("the overlay PNG's file name, in the results folder: the map on the model's "
            "fixed colour scale (pixel threshold mid-scale), the regions outlined in white, "
            "score, p-value and verdict written on it (empty when no overlay was asked for)"),
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
_MANIFEST_FORMAT = "skad.score-run"

# headers of the scores.csv that skad score writes, and wrote before (without the raw maps;
# without the p-value and region columns; without the threshold column)
_RESULTS_HEADERS = (tuple(COLUMNS),
                    tuple(c for c in COLUMNS if c != "raw_map"),
                    ("path", "score", "predicted_label", "threshold", "map", "error"),
                    ("path", "score", "label", "map", "error"))
# overlay names keep this much of the image's name (UTF-8 bytes), far below the
# 255-byte limit of file names
_MAX_STEM_BYTES = 120
# rows of a Parquet row group: a few MB of strings held before they are written
_ROW_GROUP = 10_000
# parameters that change how a detector computes, not what: left out of its fingerprint
_NOT_FINGERPRINTED = ("device", "verbose", "batch_size")


# ------------------------------------------------------------------- listings
class ImageFolder:
    """The image files below a folder, subfolders too, in a sorted walk.

    The order is that of :func:`skad._files.list_images` (depth first, each
    folder's entries by name), found as the walk goes: memory holds the
    entries of the folders on the current path, not the tree. Hidden files,
    system debris and the overlays that earlier ``skad score`` runs wrote (those
    their ``scores.csv`` lists) are left out.

    Parameters
    ----------
    folder : str or path-like
    exclude : sequence of path-like, default=()
        Files or folders never listed (:func:`score_files` adds its results
        folder and model file).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> for name in ("b.png", "a/c.png", "notes.txt"):
    ...     (folder / name).parent.mkdir(exist_ok=True)
    ...     (folder / name).touch()
    >>> [Path(p).relative_to(folder).as_posix() for p in ImageFolder(folder)]
    ['a/c.png', 'b.png']
    """

    def __init__(self, folder, *, exclude=()):
        self.folder = Path(folder)
        self.exclude = tuple(exclude)
        self._n_left_out = 0

    def __iter__(self):
        if not self.folder.is_dir():
            raise ValueError(f"{self.folder} is not a folder")
        self._n_left_out = 0
        # a folder's recorded overlays are read once; the walk is depth first, so the
        # folders still being listed are few
        recorded = functools.lru_cache(maxsize=256)(_recorded_overlays)
        for path in iter_images(self.folder, recursive=True, exclude=self.exclude):
            if path.name in recorded(path.parent):
                self._n_left_out += 1
            else:
                yield os.fspath(path)
        if self._n_left_out:
            logger.info("left out %s in %s", self._left_out(), self.folder)

    def _left_out(self):
        return (f"{self._n_left_out} overlays that earlier skad score runs wrote (listed in "
                "their scores.csv)")

    def nothing_found(self):
        """The message for a listing that found no image (after a full iteration)."""
        but = f" but {self._left_out()}" if self._n_left_out else ""
        return f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {self.folder}{but}"

    def describe(self):
        """What the listing is, for the run manifest (JSON)."""
        return {"folder": os.path.abspath(self.folder)}

    def excluding(self, *paths):
        """The same listing, never listing ``paths`` either."""
        return ImageFolder(self.folder, exclude=(*self.exclude, *paths))

    def __repr__(self):
        return f"ImageFolder({os.fspath(self.folder)!r})"


class FileList:
    """The paths written in a text file, one a line, in the file's order.

    The file is read as UTF-8 (bytes that are not become the file-system's
    surrogate escapes), a line at a time. Empty lines are skipped; nothing else
    is interpreted (no comments, no quoting). A relative path is relative to the
    list file's folder, so that a run resumed from another working directory
    reads the same files. Every line is scored: a path that does not exist or is
    not an image becomes a row with its error.

    Parameters
    ----------
    path : str or path-like
        The list file.
    """

    def __init__(self, path):
        self.path = Path(path)

    def __iter__(self):
        if not self.path.is_file():
            raise ValueError(f"file list {self.path} "
                             f"{'is not a file' if self.path.exists() else 'does not exist'}")
        base = self.path.parent
        with open(self.path, encoding="utf-8", errors="surrogateescape") as fh:
            for line in fh:
                name = line.rstrip("\n")
                if name.strip():
                    yield os.fspath(base / name)

    def nothing_found(self):
        return f"file list {self.path} names no file"

    def describe(self):
        return {"file_list": os.path.abspath(self.path)}

    def excluding(self, *paths):
        return self  # every listed path is scored: the user chose them one by one

    def __repr__(self):
        return f"FileList({os.fspath(self.path)!r})"


class Glob:
    """The image files that a glob pattern matches, in a sorted walk.

    ``*``, ``?`` and ``[...]`` match within a name, ``**`` any number of
    folders (zero included), as Python's ``glob(recursive=True)``, but found in
    the order and by the rules of :class:`ImageFolder`: sorted, lazily,
    hidden entries and debris never matched, symbolic links to folders not
    entered, and only files with an image extension (``IMAGE_EXTENSIONS``).

    Parameters
    ----------
    pattern : str
        E.g. ``"line3/2026-*/**/*.png"``; the walk starts at the folders
        before the first wildcard (``line3``).
    exclude : sequence of path-like, default=()

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> for name in ("a/1.png", "a/b/2.png", "c/3.png", "a/4.jpg"):
    ...     (folder / name).parent.mkdir(parents=True, exist_ok=True)
    ...     (folder / name).touch()
    >>> [Path(p).relative_to(folder).as_posix() for p in Glob(f"{folder}/a/**/*.png")]
    ['a/1.png', 'a/b/2.png']
    """

    def __init__(self, pattern, *, exclude=()):
        self.pattern = os.fspath(pattern)
        self.exclude = tuple(exclude)

    def __iter__(self):
        root, parts = _split_pattern(self.pattern)
        if not root.is_dir():
            return
        regex = re.compile(_pattern_regex(parts))
        for path in iter_images(root, recursive=True, exclude=self.exclude,
                                enter=functools.partial(_may_match, root, parts)):
            if regex.fullmatch(path.relative_to(root).as_posix()):
                yield os.fspath(path)

    def nothing_found(self):
        return f"no image files ({', '.join(IMAGE_EXTENSIONS)}) match {self.pattern}"

    def describe(self):
        root, parts = _split_pattern(self.pattern)
        return {"glob": os.path.join(os.path.abspath(root), *parts)}

    def excluding(self, *paths):
        return Glob(self.pattern, exclude=(*self.exclude, *paths))

    def __repr__(self):
        return f"Glob({self.pattern!r})"


class _Paths:
    """An iterable of paths given from Python, consumed once, in its order."""

    def __init__(self, paths):
        self.paths = paths

    def __iter__(self):
        return (os.fspath(p) for p in self.paths)

    def nothing_found(self):
        return "the list of images is empty"

    def describe(self):
        return {"paths": "an iterable given from Python"}

    def excluding(self, *paths):
        return self


def _has_magic(part):
    return any(c in part for c in "*?[")


def _split_pattern(pattern):
    """``(root, parts)``: the folder before the first wildcard, and the parts after it."""
    parts = Path(pattern).parts
    fixed = 0
    while fixed < len(parts) - 1 and not _has_magic(parts[fixed]):
        fixed += 1
    root = Path(*parts[:fixed]) if fixed else Path(".")
    return root, list(parts[fixed:])


def _name_regex(part):
    """A glob name pattern as a regular expression matching one path component."""
    out, i = [], 0
    while i < len(part):
        c = part[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (end := part.find("]", i + 2)) > 0:
            body = part[i + 1:end].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _pattern_regex(parts):
    """The regular expression of a file's path relative to the root, ``/``-separated."""
    if parts[-1] == "**":  # "a/**": every file below a
        parts = [*parts, "*"]
    pieces = []
    for k, part in enumerate(parts):
        if part == "**":
            pieces.append("(?:[^/]+/)*")
        else:
            pieces.append(_name_regex(part) + ("/" if k < len(parts) - 1 else ""))
    return "".join(pieces)


def _may_match(root, parts, folder):
    """Whether files below ``folder`` may match: prunes the walk of a glob."""
    rel = folder.relative_to(root).parts
    recursive = "**" in parts
    fixed = parts.index("**") if recursive else len(parts) - 1
    if not recursive and len(rel) > fixed:
        return False
    return all(re.fullmatch(_name_regex(p), n) for n, p in zip(rel[:fixed], parts))


def as_listing(inputs):
    """``inputs`` of :func:`score_files` as a listing object.

    A folder becomes an :class:`ImageFolder`; listing objects pass through; any
    other iterable (a list, a generator) is taken as the paths themselves.
    """
    if isinstance(inputs, (ImageFolder, FileList, Glob, _Paths)):
        return inputs
    if isinstance(inputs, (str, os.PathLike)):
        path = Path(inputs)
        if path.is_dir():
            return ImageFolder(path)
        if path.is_file():
            raise ValueError(f"{path} is a file: for a list of paths, one a line, pass "
                             f"skad.scoring.FileList({os.fspath(path)!r})")
        raise ValueError(f"{path} is not a folder")
    try:
        iter(inputs)
    except TypeError:
        raise TypeError("inputs must be a folder, a FileList, a Glob or an iterable of image "
                        f"paths; got {type(inputs).__name__}") from None
    return _Paths(inputs)


# -------------------------------------------------------------- output folder
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


def _recorded_overlays(folder):
    """The overlay names that a ``skad score`` run recorded in ``folder/scores.csv``, if any."""
    table = Path(folder) / CSV_NAME
    try:
        with open(table, newline="", encoding="utf-8", errors="replace") as fh:
            if tuple(next(csv.reader(fh), ())) not in _RESULTS_HEADERS:
                return frozenset()  # no table, or a table of the user's own
        return frozenset(_previous_outputs(table))
    except OSError:
        return frozenset()


def _output_folder(out):
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
    out = _output_folder(out)
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


def _replace_atomically(path, write):
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


# ----------------------------------------------------------- rows and pictures
class _Renderer:
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
        from .thresholds import conformal_pvalues, find_regions, threshold_map

        name = map_name(index, path)
        label = int(score > self.threshold)
        (p_value,) = conformal_pvalues(self.reference_scores, [score])
        n_regions = largest = ""
        mask = None
        if self.pixel_threshold is not None:
            areas = [r.area for r in find_regions(amap, self.pixel_threshold,
                                                  min_area=self.min_area)]
            n_regions, largest = len(areas), max(areas, default=0)
            mask = threshold_map(amap, self.pixel_threshold, min_area=self.min_area)
        drawn = self.overlays == "all" or (self.overlays == "rejects" and label)
        if drawn:
            self._overlay(name, image, amap, mask, score, p_value, label, n_regions)
        raw = self._save_map(name, amap) if self.save_maps else ""
        return (f"{score:.6g}", f"{p_value:.6g}", str(label), f"{self.threshold:.6g}",
                str(n_regions), str(largest), name if drawn else "", raw, "")

    def _overlay(self, name, image, amap, mask, score, p_value, label, n_regions):
        from .viz import overlay

        # the image threshold decides; a reject whose map has no pixel above the pixel
        # threshold (the two are calibrated apart) says so rather than show nothing
        verdict = ("REJECT, no region" if n_regions == 0 else "REJECT") if label else "pass"
        text = f"{score:.4g}  p={p_value:.3g}  {verdict}"
        mid = self.pixel_threshold if self.pixel_threshold is not None else self.threshold
        picture = overlay(image, amap, mid, mask=mask, text=text)
        _replace_atomically(self.out / name, lambda tmp: picture.save(tmp, format="PNG"))

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
        _replace_atomically(self.out / name, write)
        return name

    @staticmethod
    def error_row(message):
        """The columns after ``path`` of an image that could not be scored."""
        return ("",) * (len(COLUMNS) - 2) + (message,)


def _score_chunk(det, renderer, start, paths):
    """Rows (without ``path``) of the images ``paths``, at listing positions ``start``...

    Each file is decoded once: the images that decode are scored together, so
    that one bad file does not fail the others; the others get error rows.
    """
    from ._images import _check_array, _read_file, _to_float_rgb

    decoded, errors = {}, {}
    for k, path in enumerate(paths):
        try:  # as ImageSet.read, the image named by its position in the whole listing
            where = f"images[{start + k}] ({path!r})"
            decoded[k] = _to_float_rgb(_check_array(_read_file(path), where))
        except ValueError as exc:
            errors[k] = str(exc)
    scored = {}
    if decoded:
        scores, maps = det.score_and_map(list(decoded.values()))
        scored = dict(zip(decoded, zip(scores, maps)))
    return [renderer.error_row(errors[k]) if k in errors else
            renderer.row(start + k, paths[k], *scored[k], decoded[k]) for k in range(len(paths))]


# ----------------------------------------------------------------- the table
def _text(value):
    """``value`` as valid UTF-8 text, as scores.csv stores it (surrogates escaped)."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


class _Table:
    """``scores.csv``, and ``scores.parquet`` with ``parquet``, appended a chunk at a time.

    ``scores.csv`` is flushed after every chunk: it is the journal that
    :func:`score_files` resumes from. The Parquet file gets a row group every
    ``_ROW_GROUP`` rows and its footer when closed; a run killed before that
    leaves it unreadable, and a resume writes it again from ``scores.csv``.
    """

    def __init__(self, out, *, parquet=False, journal=None):
        self.csv_path = Path(out) / CSV_NAME
        self.parquet_path = Path(out) / PARQUET_NAME if parquet else None
        self.n_scored = self.n_rejected = self.n_failed = 0
        # a file name that is not valid Unicode is written with backslash escapes,
        # keeping the table valid UTF-8
        self._fh = open(  # noqa: SIM115 (open for the run, closed by close())
            self.csv_path, "a" if journal else "w", newline="", encoding="utf-8",
            errors="backslashreplace")
        # "\n" rows: csv's default "\r\n" shows as ^M in Unix tools
        self._csv = csv.writer(self._fh, lineterminator="\n")
        self._parquet = _ParquetTable(self.parquet_path) if parquet else None
        if journal is None:
            self._csv.writerow(COLUMNS)
            self._fh.flush()
        else:
            self.n_scored, self.n_rejected, self.n_failed = journal.counts
            if self._parquet is not None:  # its rows again, from the journal
                for row in journal.rows():
                    self._parquet.add(row)

    @property
    def n_rows(self):
        return self.n_scored + self.n_failed

    def write(self, paths, rows):
        """One chunk: ``paths`` and their rows (every column but ``path``)."""
        for path, row in zip(paths, rows):
            self._csv.writerow((path, *row))
            if row[-1]:
                self.n_failed += 1
            else:
                self.n_scored += 1
                self.n_rejected += row[2] == "1"
            if self._parquet is not None:
                self._parquet.add((_text(path), *row))
        self._fh.flush()

    def close(self):
        self._fh.close()
        if self._parquet is not None:
            self._parquet.close()


_PARQUET_TYPES = {"path": "string", "score": "float64", "p_value": "float64",
                  "predicted_label": "int8", "threshold": "float64", "n_regions": "int32",
                  "largest_region_area": "int64", "map": "string", "raw_map": "string",
                  "error": "string"}


def _require_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError('the parquet format needs pyarrow: pip install "skad[parquet]"') \
            from None


class _ParquetTable:
    """Rows of scores.csv (text) as typed columns, a row group at a time.

    The values are those of ``scores.csv`` (scores with 6 significant digits),
    so that the two files agree; an empty cell is null.
    """

    def __init__(self, path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pa = pa
        self.schema = pa.schema([(c, getattr(pa, t)()) for c, t in _PARQUET_TYPES.items()])
        self._writer = pq.ParquetWriter(path, self.schema)
        self._rows = []

    def add(self, row):
        self._rows.append(row)
        if len(self._rows) >= _ROW_GROUP:
            self.flush()

    def flush(self):
        if not self._rows:
            return
        columns = {}
        for k, (column, kind) in enumerate(_PARQUET_TYPES.items()):
            cast = float if kind.startswith("float") else int if kind.startswith("int") else str
            values = [r[k] for r in self._rows]
            columns[column] = values if column == "path" else [
                cast(v) if v != "" else None for v in values]
        self._writer.write_table(self._pa.table(columns, schema=self.schema))
        self._rows = []

    def close(self):
        self.flush()
        self._writer.close()


# -------------------------------------------------------------------- resume
class _Journal:
    """The complete rows of an interrupted run's ``scores.csv``.

    A run killed while writing may leave a last row cut short (no line end, or a
    quoted field left open): it is not counted, and :meth:`truncate` removes
    it, so that its image is scored again. A malformed row before the end is an
    error: the table is not one this code wrote, and nothing is guessed.
    """

    def __init__(self, csv_path):
        self.path = Path(csv_path)
        self.n_rows = 0
        self.end = 0  # bytes of the header and the complete rows
        n_scored = n_rejected = n_failed = 0
        with open(self.path, "rb") as fh:
            reader = csv.reader(self._lines(fh), strict=True)
            try:
                header = next(reader, None)
                if header is None or tuple(header) != tuple(COLUMNS):
                    raise ValueError(f"cannot resume: {self.path} is not a scores.csv that "
                                     "this version of skad writes (its header differs)")
                self.end = self._consumed
                for row in reader:
                    if len(row) != len(COLUMNS):
                        raise ValueError(f"cannot resume: row {self.n_rows + 1} of {self.path}"
                                         f" has {len(row)} fields, not {len(COLUMNS)}")
                    self.n_rows += 1
                    self.end = self._consumed
                    if row[-1]:
                        n_failed += 1
                    else:
                        n_scored += 1
                        n_rejected += row[3] == "1"
            except csv.Error:
                if fh.read(1):  # an open quote before the last line: not a cut-short end
                    raise ValueError(f"cannot resume: {self.path} is malformed after row "
                                     f"{self.n_rows}") from None
        self.counts = (n_scored, n_rejected, n_failed)
        self.size = self.path.stat().st_size

    def _lines(self, fh):
        """The file's complete lines as text; ``_consumed`` counts their bytes."""
        self._consumed = 0
        for raw in fh:
            if not raw.endswith(b"\n"):
                return  # a line cut short: only the last line can be
            self._consumed += len(raw)
            yield raw.decode("utf-8", "backslashreplace")

    def truncate(self):
        """Drop what follows the complete rows (a row cut short by the interruption)."""
        if self.size > self.end:
            logger.info("dropped the last row of %s, cut short when the run was interrupted "
                        "(%d bytes)", self.path, self.size - self.end)
            with open(self.path, "r+b") as fh:
                fh.truncate(self.end)
            self.size = self.end

    def rows(self):
        """The complete rows, read again one at a time (all columns)."""
        with open(self.path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            next(reader)
            yield from islice(reader, self.n_rows)


def fingerprint(det):
    """A SHA-256 digest of what a detector computes with.

    Over its class, its fitted attributes and tensors and its parameters, but
    ``device``, ``verbose`` and ``batch_size``, which change how it computes,
    not what. Two loads of one model file give the same digest; a model
    fitted or calibrated otherwise (another reference) gives another.

    Parameters
    ----------
    det : BaseDetector
        A fitted skad detector.

    Returns
    -------
    str
        64 hexadecimal digits.
    """
    import torch

    from ._serialization import _encode_state

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a random_state generator: stored as None, fine here
        state, tensors = _encode_state(det)
    for name in _NOT_FINGERPRINTED:
        state.pop(name, None)
    digest = hashlib.sha256(type(det).__name__.encode())
    digest.update(json.dumps(state, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key]
        digest.update(f"{key} {t.dtype} {tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _manifest(model_source, model_fingerprint, listing, settings):
    from . import __version__

    return {"format": _MANIFEST_FORMAT, "format_version": 1, "skad": __version__,
            "model": {"source": model_source, "fingerprint": model_fingerprint},
            "inputs": listing.describe(), "settings": settings}


def _write_manifest(out, manifest):
    text = json.dumps(manifest, indent=1) + "\n"
    _replace_atomically(out / MANIFEST_NAME, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _check_manifest(out, manifest):
    """Refuse, in one line, to resume a run that is not this one."""
    path = out / MANIFEST_NAME
    if not (out / CSV_NAME).is_file():
        raise ValueError(f"nothing to resume in {out}: it holds no {CSV_NAME} (run without "
                         "--resume to start)")
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"cannot resume {out}: it holds no run manifest ({MANIFEST_NAME}), so "
                         "what its run scored is unknown; pass --overwrite to start again") \
            from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot resume {out}: its {MANIFEST_NAME} is not readable JSON "
                         f"({exc})") from None
    if not isinstance(recorded, dict) or recorded.get("format") != _MANIFEST_FORMAT:
        raise ValueError(f"cannot resume {out}: {path} is not a skad run manifest")
    before, now = recorded.get("model", {}), manifest["model"]
    if before.get("fingerprint") != now["fingerprint"]:
        raise ValueError(
            f"cannot resume {out}: its run scored with another model ({before.get('source')}, "
            f"fingerprint {str(before.get('fingerprint'))[:12]}); this one is {now['source']} "
            f"({now['fingerprint'][:12]})")
    if recorded.get("inputs") != manifest["inputs"]:
        raise ValueError(f"cannot resume {out}: its run scored {_describe(recorded.get('inputs'))}"
                         f", not {_describe(manifest['inputs'])}")
    settings = recorded.get("settings", {})
    for name, value in manifest["settings"].items():
        if settings.get(name) != value:
            raise ValueError(f"cannot resume {out}: its run had {name}={settings.get(name)!r}, "
                             f"not {value!r}")


def _lock(out):
    """An advisory lock on ``out`` for the run, so that two runs never write one table
    (a ``--resume`` started while the interrupted run still goes on, say).

    Returns the open lock file (the lock is released when it is closed, or when the
    process ends, killed or not; the run removes the file at its end), or None where
    ``fcntl`` is missing (Windows).
    """
    try:
        import fcntl
    except ImportError:
        return None
    fh = open(out / LOCK_NAME, "a")  # noqa: SIM115 (held for the run)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise ValueError(f"{out} is being written by another skad score run: wait for it to "
                         "end, or stop it, first") from None
    return fh


def _describe(inputs):
    if not isinstance(inputs, dict) or len(inputs) != 1:
        return repr(inputs)
    ((kind, value),) = inputs.items()
    return f"the {kind.replace('_', ' ')} {value}"


def _check_prefix(listed, journal, out):
    """Consume the first ``journal.n_rows`` paths of ``listed``; each must be its row's."""
    recorded = (row[0] for row in journal.rows())
    for k, path in enumerate(recorded):
        now = next(listed, None)
        if now is None:
            raise ValueError(f"cannot resume {out}: the inputs now list {k} images, fewer than "
                             f"the {journal.n_rows} its run scored")
        if _text(now) != path:
            raise ValueError(f"cannot resume {out}: row {k + 1} of its {CSV_NAME} is {path}, but "
                             f"the inputs now list {now} there: they changed since the run")


# ------------------------------------------------------------------- engines
def _chunks(listed, *, start, size, limit):
    """``(number, start, listed paths, absolute paths)`` of each chunk, lazily."""
    number = 0
    while limit is None or start < limit:
        n = size if limit is None else min(size, limit - start)
        paths = list(islice(listed, n))
        if not paths:
            return
        # images are read by absolute path, here as on a worker, so that error messages
        # (which name the file) are the same wherever a chunk is scored
        yield number, start, paths, [os.path.abspath(p) for p in paths]
        start += len(paths)
        number += 1


def _run_local(det, renderer, chunks, table):
    """Score the chunks here, one after the other; yields after each chunk is written."""
    for _number, start, paths, absolute in chunks:
        table.write(paths, _score_chunk(det, renderer, start, absolute))
        yield


# models loaded on this process (a worker) for its tasks: (path, fingerprint, device) -> det
_WORKER_MODELS = {}
_WORKER_LOCK = threading.Lock()


def _worker_detector(source, device):
    """The detector a task scores with: loaded once per worker process from its file.

    ``source`` is ``("file", path, fingerprint)``, or a detector (broadcast by
    the caller). A file whose fingerprint is not the caller's (another copy of
    the model at that path on this machine) is an error, never scored with.
    """
    if not isinstance(source, tuple):
        if device is not None:  # this worker's copy of the broadcast detector
            source.set_params(device=device)
        return source
    _, path, expected = source
    key = (path, expected, device)
    with _WORKER_LOCK:  # the threads of a worker share one copy, loaded once
        det = _WORKER_MODELS.get(key)
        if det is None:
            from ._serialization import load

            det = load(path)
            found = fingerprint(det)
            if found != expected:
                raise RuntimeError(
                    f"the model file {path} on worker {os.uname().nodename} (pid {os.getpid()}) "
                    f"is not the caller's (fingerprint {found[:12]}, not {expected[:12]}): "
                    "every worker must read the same file")
            if device is not None:
                det.set_params(device=device)
            det.set_params(verbose=0)
            _WORKER_MODELS.clear()  # one model at a time: a worker serves one run at a time
            _WORKER_MODELS[key] = det
    return det


def _remote_chunk(source, settings, start, paths):
    """A cluster task: the rows (without ``path``) of one chunk, its files written."""
    settings = dict(settings)
    det = _worker_detector(source, settings.pop("device"))
    return _score_chunk(det, _Renderer(det, **settings), start, paths)


def _client(scheduler):
    """``(client, owned)``: a ``distributed.Client`` for ``scheduler`` and whether to close it."""
    try:
        from distributed import Client
    except ImportError:
        raise ImportError('scoring on a Dask cluster needs dask.distributed: pip install '
                          '"skad[dask]"') from None
    if isinstance(scheduler, Client):
        return scheduler, False
    if not isinstance(scheduler, (str, os.PathLike)):
        raise TypeError("scheduler must be a scheduler address, a scheduler file or a "
                        f"distributed.Client; got {type(scheduler).__name__}")
    scheduler = os.fspath(scheduler)
    try:
        if Path(scheduler).is_file():  # a scheduler file, as dask-mpi and dask-jobqueue write
            return Client(scheduler_file=scheduler, set_as_default=False), True
        return Client(scheduler, set_as_default=False, timeout="30s"), True
    except (OSError, TimeoutError) as exc:
        raise OSError(f"cannot reach the Dask scheduler {scheduler}: {exc}") from None


def _run_dask(client, source, settings, chunks, table, *, window):
    """Score the chunks on the cluster, written in order; yields after each chunk written.

    At most ``window`` chunks are in flight or waiting beyond the next one to
    write: the results that arrive early wait in ``ready`` until their turn.
    """
    from distributed import as_completed

    run = uuid.uuid4().hex[:12]
    flying = {}  # future key -> (future, number, start, paths)
    ready = {}   # number -> (paths, rows)
    done = as_completed()
    chunks = iter(chunks)
    next_write = submitted = 0

    def submit():
        nonlocal submitted
        item = next(chunks, None)
        if item is None:
            return False
        number, start, paths, absolute = item
        future = client.submit(_remote_chunk, source, settings, start, absolute,
                               key=f"skad-score-{run}-{number}", pure=False)
        flying[future.key] = (future, number, start, paths)
        done.add(future)
        submitted += 1
        return True

    try:
        while submitted - next_write < window and submit():
            pass
        for future in done:
            _, number, start, paths = flying.pop(future.key)
            try:
                rows = future.result()
            except Exception as exc:  # a task's error, or KilledWorker: one line for the caller
                raise RuntimeError(f"images {start} to {start + len(paths) - 1} failed on the "
                                   f"cluster: {type(exc).__name__}: {exc}") from exc
            future.release()
            ready[number] = (paths, rows)
            while next_write in ready:
                table.write(*ready.pop(next_write))
                next_write += 1
                yield
            while submitted - next_write < window and submit():
                pass
    finally:
        # stopped early (an error, an interruption): the cluster stops working for this run
        if flying:
            client.cancel([f for f, *_ in flying.values()])


# ------------------------------------------------------------------- the run
@dataclasses.dataclass(frozen=True)
class ScoringSummary:
    """What a :func:`score_files` run did.

    Attributes
    ----------
    n_images : int
        Rows in ``scores.csv``: the images scored and those that could not be.
    n_scored, n_rejected, n_failed : int
        Images scored; of them, those above the threshold (``predicted_label``
        1); images that could not be read (their rows say why).
    n_resumed : int
        Rows an interrupted run had written, kept (counted in the above).
    seconds : float
        Wall time of the scoring, from the first chunk to the last row (loading
        the model, checking a resumed run's rows and preparing ``out`` aside).
    complete : bool
        False when ``limit`` stopped the run before the end of the listing.
    threshold : float
        The model's ``threshold_``.
    csv_path : Path
    parquet_path : Path or None
    """

    n_images: int
    n_scored: int
    n_rejected: int
    n_failed: int
    n_resumed: int
    seconds: float
    complete: bool
    threshold: float
    csv_path: Path
    parquet_path: Path | None

    @property
    def images_per_second(self):
        """Images this call scored (resumed rows aside) per second of wall time."""
        return (self.n_images - self.n_resumed) / self.seconds if self.seconds > 0 else 0.0


def _load(model, device):
    """``(detector, source for the manifest, model file or None)``."""
    from .base import BaseDetector

    if isinstance(model, BaseDetector):
        det, source, path = model, f"a {type(model).__name__} given from Python", None
    elif isinstance(model, (str, os.PathLike)):
        from ._serialization import load

        path = os.path.abspath(model)
        det, source = load(path), path
    else:
        raise TypeError(f"model must be a model file or a fitted skad detector; got "
                        f"{type(model).__name__}")
    if not hasattr(det, "threshold_"):
        where = f" in {source}" if path else ""
        raise ValueError(f"the model{where} has no reference: call set_reference with good "
                         "images of the parts to score first (skad score: --reference DIR)")
    if device is not None:
        det.set_params(device=device)
    return det, source, path


def _check_options(output_format, overlays, save_maps, min_area, chunk_size, limit, window):
    for name, value, allowed in (("output_format", output_format, FORMATS),
                                 ("overlays", overlays, OVERLAYS),
                                 ("save_maps", save_maps, (None, *MAP_FORMATS))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got "
                             f"{value!r}")
    for name, value, low in (("min_area", min_area, 1), ("chunk_size", chunk_size, 1),
                             ("limit", limit, 0), ("window", window, 1)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < low):
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    if output_format == "parquet":
        _require_pyarrow()


def score_files(model, inputs, out, *, resume=False, overwrite=False, scheduler=None,
                output_format="csv", overlays="all", min_area=1, save_maps=None,
                chunk_size=None, limit=None, window=None, device=None, verbose=0,
                callback=None):
    """Score images into ``out`` as they are listed, resumably, here or on a Dask cluster.

    Writes ``out/scores.csv`` (columns :data:`COLUMNS`, one row per listed
    image, in listing order), one overlay PNG per image (see ``overlays``),
    ``out/scores.parquet`` with ``output_format="parquet"``, and the run
    manifest ``out/skad-run.json``. Rows are appended a chunk at a time as the
    run goes, and memory holds a few chunks whatever the number of images. An
    image that cannot be read becomes a row with its error; the run goes on.

    Parameters
    ----------
    model : str, path-like or BaseDetector
        A model file (:func:`skad.save`, read safely with :func:`skad.load`;
        on a cluster every worker loads it once, from the same path), or a
        fitted detector with a reference (on a cluster, sent to every worker
        once, pickled).
    inputs : str, path-like, ImageFolder, FileList, Glob or iterable of path-like
        A folder (every image below it, as :class:`ImageFolder`), a listing
        object, or the paths themselves (consumed once, lazily). ``out`` and
        the model file are never listed.
    out : str or path-like
        The results folder: new or empty, unless ``overwrite`` or ``resume``.
    resume : bool, default=False
        Continue the interrupted run in ``out``: the images its ``scores.csv``
        has rows for are not scored again (a last row cut short by the
        interruption is dropped and its image scored again). The run must be
        this one: same model (fingerprint), same inputs, same ``overlays``,
        ``min_area``, ``save_maps`` and ``output_format``; and the inputs must
        still list the scored images first, in the same order.
    overwrite : bool, default=False
        Replace the files a previous run recorded in ``out``.
    scheduler : str, path-like or distributed.Client, optional
        Score on a Dask cluster: a scheduler address (``"tcp://host:8786"``), a
        scheduler file, or a client. Workers read the images, and write the
        overlays into ``out``, by the caller's absolute paths: the images, the
        results folder and the model file must be at the same paths on every
        worker (a shared file system). By default, scores here.
    output_format : {"csv", "parquet"}, default="csv"
        ``"parquet"`` also writes ``scores.parquet`` (needs pyarrow): the same
        rows, typed (float64 scores, integer labels and counts, empty cells
        null), a row group every 10,000 rows, complete when the run ends or is
        interrupted with an exception (Ctrl-C); a killed run leaves it without
        its footer, and ``resume`` writes it again from ``scores.csv``.
    overlays : {"all", "rejects", "none"}, default="all"
        Which images get an overlay PNG (the ``map`` column is empty for the
        others): every one, only those predicted anomalous, or none (a run of
        millions of images may not want millions of pictures).
    min_area : int, default=1
        Defect regions smaller than this many pixels are dropped from
        ``n_regions``, ``largest_region_area`` and the outlines.
    save_maps : {"npy", "tiff"}, optional
        Also write each raw map as float32, named in ``raw_map``.
    chunk_size : int, optional
        Images per chunk: read, scored and written together; on a cluster, one
        task. Default: the detector's ``batch_size``.
    limit : int, optional
        Stop once the table holds this many rows (resumed rows included); a
        later ``resume`` continues. ``complete`` in the summary says whether
        the listing was exhausted.
    window : int, optional
        On a cluster, the chunks submitted beyond the next one to write: it
        bounds the results held in memory while an earlier chunk is late.
        Default: twice the cluster's threads (at least 4).
    device : str, optional
        The detector's ``device`` for this run (``"auto"``, ``"cpu"``,
        ``"cuda:1"``; on a cluster, each worker's). Default: the model's.
    verbose : int, default=0
        Progress lines on stderr: images done and their rate.
    callback : callable, optional
        ``callback(summary)``, called after each chunk's rows are written, with
        a :class:`ScoringSummary` of the run so far.

    Returns
    -------
    ScoringSummary

    Raises
    ------
    ValueError
        A bad setting; ``out`` not usable (a file, or holding another run
        without ``overwrite``/``resume``); nothing to list; a model without a
        reference or not a skad model file (:class:`skad.ModelFileError`); a
        ``resume`` of another run (the model, the inputs or a setting differ,
        or the inputs no longer list the scored images first), named in the
        message.
    ImportError
        ``output_format="parquet"`` without pyarrow, ``scheduler`` without
        dask.distributed.
    OSError
        A folder or file that cannot be read or written; a scheduler that
        cannot be reached.
    RuntimeError
        A chunk failed on the cluster (a worker's error, or workers that kept
        dying); the rows written until then are kept, and ``resume`` continues.

    See Also
    --------
    ImageFolder, FileList, Glob : The listings.

    Notes
    -----
    Rows are written by this process only, in listing order: on a cluster, a
    chunk that finishes early waits for the chunks before it. A worker that
    dies loses nothing: the scheduler runs its chunks again elsewhere, and a
    chunk's rows are written once. The rows and files are those of a run in
    one process, byte for byte, given the same ``chunk_size`` (it decides which
    images share a batch) and the same numerical library settings.

    Examples
    --------
    See the module's example; on a cluster::

        from dask.distributed import Client
        summary = score_files("model.skad", Glob("/data/line3/**/*.png"), "/data/results",
                              scheduler="tcp://10.0.0.5:8786")
    """
    _check_options(output_format, overlays, save_maps, min_area, chunk_size, limit, window)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run in out, "
                         "or replace it")
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out must be a folder; {out} is a file")
    det, source, model_file = _load(model, device)
    listing = as_listing(inputs).excluding(out, *([model_file] if model_file else []))
    if isinstance(listing, ImageFolder) and out.resolve() == listing.folder.resolve():
        raise ValueError(f"the results folder {out} is the images folder: the overlays would "
                         "be scored as images by the next run")
    listed = iter(listing)
    first = next(listed, None)  # nothing is written before the listing has found an image
    if first is None:
        raise ValueError(listing.nothing_found())
    listed = chain([first], listed)
    settings = {"overlays": overlays, "min_area": int(min_area), "save_maps": save_maps,
                "output_format": output_format}
    manifest = _manifest(source, fingerprint(det), listing, settings)
    journal = lock = None
    if resume:
        _check_manifest(out, manifest)
        lock = _lock(out)
        try:
            journal = _Journal(out / CSV_NAME)
            _check_prefix(listed, journal, out)
        except BaseException:
            if lock is not None:
                lock.close()
            raise
        journal.truncate()
    else:
        prepare_output(out, overwrite=overwrite)
        lock = _lock(out)
        _write_manifest(out, manifest)
    n_resumed = journal.n_rows if journal else 0
    size = int(chunk_size or det.batch_size)
    chunks = _chunks(listed, start=n_resumed, size=size, limit=limit)
    table = _Table(out, parquet=output_format == "parquet", journal=journal)
    verbose_before = det.verbose
    det.set_params(verbose=0)  # one progress line for the run, not one per chunk

    def summary(complete=False):
        return ScoringSummary(
            n_images=table.n_rows, n_scored=table.n_scored, n_rejected=table.n_rejected,
            n_failed=table.n_failed, n_resumed=n_resumed,
            seconds=time.perf_counter() - t0, complete=complete,
            threshold=float(det.threshold_), csv_path=table.csv_path,
            parquet_path=table.parquet_path)

    def status():
        s = summary()
        return f"({s.n_images} images, {s.images_per_second:.1f}/s)"

    client = owned = None
    try:
        row_settings = {"out": os.path.abspath(out), **{k: settings[k] for k in
                                                       ("overlays", "min_area", "save_maps")}}
        if scheduler is None:
            steps = _run_local(det, _Renderer(det, **row_settings), chunks, table)
        else:
            client, owned = _client(scheduler)
            steps = _run_dask(client, _source(client, det, model_file,
                                              manifest["model"]["fingerprint"]),
                              {**row_settings, "device": device}, chunks, table,
                              window=window or max(4, 2 * sum(client.nthreads().values())))
        from ._progress import progress

        t0 = time.perf_counter()  # the speed is the scoring's: the model's loading aside
        for _ in progress(steps, desc="scoring", unit="chunk ", verbose=verbose,
                          status=status):
            if callback is not None:
                callback(summary())
        complete = limit is None or table.n_rows < limit or next(listed, None) is None
    finally:
        table.close()
        det.set_params(verbose=verbose_before)
        if owned:
            client.close()
        if lock is not None:  # a killed run leaves the file (hidden), never the lock
            Path(lock.name).unlink(missing_ok=True)
            lock.close()
    return summary(complete)


def _source(client, det, model_file, digest):
    """What a worker scores with: the model file to load once, or the detector broadcast.

    A detector changed in memory (a new reference) or given from Python has no
    file that holds it: it is sent to every worker, pickled, once.
    """
    if model_file is not None:
        return ("file", model_file, digest)
    (future,) = client.scatter([det], broadcast=True, hash=False)
    return future


# ------------------------------------------------------- one image at a time
class Results:
    """``scores.csv`` and one overlay PNG per image under ``out``, added one at a time.

    For results computed elsewhere (``skad demo`` scores its test images in
    one call); :func:`score_files` is the way to score files. Each row is
    flushed when written. Columns: :data:`COLUMNS`; an image that could not
    be scored has its ``path`` and ``error`` only.

    Parameters
    ----------
    out : str or path-like
        A folder made ready by :func:`prepare_output`.
    det : BaseDetector
        The detector that scored (its thresholds and reference scores).
    min_area : int, default=1
    save_maps : {"npy", "tiff"}, optional
    """

    def __init__(self, out, det, *, min_area=1, save_maps=None):
        self._renderer = _Renderer(det, out, min_area=min_area, save_maps=save_maps)
        self._table = _Table(out)
        self.csv_path = self._table.csv_path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._table.close()

    n_scored = property(lambda self: self._table.n_scored)
    n_above = property(lambda self: self._table.n_rejected)
    n_failed = property(lambda self: self._table.n_failed)

    def add(self, path, score, amap, image):
        """One scored image: its overlay (and raw map), then its row."""
        row = self._renderer.row(self._table.n_rows, path, score, amap, image)
        self._table.write([path], [row])

    def add_error(self, path, message):
        """One image that could not be scored."""
        self._table.write([path], [_Renderer.error_row(message)])
