"""skad score on a Dask cluster: chunks as tasks, rows written in order by the caller.

Each chunk of the listing is one task (:func:`run_on_cluster`). A worker scores it with
the model it loaded once from the model file (or the detector the caller broadcast),
writes the overlays into the results folder (a shared file system), and returns the
rows; the caller writes them in listing order, holding the chunks that finish early
until their turn, at most ``window`` of them.
"""

import os
import platform
import threading
import uuid
from pathlib import Path

from . import _results
from ._results import Renderer

__all__ = ["connect", "model_source", "run_on_cluster"]


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
            from ._serialization import fingerprint, load

            det = load(path)
            found = fingerprint(det)
            if found != expected:
                raise RuntimeError(
                    f"the model file {path} on worker {platform.node()} (pid {os.getpid()}) "
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
    # looked up at each call, on the module: the tests slow it down on the workers
    return _results.score_chunk(det, Renderer(det, **settings), start, paths)


def connect(scheduler):
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
        # waits distributed.comm.timeouts.connect (Dask's configuration; 30 s by default)
        return Client(scheduler, set_as_default=False), True
    except (OSError, TimeoutError) as exc:
        raise OSError(f"cannot reach the Dask scheduler {scheduler}: {exc}") from None


def run_on_cluster(client, source, settings, chunks, table, *, window):
    """Score the chunks on the cluster, written in order; yields after each chunk written.

    At most ``window`` chunks are submitted and not yet written: the results that
    arrive before their turn wait in ``ready``, and while an early chunk is late no
    more is submitted, so that the rows held stay bounded.
    """
    from distributed import as_completed

    run = uuid.uuid4().hex[:12]
    flying = {}  # future key -> (future, number, start, paths)
    ready = {}   # number -> (paths, rows)
    # the client's own loop: as_completed() alone takes the default client's, and the
    # client made from an address is not the default (set_as_default=False)
    done = as_completed(loop=client.loop)
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


def model_source(client, det, model_file, digest):
    """What a worker scores with: the model file to load once, or the detector broadcast.

    A detector changed in memory (a new reference) or given from Python has no
    file that holds it: it is sent to every worker, pickled, once.
    """
    if model_file is not None:
        return ("file", model_file, digest)
    (future,) = client.scatter([det], broadcast=True, hash=False)
    return future
