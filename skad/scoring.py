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
...                 false_reject_rate=0.2,  # 6 normals support 1/7 and above
...                 random_state=0).fit(list(ImageFolder(folder)))
>>> out = os.path.join(tempfile.mkdtemp(), "results")
>>> summary = score_files(det, folder, out, chunk_size=4)
>>> summary.n_images, summary.n_failed, summary.complete
(6, 0, True)
>>> sorted(os.listdir(out))[:3]
['000000_000.png', '000001_001.png', '000002_002.png']
"""

import dataclasses
import os
import time
from itertools import chain, islice
from pathlib import Path

import numpy as np

from . import _results
from ._cluster import connect, model_source, run_on_cluster
from ._listings import FileList, Glob, ImageFolder, as_listing
from ._results import COLUMNS, CSV_NAME, FORMATS, MAP_FORMATS, OVERLAYS, Renderer, prepare_output
from ._runs import check_manifest, check_prefix, lock_folder, make_manifest, write_manifest
from ._tables import Journal, Results, Table, require_pyarrow

__all__ = ["COLUMNS", "MAP_FORMATS", "OVERLAYS", "FileList", "Glob", "ImageFolder", "Results",
           "ScoringSummary", "as_listing", "prepare_output", "score_files"]


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
        # looked up at each call, on the module: the tests slow it down
        table.write(paths, _results.score_chunk(det, renderer, start, absolute))
        yield


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
    false_reject_rate : float
        The model's ``false_reject_rate_``: the rate ``threshold`` guarantees,
        1.0 where it guarantees none (calibrated on the training images of
        GeneralAD, MMR or GlobalLocal, or on a single reference); nan for a
        model saved before skad 0.2.
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
    false_reject_rate: float
    csv_path: Path
    parquet_path: Path | None

    @property
    def images_per_second(self):
        """Images this call scored (resumed rows aside) per second of wall time."""
        return (self.n_images - self.n_resumed) / self.seconds if self.seconds > 0 else 0.0


def _load(model, device):
    """``(detector, source for the manifest, model file or None)``."""
    from .base import BaseDetector, check_reference

    if isinstance(model, BaseDetector):
        det, source, path = model, f"a {type(model).__name__} given from Python", None
    elif isinstance(model, (str, os.PathLike)):
        from ._serialization import load

        path = os.path.abspath(model)
        det, source = load(path), path
    else:
        raise TypeError(f"model must be a model file or a fitted skad detector; got "
                        f"{type(model).__name__}")
    check_reference(det, subject=f"the model in {source}" if path else "the model",
                    error=ValueError, remedy="call set_reference with good images of the parts "
                    "to score first (skad score: --reference DIR)")
    det._check_calibrated(decisions=True)  # its thresholds decide every row
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
        require_pyarrow()


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
    images share a batch) and the same numerical library settings and thread
    count; an image scores the same in any batch of two or more
    (:mod:`skad._threads`), a chunk's only readable image may differ in the
    last digits (PyTorch convolves a single image with other kernels).

    Examples
    --------
    See the module's example; on a cluster::

        summary = score_files("model.skad", Glob("/data/line3/**/*.png"), "/data/results",
                              scheduler="tcp://10.0.0.5:8786")
    """
    _check_options(output_format, overlays, save_maps, min_area, chunk_size, limit, window)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run in out, "
                         "or replace it")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out must be a folder; {out} is a file")
    det, source, model_file = _load(model, device)
    listing, listed = _open_listing(inputs, out, model_file)
    settings = {"overlays": overlays, "min_area": int(min_area), "save_maps": save_maps,
                "output_format": output_format}
    from ._serialization import fingerprint  # torch: loaded with the model already

    manifest = make_manifest(source, fingerprint(det), listing, settings)
    # the cluster is reached before anything is written: a scheduler that cannot be
    # reached leaves ``out`` as it was
    client, owned = connect(scheduler) if scheduler is not None else (None, False)
    try:
        journal, lock = _begin(out, manifest, listed, resume=resume, overwrite=overwrite)
        try:
            n_resumed = journal.n_rows if journal else 0
            chunks = _chunks(listed, start=n_resumed, size=int(chunk_size or det.batch_size),
                             limit=limit)
            table = Table(out, parquet=output_format == "parquet", journal=journal)
            progress = _Progress(table, det, n_resumed)
            verbose_before = det.verbose
            det.set_params(verbose=0)  # one progress line for the run, not one per chunk
            try:
                rows = {"out": os.path.abspath(out), "overlays": overlays,
                        "min_area": int(min_area), "save_maps": save_maps}
                steps = (_run_local(det, Renderer(det, **rows), chunks, table) if client is None
                         else _run_remote(client, det, model_file, manifest, chunks, table,
                                          {**rows, "device": device}, window))
                for summary in progress.run(steps, verbose):
                    if callback is not None:
                        callback(summary)
            finally:
                table.close()
                det.set_params(verbose=verbose_before)
            complete = limit is None or table.n_rows < limit or next(listed, None) is None
        finally:
            _unlock(lock)
    finally:
        if owned:
            client.close()
    return progress.summary(complete)


def _run_remote(client, det, model_file, manifest, chunks, table, settings, window):
    """The steps of a run on the cluster: each worker scores with the model file (or the
    detector, broadcast), at most ``window`` chunks ahead of the table."""
    source = model_source(client, det, model_file, manifest["model"]["fingerprint"])
    threads = sum(client.nthreads().values())
    return run_on_cluster(client, source, settings, chunks, table,
                          window=window or max(4, 2 * threads))


def _open_listing(inputs, out, model_file):
    """``(listing, paths)``: the listing, and an iterator of its paths that has found one.

    Nothing is written before the listing has found an image: an empty one is an
    error here, with the listing's reason.
    """
    listing = as_listing(inputs).excluding(out, *([model_file] if model_file else []))
    if isinstance(listing, ImageFolder) and out.resolve() == listing.folder.resolve():
        raise ValueError(f"the results folder {out} is the images folder: the overlays would "
                         "be scored as images by the next run")
    listed = iter(listing)
    first = next(listed, None)
    if first is None:
        raise ValueError(listing.nothing_found())
    return listing, chain([first], listed)


def _begin(out, manifest, listed, *, resume, overwrite):
    """``(journal, lock)``: the run's folder ready, locked; a resumed run's rows checked.

    A resume consumes the paths of ``listed`` that its rows hold (each must be its
    row's) and drops a last row cut short; a new run empties ``out`` (``overwrite``)
    or finds it empty, and writes the manifest.
    """
    if not resume:
        prepare_output(out, overwrite=overwrite)
        lock = lock_folder(out)
        write_manifest(out, manifest)
        return None, lock
    check_manifest(out, manifest)
    lock = lock_folder(out)
    try:
        journal = Journal(out / CSV_NAME)
        check_prefix(listed, journal, out)
    except BaseException:
        _unlock(lock, remove=False)
        raise
    journal.truncate()
    return journal, lock


def _unlock(lock, *, remove=True):
    """Release the run's lock (and remove its file: a killed run leaves it, hidden)."""
    if lock is None:
        return
    if remove:
        Path(lock.name).unlink(missing_ok=True)
    lock.close()


class _Progress:
    """The run's :class:`ScoringSummary` as it goes; the speed is the scoring's, from the
    first chunk on (the model's loading and a resume's checks aside)."""

    def __init__(self, table, det, n_resumed):
        self.table, self.det, self.n_resumed = table, det, n_resumed
        self.t0 = time.perf_counter()

    def summary(self, complete=False):
        t = self.table
        return ScoringSummary(
            n_images=t.n_rows, n_scored=t.n_scored, n_rejected=t.n_rejected,
            n_failed=t.n_failed, n_resumed=self.n_resumed,
            seconds=time.perf_counter() - self.t0, complete=complete,
            threshold=float(self.det.threshold_),
            # a model saved before skad 0.2 states no rate: nan
            false_reject_rate=float(getattr(self.det, "false_reject_rate_", np.nan)),
            csv_path=t.csv_path,
            parquet_path=t.parquet_path)

    def _status(self):
        s = self.summary()
        return f"({s.n_images} images, {s.images_per_second:.1f}/s)"

    def run(self, steps, verbose):
        """Yield a summary after each chunk written; progress lines on stderr with verbose."""
        from ._progress import progress

        self.t0 = time.perf_counter()
        for _ in progress(steps, desc="scoring", unit="chunk", verbose=verbose,
                          status=self._status):
            yield self.summary()
